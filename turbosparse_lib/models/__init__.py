"""Models: the gated-MLP variant registry (``variants``), the from-scratch architecture
(``architecture``), swapping variants into transformers models (``swap``) and pretrained
loaders (``pretrained``)."""

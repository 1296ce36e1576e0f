"""Training: the config (``config``), data order (``data``), precision choice (``precision``), DDP
(``distributed``), run folders and checkpoints (``checkpoint``), the loop (``loop``) and
ReLUfication of pretrained models (``relufication``)."""

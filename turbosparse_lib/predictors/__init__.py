"""Activation predictors (paper section 7): captured training data (``data``), the low-rank predictor and its
saving beside the model (``model``), ours for dReLU: a low-rank preview of the gate and up pre-activations fitted
from the FFN's own weights (``preview``), layer-by-layer training (``train``), accuracy and cost (``metrics``),
the engine's mask provider (``provider``), and, beyond the paper, a sparse output layer that computes a few
candidate vocabulary rows per token (``output_layer``), beside an SVD preview of the same layer for comparison
(``svd_preview``)."""

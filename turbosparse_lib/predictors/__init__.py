"""Activation predictors (paper section 7): captured training data (``data``), the low-rank predictor and its
saving beside the model (``model``), layer-by-layer training (``train``), accuracy and cost (``metrics``), and
the engine's mask provider (``provider``)."""

"""Activation sparsity: streaming instruments (``instruments``), top-k and threshold masks
(``masks``), and per-neuron firing frequencies (``frequencies``)."""

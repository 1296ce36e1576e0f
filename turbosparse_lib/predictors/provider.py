"""The predictors as the decode engine's mask provider, run with the engine's own Numba kernels.

Per layer and token: ``h = relu(W1 x)``, ``logits = W2 h + b`` (two GEMVs of the engine), and the neurons whose
logit reaches the threshold's are the mask. Its time is the profile's ``mask`` entry and its weights count in
bytes per token (``predictors.metrics.cost_per_token``). ``input`` says which vector the engine must hand it:
the residual stream before the FFN's norm, or the normalised FFN input.
"""

from __future__ import annotations

import numpy as np

from ..inference import quant
from .model import PredictorSet


class PredictorMaskProvider:
    """``(layer_idx, x_H) -> active neuron indices`` from a ``PredictorSet``, float32 NumPy copies of its weights."""

    def __init__(self, ps: PredictorSet, threshold: float | None = None, fmt: str = "f32"):
        """``threshold``: one probability for every layer; None: the set's own (per layer when it has them).
        ``fmt``: the format of the predictors' matrices ('f32', 'q8_0', 'q4_0'): a quantised engine reads
        its predictors in its own format, or a float32 predictor would cost as many bytes as several layers."""
        if fmt not in quant.FORMATS:
            raise ValueError(f"fmt must be one of {', '.join(quant.FORMATS)}; got {fmt!r}")
        self.input = ps.source  # "residual" or "normed"
        self.fmt = fmt
        self.logit_thresholds = [np.float32(ps.logit_threshold(threshold, i)) for i in range(len(ps.layers))]
        self.w1 = [quant.quantize(p.down.weight.detach().float().numpy(), fmt) for p in ps.layers]  # (r, H)
        self.w2 = [quant.quantize(p.up.weight.detach().float().numpy(), fmt) for p in ps.layers]  # (N, r)
        self.b = [np.ascontiguousarray(p.up.bias.detach().float().numpy()) for p in ps.layers]  # (N,)

    def __call__(self, layer_idx: int, x_H: np.ndarray) -> np.ndarray:
        h_R = np.maximum(quant.gemv(self.w1[layer_idx], np.ascontiguousarray(x_H, dtype=np.float32)), np.float32(0))
        logits_N = quant.gemv(self.w2[layer_idx], h_R) + self.b[layer_idx]
        return np.flatnonzero(logits_N >= self.logit_thresholds[layer_idx])

    @property
    def nbytes(self) -> int:
        """Bytes the provider reads per token (every layer's two matrices and bias)."""
        return sum(a.data.nbytes + b.data.nbytes + c.nbytes for a, b, c in zip(self.w1, self.w2, self.b))

    @property
    def n_params(self) -> int:
        return sum(a.rows * a.cols + b.rows * b.cols + c.size for a, b, c in zip(self.w1, self.w2, self.b))

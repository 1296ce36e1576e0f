"""The predictors as the decode engine's mask provider, run with the engine's own Numba kernels.

Per layer and token, two GEMVs of the engine:

- a low-rank MLP: ``h = relu(W1 x)``, ``logits = W2 h + b``; the neurons whose logit reaches the threshold's are
  the mask;
- a preview (``predictors.preview``): ``z = W2 (W1 x) + b`` gives each neuron's two scores; a neuron is a candidate
  only when both reach ``Phi^-1(threshold)`` (``Phi(z_g) Phi(z_u)`` cannot reach the threshold otherwise), and only
  the candidates' probabilities are computed, in one compiled loop (``preview_mask``; the same probability as the
  PyTorch module, in float64: a per-layer call into PyTorch cost more than the two GEMVs at 150 tokens/s).

The fused decode step runs the same computation itself (``fused_predictor``: the weights stacked over layers,
``inference.step.predicted_neurons``), with no Python between layers; called per layer from Python, the provider
gives the same lists. Its time is the profile's ``mask`` entry and its weights count in bytes per token
(``predictors.metrics.cost_per_token``). ``input`` says which vector the engine must hand it: the residual stream
before the FFN's norm, or the normalised FFN input.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..inference import quant
from ..inference.step import PREDICT_MLP, PREDICT_PREVIEW, preview_mask
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
        self.fmt, self.kind = fmt, ps.kind
        self.logit_thresholds = [np.float32(ps.logit_threshold(threshold, i)) for i in range(len(ps.layers))]
        if ps.kind == "preview":  # sigma folded into the second matrix: z = W2 (W1 x) + b are the scores
            mats = [p.folded() for p in ps.layers]
            probs = [float(torch.sigmoid(torch.tensor(t, dtype=torch.float64))) for t in self.logit_thresholds]
            self.log_thresholds = [math.log(p) for p in probs]
            # both scores at Phi^-1(sqrt(threshold)) or more: the product reaches it (a hair higher, for rounding)
            self.score_sure = [
                float(torch.special.ndtri(torch.tensor(p, dtype=torch.float64).sqrt())) + 1e-4 for p in probs
            ]
            # both scores must reach Phi^-1(threshold); a hair lower, so rounding never drops a true candidate
            self.score_floor = [float(torch.special.ndtri(torch.tensor(p, dtype=torch.float64))) - 1e-4 for p in probs]
        else:
            mats = [
                (p.down.weight.detach().float(), p.up.weight.detach().float(), p.up.bias.detach().float())
                for p in ps.layers
            ]
        # interleaved where the rows divide by four (quant.QMatrix.interleaved: the same results, read faster)
        self.w1 = [quant.quantize(w1.numpy(), fmt).interleaved() for w1, _, _ in mats]  # (r, H)
        self.w2 = [quant.quantize(w2.numpy(), fmt).interleaved() for _, w2, _ in mats]  # (N, r); preview: (2N, r)
        self.b = [np.ascontiguousarray(b.numpy()) for _, _, b in mats]
        self._fused: tuple | None = None  # fused_predictor's stacks, made on first use (empty: cannot fuse)

    def __call__(self, layer_idx: int, x_H: np.ndarray) -> np.ndarray:
        h_R = quant.gemv(self.w1[layer_idx], np.ascontiguousarray(x_H, dtype=np.float32))
        if self.kind == "preview":
            return self._preview_mask(layer_idx, quant.gemv(self.w2[layer_idx], h_R) + self.b[layer_idx])
        logits_N = quant.gemv(self.w2[layer_idx], np.maximum(h_R, np.float32(0))) + self.b[layer_idx]
        return np.flatnonzero(logits_N >= self.logit_thresholds[layer_idx])

    def fused_predictor(self, fmt: str, n_layers: int) -> tuple | None:
        """The arguments of ``inference.step.predicted_neurons`` for an engine of format ``fmt`` and ``n_layers``
        layers (every layer's matrices stacked, made once), or None where the fused step cannot run these
        predictors: another format, another layer count, or ranks that differ between layers. The engine then calls
        the provider per layer, which gives the same masks."""
        if fmt != self.fmt or n_layers != len(self.w1):
            return None
        if self._fused is None:
            same_shapes = len({(a.data.shape, b.data.shape) for a, b in zip(self.w1, self.w2)}) == 1
            self._fused = self._stacked() if same_shapes else ()
        return self._fused or None

    def _stacked(self) -> tuple:
        L, preview = len(self.w1), self.kind == "preview"

        def per_layer(name):  # the preview's per-layer scores; unused (zeros) by the low-rank MLP
            return np.array(getattr(self, name) if preview else [0.0] * L, np.float64)

        return (
            PREDICT_PREVIEW if preview else PREDICT_MLP,
            self.input == "residual",
            np.stack([w.data for w in self.w1]),
            np.stack([w.data for w in self.w2]),
            np.stack(self.b).astype(np.float32),
            np.array(self.logit_thresholds, np.float32),
            per_layer("score_floor"),
            per_layer("score_sure"),
            per_layer("log_thresholds"),
        )

    def _preview_mask(self, layer_idx: int, z_2N: np.ndarray) -> np.ndarray:
        i = layer_idx
        return preview_mask(z_2N, self.score_floor[i], self.score_sure[i], self.log_thresholds[i])

    @property
    def nbytes(self) -> int:
        """Bytes the provider reads per token (every layer's two matrices and bias)."""
        return sum(a.data.nbytes + b.data.nbytes + c.nbytes for a, b, c in zip(self.w1, self.w2, self.b))

    @property
    def n_params(self) -> int:
        return sum(a.rows * a.cols + b.rows * b.cols + c.size for a, b, c in zip(self.w1, self.w2, self.b))

"""The predictors as the decode engine's mask provider, run with the engine's own Numba kernels.

Per layer and token, two GEMVs of the engine:

- a low-rank MLP: ``h = relu(W1 x)``, ``logits = W2 h + b``; the neurons whose logit reaches the threshold's are
  the mask;
- a preview (``predictors.preview``): ``z = W2 (W1 x) + b`` gives each neuron's two scores; a neuron is a candidate
  only when both reach ``Phi^-1(threshold)`` (``Phi(z_g) Phi(z_u)`` cannot reach the threshold otherwise), and only
  the candidates' probabilities are computed, in one compiled loop (``preview_mask``; the same probability as the
  PyTorch module, in float64: a per-layer call into PyTorch cost more than the two GEMVs at 150 tokens/s).

One function computes the mask, ``inference.step.predicted_neurons``: the fused decode step runs it on the weights
stacked over layers (``fused_predictor``), with no Python between layers; a call of the provider runs it on one
layer's. Its time is the profile's ``mask`` entry and its weights count in bytes per token
(``predictors.metrics.cost_per_token``). ``input`` says which vector the engine must hand it: the residual stream
before the FFN's norm, or the normalised FFN input.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..inference import quant
from ..inference.step import PREDICT_MLP, PREDICT_PREVIEW, predicted_neurons
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
        # the per-layer floats ``step.predicted_neurons`` takes (the preview's scores; zeros, unused, for the MLP)
        L = len(ps.layers)
        self._kind_code = PREDICT_PREVIEW if ps.kind == "preview" else PREDICT_MLP
        self._scores = [
            np.array(getattr(self, name, [0.0] * L), np.float64)
            for name in ("score_floor", "score_sure", "log_thresholds")
        ]
        self._thresholds = np.array(self.logit_thresholds, np.float32)
        self._fused: tuple | None = None  # fused_predictor's stacks, made on first use (empty: cannot fuse)

    def __call__(self, layer_idx: int, x_H: np.ndarray) -> np.ndarray:
        """Layer ``layer_idx``'s mask from ``x_H``: ``step.predicted_neurons`` on this layer alone, the very function
        the fused step runs on the stacks (``fused_predictor``)."""
        i, layer = layer_idx, slice(layer_idx, layer_idx + 1)
        x = np.ascontiguousarray(x_H, dtype=np.float32)
        weights = (self.w1[i].data[None], self.w2[i].data[None], self.b[i][None], self._thresholds[layer])
        return predicted_neurons(0, x, self.w1[i].code, self._kind_code, *weights, *(a[layer] for a in self._scores))

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
        return (
            self._kind_code,
            self.input == "residual",
            np.stack([w.data for w in self.w1]),
            np.stack([w.data for w in self.w2]),
            np.stack(self.b).astype(np.float32),
            self._thresholds,
            *self._scores,
        )

    @property
    def nbytes(self) -> int:
        """Bytes the provider reads per token (every layer's two matrices and bias)."""
        return sum(a.data.nbytes + b.data.nbytes + c.nbytes for a, b, c in zip(self.w1, self.w2, self.b))

    @property
    def n_params(self) -> int:
        return sum(a.rows * a.cols + b.rows * b.cols + c.size for a, b, c in zip(self.w1, self.w2, self.b))

"""Mask providers for the engine's sparse FFN: which neurons each token reads.

A mask provider is any callable ``(layer_idx, x_normed_H) -> idx`` returning the active neuron
indices of that layer for this token (int64, duplicate-free, any order). Three live here:

- ``ExactZeroOracle``: the neurons whose combined value is not exactly zero, computed in line
  from the weights (lossless, but it reads what a predictor would skip);
- ``TopKOracle``: the k largest |combined| (paper eq. 3), lossy;
- ``RecordedMasks``: another provider's masks recorded on a first run and replayed at no cost,
  the timing of an ideal, free predictor.

Trained predictors (section 7) plug in the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

from ..models.variants import get_variant
from . import kernels

if TYPE_CHECKING:
    from .engine import Engine

# (layer_idx, x_normed_H) -> active neuron indices, int64, duplicate-free, any order
MaskProvider = Callable[[int, np.ndarray], np.ndarray]


class ExactZeroOracle:
    """The neurons whose combined value is not exactly zero: the model's own, lossless mask.

    It reads the float32 weights, also after ``quantize_ffn_int8``. Being an oracle it pays for
    what a predictor would avoid: with a ReLU-family gate a dense gate GEMV (all N rows), plus up
    rows where the gate fired when the up branch has a ReLU too (dReLU); with a gate that has no
    exact zeros (SwiGLU, GeGLU), the dense gate and up. Its time is the ``mask`` entry of a
    profile, so the ``ffn`` entry stays what a predictor-driven engine would spend.
    """

    def __init__(self, engine: "Engine"):
        self.engine = engine
        self.spec = get_variant(engine.config.mlp_variant)

    def __call__(self, layer_idx: int, x_H: np.ndarray) -> np.ndarray:
        layer, act = self.engine.layers[layer_idx], self.engine.config.act
        if not self.spec.exact_zeros:
            return np.flatnonzero(kernels.combined_dense(x_H, layer.w_gate_NH, layer.w_up_NH, act))
        fired_K = np.flatnonzero(kernels.gate_activation(kernels.gemv(layer.w_gate_NH, x_H), act))
        if not self.spec.relu_up:
            return fired_K
        up_K = kernels.gather_gemv(layer.w_up_NH, x_H, fired_K)
        return fired_K[up_K > 0]  # dReLU: relu(up) > 0 as well


class TopKOracle:
    """The k neurons with the largest |combined| (paper eq. 3), k = N - round(sparsity * N).

    Computes the dense combined values (the cost of two dense GEMVs, charged to ``mask``).
    ``sparsity=0`` keeps every neuron, so the sparse path then equals the dense one. The count is
    ``sparsity.masks.kept_count``'s, the same as the torch top-k mask.
    """

    def __init__(self, engine: "Engine", sparsity: float):
        from ..sparsity.masks import kept_count

        self.engine, self.sparsity = engine, sparsity
        self.k = kept_count(sparsity, engine.config.intermediate_size)  # validates sparsity

    def __call__(self, layer_idx: int, x_H: np.ndarray) -> np.ndarray:
        layer, N = self.engine.layers[layer_idx], self.engine.config.intermediate_size
        if self.k >= N:
            return np.arange(N, dtype=np.int64)
        if self.k == 0:
            return np.empty(0, dtype=np.int64)
        c_N = kernels.combined_dense(x_H, layer.w_gate_NH, layer.w_up_NH, self.engine.config.act)
        top_K = np.argpartition(np.abs(c_N), N - self.k)[N - self.k :]
        return np.sort(top_K)  # ascending rows: the gather walks memory forward


class RecordedMasks:
    """Records another mask provider's masks on the first decoding run, replays them afterwards.

    Replaying costs a list lookup: the timing of an ideal, free predictor with the recorded
    masks. A replayed run decodes the same prompt with the same masks, so it is bit-identical to
    the recorded one; a layer order that differs from the recording raises.
    """

    def __init__(self, provider: MaskProvider):
        self.provider = provider
        self.masks: list[tuple[int, np.ndarray]] = []
        self.recording, self.cursor = True, 0

    def rewind(self) -> None:
        """Start replaying from the first recorded mask (ends recording)."""
        self.recording, self.cursor = False, 0

    def __call__(self, layer_idx: int, x_H: np.ndarray) -> np.ndarray:
        if self.recording:
            idx = np.ascontiguousarray(self.provider(layer_idx, x_H), dtype=np.int64)
            self.masks.append((layer_idx, idx))
            return idx
        if self.cursor >= len(self.masks):
            raise IndexError(f"replay ran past the {len(self.masks)} recorded masks: "
                             "decode no more tokens than were recorded")
        li, idx = self.masks[self.cursor]
        if li != layer_idx:
            raise RuntimeError(f"replayed mask {self.cursor} belongs to layer {li}, but layer {layer_idx} asked")
        self.cursor += 1
        return idx

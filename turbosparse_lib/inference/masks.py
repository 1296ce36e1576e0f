"""Mask providers for the engine's sparse FFN: which neurons each token reads.

A mask provider is any callable ``(layer_idx, x_normed_H) -> idx`` returning the active neuron
indices of that layer for this token (int64, duplicate-free, any order). The engine calls it
between the two compiled halves of each layer, on the very input the FFN then sees. Two kinds
let the engine decode a whole token in one compiled call instead: ``ExactZeroOracle`` (computed
inside the FFN kernel) and providers with a ``token_masks(n_layers)`` method that returns the
token's masks for every layer up front, ``(offsets (L+1,), indices)``, or None to be called per
layer (``RecordedMasks`` while replaying). Three providers live here:

- ``ExactZeroOracle``: the neurons whose combined value is not exactly zero, computed in line
  from the weights (lossless, but it reads what a predictor would skip);
- ``TopKOracle``: the k largest |combined| (paper eq. 3), lossy;
- ``RecordedMasks``: another provider's masks recorded on a first run and replayed at no cost,
  the timing of an ideal, free predictor.

Trained predictors (section 7) plug in the same way; one that can run compiled ahead of the
token (or whose masks do not depend on the token) can offer ``token_masks`` too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from ..models.variants import get_variant
from . import bundles

if TYPE_CHECKING:
    from .engine import Engine

# (layer_idx, x_normed_H) -> active neuron indices, int64, duplicate-free, any order
MaskProvider = Callable[[int, np.ndarray], np.ndarray]


class ExactZeroOracle:
    """The neurons whose combined value is not exactly zero: the model's own, lossless mask.

    It reads the engine's own weights (in their format, so the mask is exact for a quantised
    engine too). Being an oracle it pays for what a predictor would avoid: every gate row, plus
    the up rows where the gate fired; with a gate that has no exact zeros (SwiGLU, GeGLU), every
    gate and up row. Called from Python (``engine.step(..., fused=False)`` or by another engine)
    its time is the ``mask`` entry of a profile; ``Engine.step`` runs it inside the FFN kernel
    instead, in one pass over the bundles, so its cost is then part of ``ffn``.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self.spec = get_variant(engine.config.mlp_variant)

    def __call__(self, layer_idx: int, x_H: np.ndarray) -> np.ndarray:
        c_N = bundles.combined(self.engine.ffn_layer(layer_idx), x_H, self.engine.config.act)
        return np.flatnonzero(c_N)


class TopKOracle:
    """The k neurons with the largest |combined| (paper eq. 3), k = N - round(sparsity * N).

    Computes the combined values of every neuron (gate and up rows: two dense GEMVs' worth, charged
    to ``mask``). ``sparsity=0`` keeps every neuron, so the sparse path then equals the dense one.
    The count is ``sparsity.masks.kept_count``'s, the same as the torch top-k mask.
    """

    def __init__(self, engine: Engine, sparsity: float):
        from ..sparsity.masks import kept_count

        self.engine, self.sparsity = engine, sparsity
        self.k = kept_count(sparsity, engine.config.intermediate_size)  # validates sparsity

    def __call__(self, layer_idx: int, x_H: np.ndarray) -> np.ndarray:
        N = self.engine.config.intermediate_size
        if self.k >= N:
            return np.arange(N, dtype=np.int64)
        if self.k == 0:
            return np.empty(0, dtype=np.int64)
        c_N = bundles.combined(self.engine.ffn_layer(layer_idx), x_H, self.engine.config.act)
        top_K = np.argpartition(np.abs(c_N), N - self.k)[N - self.k :]
        return np.sort(top_K)  # ascending rows: the gather walks memory forward


class RecordedMasks:
    """Records another mask provider's masks on the first decoding run, replays them afterwards.

    Replaying costs nothing in the decode step: the engine takes a token's masks for all layers
    at once (``token_masks``) and decodes the token in one compiled call. That is the timing of
    an ideal, free predictor with the recorded masks. A replayed run decodes the same prompt with
    the same masks, so it gives the recorded run's tokens; a layer order that differs from the
    recording raises.
    """

    def __init__(self, provider: MaskProvider):
        self.provider = provider
        self.masks: list[tuple[int, np.ndarray]] = []
        self.recording, self.cursor = True, 0
        self._packed: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def input(self) -> str:
        """The vector the engine hands the recorded provider (see ``engine._reads_residual``)."""
        return getattr(self.provider, "input", "normed")

    def rewind(self) -> None:
        """Start replaying from the first recorded mask (ends recording)."""
        self.recording, self.cursor = False, 0

    def _next(self, layer_idx: int) -> np.ndarray:
        if self.cursor >= len(self.masks):
            raise IndexError(
                f"replay ran past the {len(self.masks)} recorded masks: decode no more tokens than were recorded"
            )
        li, idx = self.masks[self.cursor]
        if li != layer_idx:
            raise RuntimeError(f"replayed mask {self.cursor} belongs to layer {li}, but layer {layer_idx} asked")
        self.cursor += 1
        return idx

    def __call__(self, layer_idx: int, x_H: np.ndarray) -> np.ndarray:
        if self.recording:
            idx = np.ascontiguousarray(self.provider(layer_idx, x_H), dtype=np.int64)
            self.masks.append((layer_idx, idx))
            return idx
        return self._next(layer_idx)

    def token_masks(self, n_layers: int) -> tuple[np.ndarray, np.ndarray] | None:
        """While replaying: the next token's masks for layers 0..n_layers-1, packed as (offsets, indices)
        (packed once, then reused by every replay); None while recording."""
        if self.recording:
            return None
        start = self.cursor
        if start not in self._packed:
            idx = [self._next(li) for li in range(n_layers)]
            offsets = np.zeros(n_layers + 1, np.int64)
            offsets[1:] = np.cumsum([len(i) for i in idx])
            self._packed[start] = (offsets, np.concatenate(idx) if idx else np.empty(0, np.int64))
        else:
            self.cursor += n_layers
        return self._packed[start]

"""The FFN in bundled-neuron layout (PowerInfer-2): a neuron's gate row, up row and down column stored together.

A gated FFN neuron n needs three vectors of the hidden size H: row n of W_gate, row n of W_up
and column n of W_down. Stored apart (the ``nn.Linear`` layout), an active neuron costs three
short reads at three distant addresses; bundled, ``data[n] = [gate_n | up_n | down_n]`` (each a
row of H weights in the engine's format, ``quant``), it costs one contiguous read of
``3 * row_bytes(H)``, which the hardware streams at full speed however few neurons fire.

One kernel, ``ffn_into``, serves every path, so dense and sparse differ only in which neurons
they read:

- dense (``idx`` unused, ``skip_zeros=False``): every neuron, every row read, as llama.cpp does;
- sparse (``use_idx``): the neurons a mask provider lists (ascending: ``ascending`` sorts a list that is not);
- in-line exact oracle (``skip_zeros=True`` over all neurons): every gate row is read, the up row
  only where the gate activation is non-zero and the down row only where the combined value is.

With ``skip_zeros`` a neuron whose gate activation is exactly zero costs its gate row only (the
in-line oracle, or a predictor's false positive), and one whose combined value is zero leaves its
down row unread. The down projection is an axpy,
``y += c_n * down_n``; the neuron indices are split into one fixed contiguous range per thread
(``thread_neurons``: the same ranges for every list, so a sparse path over every live neuron equals the dense
one bit for bit), each thread sums into its own partial ``y`` (no race), and the partials are added at the end. While a
thread works on one neuron it prefetches the bundle of one a few further in its list (``listed_ahead``,
``simd.prefetch``). Every call counts the rows it read of each kind, so bytes per token are measured, not modelled.

By default only this layout is held and the dense path reads the same bundles. In the Q formats a dense path
over bundles is compute-bound (each down weight is dequantised, multiplied and added on its own), so an engine
may also hold the FFN in llama.cpp's dense layout (``dense_layout``): the gate rows, the up rows, and the down
projection's rows quantised along the neurons, each a contiguous matrix, read by ``dense_rows_into`` with
integer row dots throughout. Gate-first reads its gate rows there too: from the bundles it reads a third of
every bundle, a pattern the hardware prefetcher does not follow, from the gate matrix one contiguous stream. That
is a second copy of the FFN, held only where the dense path must be fast.

A down column's blocks of 32 run along the hidden size, where llama.cpp's run along the neurons.
A hidden channel whose weights are all large (LLMs have a few) would then set the scale of every
block it falls in and crush the other 31 channels there. So the Q formats quantise
``W_down[h, :] / s_h`` with ``s_h = max_n |W_down[h, n]|`` and multiply output h by ``s_h`` once
(``down_scale``, H floats per layer): on SmolLM2 at Q4_0 that turns a 3% perplexity loss against
llama.cpp's layout into a 1% gain.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange

from . import quant, simd
from .kernels import FASTMATH, combine_ref, gate_act, up_act, variant_code
from .simd import BLOCK

PREFETCH_BYTES = 8192  # default, of a listed neuron's bundle; the hardware streams a long bundle on its own


GATE_AHEAD = 4  # neurons ahead whose gate row the in-line exact path prefetches
# how far ahead in its list the sparse path prefetches bundles: about 8 KB of them, at most 4 bundles (Q4_0 and Q8_0:
# 4, f32: 1). With the caches flushed before each token, 30 SmolLM2-shaped layers at 10/25/50% of the neurons ran
# x1.16/1.27/1.30 faster at Q4_0 than prefetching the next bundle only, x1.07/1.12/1.18 at Q8_0, x1.01-1.02 at f32,
# whose scattered 7 KB bundles read at about 26 GB/s either way (benchmarks/kernel_layouts.py, part 4); 6 ahead was
# no faster than 4 (a scratch run)
PREFETCH_IN_FLIGHT_BYTES, MAX_AHEAD = 8192, 4


@njit(cache=True, fastmath=False, inline="always")
def listed_ahead(bundle_bytes):
    """How many listed neurons ahead the sparse path prefetches (see ``PREFETCH_IN_FLIGHT_BYTES``)."""
    return max(1, min(MAX_AHEAD, PREFETCH_IN_FLIGHT_BYTES // bundle_bytes))


@njit(cache=True, fastmath=False, inline="always")
def prefetch_bytes_for(bundle_bytes):
    """How much of a listed neuron's bundle to prefetch (into L2) while working on an earlier one."""
    return min(bundle_bytes, PREFETCH_BYTES)


@dataclass
class FFNBundles:
    """``data`` uint8 (..., N, 3 * row_bytes(H)): per neuron its gate row, up row and down column, format
    ``fmt``; ``down_scale`` float32 (..., H): the output scale of each hidden channel (empty: none, f32).

    Optionally also the dense layout (``dense_rows_into``), a second copy of the weights the dense path reads
    instead: ``gate_up`` uint8 (..., 2N, row_bytes(H)), the N gate rows then the N up rows (as transformers'
    ``gate_up_proj``), and ``down_rows`` uint8 (..., H, row_bytes(N)), the down projection quantised along the
    neurons as llama.cpp stores it (empty arrays (..., 0, 0): none held). In the Q formats both are interleaved
    (``quant.QMatrix.interleaved``: four rows a stored row, (..., 2N / 4, 4 row_bytes(H)) and so on) where N and H
    divide by four, as llama.cpp repacks its weights."""

    data: np.ndarray
    fmt: str
    hidden: int
    down_scale: np.ndarray | None = None
    gate_up: np.ndarray | None = None
    down_rows: np.ndarray | None = None

    def __post_init__(self):
        self.code = quant.format_code(self.fmt)
        self.seg_bytes = quant.row_bytes(self.hidden, self.fmt)
        if self.data.dtype != np.uint8 or not self.data.flags.c_contiguous or self.data.shape[-1] != 3 * self.seg_bytes:
            raise ValueError(
                f"bundles must be C-contiguous uint8 (..., N, {3 * self.seg_bytes}); got "
                f"{self.data.dtype}{self.data.shape}"
            )
        if self.down_scale is None:
            self.down_scale = np.empty((*self.data.shape[:-2], 0), np.float32)
        if self.down_scale.shape[-1] not in (0, self.hidden) or self.down_scale.dtype != np.float32:
            raise ValueError(f"down_scale must be float32 (..., {self.hidden}) or empty; got {self.down_scale.shape}")
        lead, N = self.data.shape[:-2], self.data.shape[-2]
        if (self.gate_up is None) != (self.down_rows is None):
            raise ValueError("the dense layout needs both gate_up and down_rows, or neither")
        if self.gate_up is None:
            self.gate_up = self.down_rows = np.empty((*lead, 0, 0), np.uint8)
            return
        try:
            fits = quant.QMatrix(self.gate_up, self.fmt, self.hidden).rows == 2 * N
            fits = fits and quant.QMatrix(self.down_rows, self.fmt, N).rows == self.hidden
        except ValueError:
            fits = False
        if not fits or self.gate_up.shape[:-2] != lead or self.down_rows.shape[:-2] != lead:
            raise ValueError(
                f"dense layout: gate_up {self.gate_up.shape} and down_rows {self.down_rows.shape} do not fit "
                f"{N} neurons of hidden size {self.hidden} in {self.fmt}"
            )

    @classmethod
    def from_weights(cls, w_gate_NH, w_up_NH, w_down_HN, fmt: str, dense_layout: bool = False) -> FFNBundles:
        """Bundle ``nn.Linear``-layout weights (gate, up: (..., N, H); down: (..., H, N)), quantised to ``fmt``
        (the Q formats with each hidden channel of the down projection scaled to a maximum of 1 first); with
        ``dense_layout``, also the dense path's copy (the class docstring)."""
        gate, up = np.asarray(w_gate_NH, np.float32), np.asarray(w_up_NH, np.float32)
        down_HN = np.asarray(w_down_HN, np.float32)
        rows = quant.quantize(down_HN, fmt).interleaved().data if dense_layout else None
        if not gate.shape == up.shape == np.swapaxes(down_HN, -1, -2).shape:
            raise ValueError(
                f"gate {gate.shape}, up {up.shape} and down transposed {np.swapaxes(down_HN, -1, -2).shape} must match"
            )
        scale = None
        if quant.format_code(fmt) != quant.F32:
            amax = np.abs(down_HN).max(axis=-1)
            scale = np.where(amax > 0, amax, 1).astype(np.float32)
            down_HN = down_HN / scale[..., None]
        parts = [quant.quantize(W, fmt) for W in (gate, up, np.swapaxes(down_HN, -1, -2))]
        data = np.ascontiguousarray(np.concatenate([p.data for p in parts], axis=-1))
        gate_up = None
        if dense_layout:  # gate and up interleaved each on its own, so that no stored row mixes them
            gate_up = np.concatenate([parts[0].interleaved().data, parts[1].interleaved().data], axis=-2)
        return cls(data, fmt, gate.shape[-1], scale, gate_up, rows)

    @property
    def dense_layout(self) -> bool:
        """Whether the dense layout is held (``dense_rows_into`` then serves the dense path)."""
        return self.gate_up.shape[-2] > 0

    @property
    def neurons(self) -> int:
        return self.data.shape[-2]

    @property
    def nbytes(self) -> int:
        """Bytes held, the dense layout's copy included."""
        return self.data.nbytes + self.gate_up.nbytes + self.down_rows.nbytes

    def __getitem__(self, i) -> FFNBundles:
        """One layer of a stack, a view."""
        dense = (self.gate_up[i], self.down_rows[i]) if self.dense_layout else (None, None)
        return FFNBundles(self.data[i], self.fmt, self.hidden, self.down_scale[i], *dense)

    def dense_down(self) -> np.ndarray:
        """The dense layout's down projection as float32 (..., H, N) (what ``dense_rows_into`` multiplies with)."""
        if not self.dense_layout:
            raise ValueError("these bundles hold no dense layout (build them with dense_layout=True)")
        return quant.dequantize(quant.QMatrix(self.down_rows, self.fmt, self.neurons))  # interleaved or not

    def dequantized(self, k: int) -> np.ndarray:
        """The gate (0), up (1) or down-transposed (2) weights as float32 (..., N, H): a view for f32, else a copy."""
        if self.code == quant.F32:
            return self.data.view(np.float32)[..., k * self.hidden : (k + 1) * self.hidden]
        W = quant.dequantize(self.part(k))
        return W * self.down_scale[..., None, :] if k == 2 and self.down_scale.shape[-1] else W

    def part(self, k: int) -> quant.QMatrix:
        """The gate (0), up (1) or down-transposed (2) rows as a ``QMatrix`` copy (for references and tests)."""
        seg = self.seg_bytes
        return quant.QMatrix(np.ascontiguousarray(self.data[..., k * seg : (k + 1) * seg]), self.fmt, self.hidden)


@njit(cache=True, fastmath=False, inline="always")
def thread_neurons(t, n_threads, n_neurons, idx, n, use_idx):
    """Positions [lo, hi) in the neuron list (``idx[:n]``, ascending, with ``use_idx``; else ``0..n-1``) that
    thread ``t`` works on: the listed neurons inside the thread's fixed range of neuron *indices*, so a thread
    sums the same neurons in the same order whatever the list holds. A sparse list that holds every live
    neuron then gives the dense path's result bit for bit; split by list position instead, the partial sums
    differ in rounding, which a Q format's activation quantisation in the next layer turns into whole
    quantisation steps (half a logit on SmolLM2 at Q8_0)."""
    if not use_idx:
        return quant.thread_range(t, n_threads, n)
    first, last = quant.thread_range(t, n_threads, n_neurons)
    return np.searchsorted(idx[:n], first), np.searchsorted(idx[:n], last)


def ascending(idx: np.ndarray, n_neurons: int) -> np.ndarray:
    """A mask's neuron indices as the FFN kernels take them: int64, ascending (sorted here if they are not),
    inside [0, n_neurons); a duplicate or an index outside raises (the kernels trust the list)."""
    idx = np.ascontiguousarray(idx, dtype=np.int64)
    if idx.ndim != 1:
        raise ValueError(f"neuron indices must be 1-D; got shape {idx.shape}")
    if len(idx) > 1 and not (idx[1:] > idx[:-1]).all():
        idx = np.sort(idx)
        if (idx[1:] == idx[:-1]).any():
            raise ValueError("neuron indices hold duplicates: a neuron would be added twice")
    if len(idx) and (idx[0] < 0 or idx[-1] >= n_neurons):
        raise IndexError(f"neuron indices must lie in [0, {n_neurons}); got one outside")
    return idx


@njit(fastmath=FASTMATH, cache=True, inline="always")
def fired_gates(G, bundled, code, H, x, xq, xd, lo, hi, act, shift, fired, gates):
    """Gate-first's first pass over neurons [lo, hi): every gate row, row k of ``G`` from byte 0: the bundles
    (``bundled``: the row ``GATE_AHEAD`` neurons further is prefetched, since reading a third of every bundle breaks
    the hardware prefetcher's stream) or the dense layout's gate rows (contiguous, streamed by the hardware). The
    neurons whose gate fired go to ``fired``, their gate values to ``gates``, in ascending order; returns their
    count. Both sources hold the same bytes, so the result is the same."""
    seg = G.shape[1] // 3  # the gate row of a bundle (only prefetched there)
    R = 1 if bundled else quant.rows_per_line(G, code, H)
    m = 0
    if R > 1:  # the dense layout's interleaved gate rows: a group at a time (at most R - 1 extra rows at each end)
        vals = np.empty(R, np.float32)
        for g in range(lo // R, (hi + R - 1) // R):
            quant.group_dot_into(G[g], code, xq, xd, vals, 0)
            for s in range(R):
                k = g * R + s
                a = gate_act(vals[s], act, shift) if lo <= k < hi else np.float32(0.0)
                if a != 0:
                    fired[m] = k
                    gates[m] = a
                    m += 1
        return m
    for k in range(lo, hi):
        if bundled and k + GATE_AHEAD < hi:
            nxt = G[k + GATE_AHEAD]
            for off in range(0, seg, 64):
                simd.prefetch(nxt, off)
        a = gate_act(quant.row_dot(G[k], 0, code, H, x, xq, xd), act, shift)
        if a != 0:
            fired[m] = k
            gates[m] = a
            m += 1
    return m


@njit(fastmath=FASTMATH, cache=True, inline="always")
def fired_up_down(B, code, H, x, xq, xd, fired, gates, m, act, ahead, p):
    """Gate-first's second pass: the up rows of the ``m`` neurons in ``fired`` (their gate values in ``gates``), and
    the down rows of those whose combined value is not zero, summed into ``p``; the up and down rows of the neuron
    ``listed_ahead`` further prefetched (up to ``ahead`` bytes). Returns the up and down rows read."""
    seg = B.shape[1] // 3
    n_down = 0
    dist = listed_ahead(B.shape[1])
    for j in range(-dist, m):  # from -dist: the first bundles' up and down rows, before the loop reaches them
        if j + dist < m:
            nxt = B[fired[j + dist]]
            for off in range(seg, min(3 * seg, seg + ahead), 64):
                simd.prefetch(nxt, off)
        if j < 0:
            continue
        row = B[fired[j]]
        c = gates[j] * up_act(quant.row_dot(row, seg, code, H, x, xq, xd), act)
        if c != 0:
            quant.row_axpy(row, 2 * seg, code, H, c, p)
            n_down += 1
    return m, n_down


# fmt: off
# not formatted: one argument a line would stretch the two FFN kernels' signatures over 40 lines (as in step)
@njit(parallel=True, fastmath=FASTMATH, cache=True)
def ffn_into(
    B, down_scale, gate_up, code, H, x, xq, xd, idx, n, use_idx, skip_zeros, act, shift, n_threads, y, rows_read,
    prefetch_bytes
):
    """y = FFN(x) over neurons ``idx[:n]`` (``use_idx``) or neurons ``0..n-1``; adds rows read to ``rows_read`` (3,).
    ``down_scale`` (H,) multiplies the output channels (empty: none); with ``use_idx`` the first ``prefetch_bytes``
    of the bundle ``listed_ahead`` neurons further in the list are prefetched (``prefetch_bytes_for``).

    ``skip_zeros`` without ``use_idx`` is gate-first, the exact mask computed in line: each thread first reads the
    gate rows of its neurons (``fired_gates``), then the up and down rows of those whose gate fired, the next one's
    prefetched, in the same order as the other paths, so the result is theirs bit for bit. Its gate rows come from
    ``gate_up`` (the dense layout's, contiguous) where it is not empty, else from the bundles."""
    seg = B.shape[1] // 3
    width = quant.n_blocks(H) * BLOCK
    # np.empty, each thread zeroing its own row: np.zeros in a parallel kernel is a parallel region of its own; the
    # two cost about 3 us per layer and token (benchmarks/kernel_layouts.py), more than the zeroing
    partial = np.empty((n_threads, width), dtype=np.float32)
    counts = np.empty((n_threads, 3), dtype=np.int64)
    ahead, dist = min(B.shape[1], prefetch_bytes), listed_ahead(B.shape[1])
    gate_first = skip_zeros and not use_idx
    fired = np.empty((n_threads, B.shape[0] if gate_first else 0), dtype=np.int64)
    gates = np.empty((n_threads, B.shape[0] if gate_first else 0), dtype=np.float32)
    for t in prange(n_threads):
        lo, hi = thread_neurons(t, n_threads, B.shape[0], idx, n, use_idx)
        p = partial[t]
        for j in range(width):
            p[j] = 0.0
        n_gate, n_up, n_down = 0, 0, 0
        for k in range(lo, min(hi, lo + dist) if use_idx else lo):
            for off in range(0, ahead, 64):  # the first listed bundles, before the loop prefetches further ones
                simd.prefetch(B[idx[k]], off)
        if gate_first:
            bundled = gate_up.shape[0] == 0
            G = B if bundled else gate_up
            m = fired_gates(G, bundled, code, H, x, xq, xd, lo, hi, act, shift, fired[t], gates[t])
            n_gate = hi - lo
            n_up, n_down = fired_up_down(B, code, H, x, xq, xd, fired[t], gates[t], m, act, ahead, p)
        else:
            for k in range(lo, hi):
                r = idx[k] if use_idx else k
                if use_idx and k + dist < hi:
                    nxt = B[idx[k + dist]]
                    for off in range(0, ahead, 64):
                        simd.prefetch(nxt, off)
                row = B[r]
                # gate, up and down are read in order, one stream (two rows read side by side stream from memory
                # at half the rate); the up row only where the gate fired, with skip_zeros
                a = gate_act(quant.row_dot(row, 0, code, H, x, xq, xd), act, shift)
                n_gate += 1
                if skip_zeros and a == 0:
                    continue
                c = a * up_act(quant.row_dot(row, seg, code, H, x, xq, xd), act)
                n_up += 1
                if skip_zeros and c == 0:
                    continue
                quant.row_axpy(row, 2 * seg, code, H, c, p)
                n_down += 1
        counts[t, 0], counts[t, 1], counts[t, 2] = n_gate, n_up, n_down
    scaled = down_scale.shape[0] > 0
    for j in range(H):
        acc = np.float32(0.0)
        for t in range(n_threads):
            acc += partial[t, j]
        y[j] = acc * down_scale[j] if scaled else acc
    for t in range(n_threads):
        for s in range(3):
            rows_read[s] += counts[t, s]
# fmt: on


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def dense_rows_into(GU, down_rows, code, H, x, xq, xd, act, shift, n_threads, y, rows_read):
    """y = FFN(x) over every neuron in llama.cpp's dense layout: ``GU`` (2N, row_bytes(H)) holds the gate rows then
    the up rows, ``down_rows`` (H, row_bytes(N)) the down projection's rows. Adds N rows of each kind to
    ``rows_read`` (the H down rows hold the bytes of the N down columns).

    Contiguous streams instead of the bundles' one: each thread's gate rows, then its up rows, give the combined
    values of its neurons; these, quantised to Q8_0 blocks (f32: as they are), then meet the down projection in one
    integer row dot per output, as llama.cpp computes a dense FFN. The bundles' down columns are summed as axpys
    instead, a dequantise-multiply-add per weight, which left the dense quantised FFN compute-bound. The result is
    not the sparse paths' bit for bit: they never quantise the combined values, and the down rows' blocks run along
    the neurons, not along the hidden size."""
    N = quant.matrix_rows(GU, code, H) // 2
    R, R_down = quant.rows_per_line(GU, code, H), quant.rows_per_line(down_rows, code, N)
    gu = np.empty(2 * N, dtype=np.float32)
    c = np.empty(N, dtype=np.float32)
    for t in prange(n_threads):
        lo, hi = quant.thread_range(t, n_threads, N // R)
        quant.rows_dot_into(GU, code, H, x, xq, xd, R * lo, R * hi, gu)  # one stream at a time: its gate rows,
        quant.rows_dot_into(GU, code, H, x, xq, xd, N + R * lo, N + R * hi, gu)  # then its up rows
        for k in range(R * lo, R * hi):
            c[k] = gate_act(gu[k], act, shift) * up_act(gu[N + k], act)
    nb = quant.n_blocks(N) if code != quant.F32 else 0
    cq, cd = np.empty(nb * BLOCK, dtype=np.int8), np.empty(nb, dtype=np.float32)  # every value written below
    if code != quant.F32:
        quant.quantize_activation_into(c, cq, cd)
    for t in prange(n_threads):
        lo, hi = quant.thread_range(t, n_threads, H // R_down)
        quant.rows_dot_into(down_rows, code, N, c, cq, cd, R_down * lo, R_down * hi, y)
    rows_read[0] += N
    rows_read[1] += N
    rows_read[2] += N


# fmt: off
@njit(fastmath=FASTMATH, cache=True)
def layer_ffn_into(
    B, down_scale, gate_up, down_rows, code, H, x, xq, xd, idx, n, use_idx, skip_zeros, act, shift, n_threads, y,
    rows_read
):
    """One layer's FFN by the path that serves it: dense from the dense layout where ``gate_up`` is not empty
    (``dense_rows_into``), every other path (and dense without the layout) from the bundles (``ffn_into``, whose
    gate-first reads ``gate_up``'s gate rows when given). Arguments as theirs; the fused step and ``ffn`` call this."""
    if not use_idx and not skip_zeros and gate_up.shape[0] > 0:
        dense_rows_into(gate_up, down_rows, code, H, x, xq, xd, act, shift, n_threads, y, rows_read)
    else:
        ffn_into(
            B, down_scale, gate_up, code, H, x, xq, xd, idx, n, use_idx, skip_zeros, act, shift, n_threads, y,
            rows_read, prefetch_bytes_for(B.shape[1]),
        )
# fmt: on


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def combined_into(B, code, H, x, xq, xd, idx, n, use_idx, act, shift, c):
    """Combined values of neurons ``idx[:n]`` (or ``0..n-1``); the up row is read only where the gate fired."""
    seg = B.shape[1] // 3
    for k in prange(n):
        row = B[idx[k]] if use_idx else B[np.int64(k)]
        a = gate_act(quant.row_dot(row, 0, code, H, x, xq, xd), act, shift)
        c[k] = a * up_act(quant.row_dot(row, seg, code, H, x, xq, xd), act) if a != 0 else np.float32(0.0)


def _indices(bundles: FFNBundles, idx_K) -> tuple[np.ndarray, int, bool]:
    if idx_K is None:
        return np.empty(0, np.int64), bundles.neurons, False
    idx = ascending(idx_K, bundles.neurons)
    return idx, len(idx), True


def _listed(bundles: FFNBundles, idx_K) -> tuple[np.ndarray, int, bool]:
    idx = np.ascontiguousarray(idx_K, dtype=np.int64)
    if idx.ndim != 1 or (len(idx) and (idx.min() < 0 or idx.max() >= bundles.neurons)):
        raise IndexError(f"neuron indices must be 1-D and lie in [0, {bundles.neurons})")
    return idx, len(idx), True


def _one_layer(bundles: FFNBundles, x_H) -> None:
    if bundles.data.ndim != 2:
        raise ValueError(f"need one layer's bundles (N, bytes); got a stack {bundles.data.shape} (index it)")
    if np.shape(x_H) != (bundles.hidden,):
        raise ValueError(f"input has shape {np.shape(x_H)}; the FFN's hidden size is {bundles.hidden}")


def ffn(
    bundles: FFNBundles,
    x_H,
    idx_K=None,
    variant="drelu",
    skip_zeros: bool | None = None,
    rows_read: np.ndarray | None = None,
) -> np.ndarray:
    """The FFN of one layer on ``x_H``: dense over all neurons (``idx_K=None``) or over the listed ones.

    ``skip_zeros`` defaults to False for dense (every row read, the baseline) and True for sparse;
    ``skip_zeros=True`` with ``idx_K=None`` is the in-line exact-zero oracle. ``rows_read`` (int64 (3,)),
    if given, accumulates the gate, up and down rows read. Dense reads the dense layout where the bundles hold one
    (``dense_rows_into``), as the fused step does.
    """
    _one_layer(bundles, x_H)
    idx, n, use_idx = _indices(bundles, idx_K)
    skip = use_idx if skip_zeros is None else bool(skip_zeros)
    y = np.empty(bundles.hidden, np.float32)
    counts = np.zeros(3, np.int64) if rows_read is None else rows_read
    layer_ffn_into(
        bundles.data,
        bundles.down_scale,
        bundles.gate_up,
        bundles.down_rows,
        bundles.code,
        bundles.hidden,
        *quant.activation_for(bundles.code, x_H),
        idx,
        n,
        use_idx,
        skip,
        *variant_code(variant),
        numba.get_num_threads(),
        y,
        counts,
    )
    return y


def combined(bundles: FFNBundles, x_H, variant="drelu", idx_K=None) -> np.ndarray:
    """Combined values ``act(gate) * up_act(up)`` of every neuron (``idx_K=None``) or of the listed ones, in the
    order listed."""
    _one_layer(bundles, x_H)
    idx, n, use_idx = (np.empty(0, np.int64), bundles.neurons, False) if idx_K is None else _listed(bundles, idx_K)
    c = np.empty(n, np.float32)
    combined_into(
        bundles.data,
        bundles.code,
        bundles.hidden,
        *quant.activation_for(bundles.code, x_H),
        idx,
        n,
        use_idx,
        *variant_code(variant),
        c,
    )
    return c


def combined_ref(bundles: FFNBundles, x_H, variant="drelu") -> np.ndarray:
    """NumPy reference of ``combined`` over all neurons (the dequantised weights, the kernel's activation)."""
    x = quant.activation_ref(x_H, bundles.code)
    g, u = (bundles.part(k) for k in (0, 1))
    return combine_ref(quant.dequantize(g).astype(np.float64) @ x, quant.dequantize(u).astype(np.float64) @ x, variant)


def ffn_ref(bundles: FFNBundles, x_H, idx_K=None, variant="drelu") -> np.ndarray:
    """Eq. 4 of the paper with the mask given as indices, on the dequantised weights: (combined * mask) W_down."""
    c = combined_ref(bundles, x_H, variant).astype(np.float64)
    if idx_K is not None:
        mask = np.zeros(bundles.neurons, bool)
        mask[np.asarray(idx_K, np.int64)] = True
        c = c * mask
    return (c @ bundles.dequantized(2).astype(np.float64)).astype(np.float32)


@njit(fastmath=FASTMATH, cache=True)
def ffn_layers_into(
    B, down_scale, code, H, x_LH, offsets, idx, use_idx, skip_zeros, act, shift, n_threads, y_LH, rows_read
):
    """The FFN of every layer of a stack ``B`` (L, N, bytes) in turn, layer l on ``x_LH[l]`` over neurons
    ``idx[offsets[l]:offsets[l + 1]]`` (``use_idx``) or all: one token's FFNs in one call."""
    nb = quant.n_blocks(H)
    xq, xd = np.empty(nb * BLOCK, np.int8), np.empty(nb, np.float32)
    no_gate_rows = np.empty((0, 0), np.uint8)  # gate-first reads the bundles' gate rows
    for li in range(B.shape[0]):
        if code != quant.F32:
            quant.quantize_activation_into(x_LH[li], xq, xd)
        lo, hi = (offsets[li], offsets[li + 1]) if use_idx else (0, B.shape[1])
        ffn_into(
            B[li],
            down_scale[li],
            no_gate_rows,
            code,
            H,
            x_LH[li],
            xq,
            xd,
            idx[lo:hi],
            hi - lo,
            use_idx,
            skip_zeros,
            act,
            shift,
            n_threads,
            y_LH[li],
            rows_read,
            prefetch_bytes_for(B.shape[2]),
        )

"""Weight formats of the engine (float32, Q8_0, Q4_0) and their row kernels, each beside its NumPy reference.

A matrix in any format is a ``QMatrix``: ``data`` is ``uint8`` of shape ``(..., rows, row_bytes)``,
one row of ``cols`` weights per line, so that a row (a neuron, an output) is one contiguous read
in every format, and stacked layers are one more leading axis.

- ``f32``: the float32 bytes of the row (``4 * cols`` bytes).
- ``q8_0``: blocks of 32 weights, 34 bytes each: an IEEE half scale ``d`` then 32 int8 ``q``,
  weight = d * q, ``d = max|w| / 127`` (llama.cpp's Q8_0 layout: 8.5 bits per weight).
- ``q4_0``: blocks of 32 weights, 18 bytes each: ``d`` then 16 bytes, byte j holding weight j in
  its low nibble and weight j + 16 in its high one, weight = d * (nibble - 8) (llama.cpp's Q4_0
  layout: 4.5 bits per weight), ``d = -w_max / 8`` with ``w_max`` the weight of largest magnitude
  (llama.cpp's reference quantiser, byte for byte). ``method="search"`` instead keeps, per block,
  the scale ``-w_max / (8 - s)`` with the least squared error: a smaller weight error, but on
  SmolLM2 a worse perplexity (it gives up the exact largest weight), so it is not the default.

A Q matrix may also be held *interleaved* (``QMatrix.interleaved``, for the dense GEMVs): each stored row then
holds ``INTERLEAVE`` = 4 consecutive rows block by block (block 0 of rows 0-3, block 1 of rows 0-3, ...; a Q4_0
block group as the 4 scales, then the 4 x 16 nibble bytes), shape ``(..., rows / 4, 4 * row_bytes)``, llama.cpp's
repacking (``block_q4_0x4``). ``gemv`` reads four rows in one stream,
each activation block loaded once for the four, with the plain layout's results bit for bit; the row-indexed
kernels (``gather_gemv``, ``axpy_rows``, the bundles) need the plain layout.

A row whose length is not a multiple of 32 is padded with zero weights to whole blocks; the
activations are padded with zeros to match, so padding never changes a result.

Quantised dot products follow llama.cpp: the activation vector is quantised once to Q8_0
blocks (``quantize_activation``: int8 values, one float32 scale per block), each block's
product is an exact integer sum, and the float work is one multiply-add per block
(``inference.simd``). So a quantised kernel's reference is exact arithmetic on the dequantised
weights and the dequantised activation; the kernels differ from it only by float summation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange

from . import simd
from .kernels import FASTMATH

F32, Q8_0, Q4_0 = 0, 1, 2
FORMATS = {"f32": F32, "q8_0": Q8_0, "q4_0": Q4_0}
BLOCK = simd.BLOCK
_BLOCK_BYTES = {Q8_0: simd.Q8_BLOCK_BYTES, Q4_0: simd.Q4_BLOCK_BYTES}
INTERLEAVE = simd.INTERLEAVE


def format_code(fmt: str) -> int:
    try:
        return FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown weight format {fmt!r}; valid: {', '.join(FORMATS)}") from None


@njit(cache=True, fastmath=False, inline="always")
def n_blocks(cols):
    """Blocks of 32 that hold ``cols`` values (the last one zero-padded): the one place that rounds up, for Python
    callers and compiled kernels alike."""
    return (cols + BLOCK - 1) // BLOCK


@njit(cache=True, fastmath=False, inline="always")
def row_bytes_of(code, cols):
    """``row_bytes`` by format code, for compiled kernels."""
    if code == F32:
        return 4 * cols
    return n_blocks(cols) * (simd.Q8_BLOCK_BYTES if code == Q8_0 else simd.Q4_BLOCK_BYTES)


@njit(cache=True, fastmath=False, inline="always")
def rows_per_line(data, code, cols):
    """Rows of ``cols`` weights each stored row of ``data`` holds: 1, or ``INTERLEAVE`` for an interleaved matrix."""
    return data.shape[-1] // row_bytes_of(code, cols)


@njit(cache=True, fastmath=False, inline="always")
def matrix_rows(data, code, cols):
    """The rows of the matrix ``data`` (rows, row_bytes) or (rows / INTERLEAVE, INTERLEAVE * row_bytes) stands for."""
    return data.shape[-2] * rows_per_line(data, code, cols)


def row_bytes(cols: int, fmt: str) -> int:
    """Bytes of one row of ``cols`` weights in ``fmt`` (Q formats: whole blocks)."""
    code = format_code(fmt)
    return 4 * cols if code == F32 else n_blocks(cols) * _BLOCK_BYTES[code]


def bytes_per_weight(fmt: str) -> float:
    """Bytes per weight of a row whose length is a multiple of 32 (4, 34/32, 18/32)."""
    code = format_code(fmt)
    return 4.0 if code == F32 else _BLOCK_BYTES[code] / BLOCK


@dataclass
class QMatrix:
    """Rows of ``cols`` weights in format ``fmt``, ``data`` uint8 ``(..., rows, row_bytes)``, C-contiguous, or
    interleaved (Q formats): ``(..., rows / INTERLEAVE, INTERLEAVE * row_bytes)``."""

    data: np.ndarray
    fmt: str
    cols: int

    def __post_init__(self):
        self.code = format_code(self.fmt)
        if self.data.dtype != np.uint8 or not self.data.flags.c_contiguous or self.data.ndim < 2:
            raise ValueError(
                f"QMatrix data must be C-contiguous uint8 (..., rows, row_bytes); got "
                f"{self.data.dtype}{self.data.shape}"
            )
        rb = row_bytes(self.cols, self.fmt)
        if self.data.shape[-1] != rb and (self.code == F32 or self.data.shape[-1] != INTERLEAVE * rb):
            widths = f"{rb}" + ("" if self.code == F32 else f" (or {INTERLEAVE * rb} interleaved)")
            raise ValueError(
                f"{self.fmt} rows of {self.cols} weights take {widths} bytes; data has {self.data.shape[-1]}"
            )

    @property
    def interleave(self) -> int:
        """Rows per stored row: 1, or ``INTERLEAVE`` for an interleaved matrix."""
        return self.data.shape[-1] // row_bytes(self.cols, self.fmt)

    @property
    def rows(self) -> int:
        return self.data.shape[-2] * self.interleave

    def interleaved(self) -> QMatrix:
        """This matrix with ``INTERLEAVE`` rows per stored row, block by block (a copy), where it is in a Q format
        and its rows divide by ``INTERLEAVE``; else itself."""
        if self.code == F32 or self.interleave > 1 or self.rows % INTERLEAVE:
            return self
        lead, nb, bb, R = self.data.shape[:-2], n_blocks(self.cols), _BLOCK_BYTES[self.code], INTERLEAVE
        grouped = self.data.reshape(*lead, self.rows // R, R, nb, bb)
        blocks = np.swapaxes(grouped, -3, -2)  # (..., groups, nb, R, bb): block b of every row of a group
        if self.code == Q4_0:  # the R scales, then the R x 16 nibble bytes
            blocks = np.concatenate(
                [blocks[..., :2].reshape(*blocks.shape[:-2], -1), blocks[..., 2:].reshape(*blocks.shape[:-2], -1)], -1
            )
        data = np.ascontiguousarray(blocks).reshape(*lead, self.rows // R, -1)
        return QMatrix(data, self.fmt, self.cols)

    def plain(self) -> QMatrix:
        """This matrix one row per stored row (a copy where it is interleaved, else itself)."""
        if self.interleave == 1:
            return self
        lead, nb, bb, R = self.data.shape[:-2], n_blocks(self.cols), _BLOCK_BYTES[self.code], self.interleave
        lines = self.data.reshape(*lead, self.data.shape[-2], nb, R * bb)
        if self.code == Q4_0:
            scales, nibbles = lines[..., : 2 * R], lines[..., 2 * R :]
            blocks = np.concatenate(
                [scales.reshape(*lines.shape[:-1], R, 2), nibbles.reshape(*lines.shape[:-1], R, 16)], -1
            )
        else:
            blocks = lines.reshape(*lines.shape[:-1], R, bb)
        data = np.ascontiguousarray(np.swapaxes(blocks, -3, -2)).reshape(*lead, self.rows, nb * bb)
        return QMatrix(data, self.fmt, self.cols)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def __getitem__(self, i) -> QMatrix:
        """One matrix of a stack (``stack[layer]``), a view."""
        return QMatrix(self.data[i], self.fmt, self.cols)


def _f16_bytes(d: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(d.astype(np.float16))[..., None].view(np.uint8)


Q4_SCALE_STEPS = np.linspace(-1.0, 1.0, 17, dtype=np.float32)  # s of d = -w_max / (8 - s), s = 0 first


def quantize(W: np.ndarray, fmt: str, method: str = "reference") -> QMatrix:
    """``W`` (..., rows, cols) float -> ``QMatrix`` in ``fmt`` (the scales rounded to half precision).

    ``method`` (Q4_0 only): 'reference' (llama.cpp's ``d = -w_max / 8``, byte for byte) or 'search'
    (the least squared error over ``Q4_SCALE_STEPS``).
    """
    if method not in ("search", "reference"):
        raise ValueError(f"method must be 'search' or 'reference'; got {method!r}")
    W = np.asarray(W, dtype=np.float32)
    code = format_code(fmt)
    if W.ndim < 2:
        raise ValueError(f"quantize needs (..., rows, cols); got shape {W.shape}")
    cols = W.shape[-1]
    if code == F32:
        return QMatrix(np.ascontiguousarray(W).view(np.uint8), fmt, cols)
    nb = n_blocks(cols)
    Wb = np.zeros((*W.shape[:-1], nb * BLOCK), np.float32)
    Wb[..., :cols] = W
    Wb = Wb.reshape(*W.shape[:-1], nb, BLOCK)
    if code == Q8_0:
        d = np.abs(Wb).max(axis=-1) / np.float32(127)
        inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d > 0)
        q = _round_half_away(Wb * inv[..., None]).astype(np.int8)
        blocks = np.concatenate([_f16_bytes(d), q.view(np.uint8)], axis=-1)
    else:
        w_max = np.take_along_axis(Wb, np.abs(Wb).argmax(axis=-1)[..., None], axis=-1)[..., 0]
        steps = Q4_SCALE_STEPS if method == "search" else Q4_SCALE_STEPS[8:9]  # [0.0]: the reference
        best_err, d, nib = None, None, None
        for s in steps:
            d_s, nib_s = _q4_nibbles(Wb, w_max / (np.float32(-8) + s))
            err = np.square((nib_s.astype(np.float32) - 8) * d_s.astype(np.float32)[..., None] - Wb).sum(axis=-1)
            if best_err is None:
                best_err, d, nib = err, d_s, nib_s
            else:
                better = err < best_err
                best_err = np.where(better, err, best_err)
                d, nib = np.where(better, d_s, d), np.where(better[..., None], nib_s, nib)
        packed = nib[..., :16] | (nib[..., 16:] << 4)
        blocks = np.concatenate([_f16_bytes(d), packed], axis=-1)
    data = np.ascontiguousarray(blocks.reshape(*W.shape[:-1], nb * _BLOCK_BYTES[code]))
    return QMatrix(data, fmt, cols)


def _q4_nibbles(Wb: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0 nibbles of blocks ``Wb`` (..., 32) at scales ``d`` (as llama.cpp rounds: trunc(w / d + 8.5),
    at most 15); the scales as stored, in half precision."""
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0).astype(np.float32)
    nib = np.clip(np.trunc(Wb * inv[..., None] + np.float32(8.5)), 0, 15).astype(np.uint8)
    return d.astype(np.float16), nib


def _round_half_away(v: np.ndarray) -> np.ndarray:
    return np.trunc(v + np.copysign(np.float32(0.5), v))


def dequantize(Wq: QMatrix) -> np.ndarray:
    """The float32 weights a ``QMatrix`` stands for, (..., rows, cols): every kernel's reference."""
    Wq = Wq.plain()
    lead, cols = Wq.data.shape[:-1], Wq.cols
    if Wq.code == F32:
        return Wq.data.view(np.float32).reshape(*lead, cols)
    nb = n_blocks(cols)
    blocks = Wq.data.reshape(*lead, nb, _BLOCK_BYTES[Wq.code])
    d = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0].astype(np.float32)
    if Wq.code == Q8_0:
        q = blocks[..., 2:].view(np.int8).astype(np.float32)
    else:
        packed = blocks[..., 2:]
        q = np.concatenate([packed & 15, packed >> 4], axis=-1).astype(np.float32) - 8
    return (q * d[..., None]).reshape(*lead, nb * BLOCK)[..., :cols]


# ---------------------------------------------------------------------------------------------
# Activations: Q8_0 blocks, once per input vector


@njit(cache=True, fastmath=False)
def quantize_activation_into(x, xq, xd):
    # No fastmath: the rounding must equal the NumPy reference's bit for bit. Say so explicitly:
    # Numba lets a callee that leaves fastmath unset inherit it from a fastmath caller (the
    # engine's kernels), and with 'arcp' amax / 127 becomes amax * (1/127), one ulp off.
    n = x.shape[0]
    for b in range(xd.shape[0]):
        lo, hi = b * 32, min(n, b * 32 + 32)
        amax = np.float32(0.0)
        for j in range(lo, hi):
            amax = max(amax, abs(x[j]))
        d = amax / np.float32(127.0)
        inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
        for j in range(32):
            q = 0
            if lo + j < hi:
                v = x[lo + j] * inv
                q = int(v + np.float32(0.5)) if v >= 0 else -int(np.float32(0.5) - v)
            xq[lo + j] = q
        xd[b] = d


def quantize_activation(x_H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x (H,) float32 -> (int8 values, n_blocks * 32 long, zero-padded; float32 scale per block)."""
    x_H = np.ascontiguousarray(x_H, dtype=np.float32)
    nb = n_blocks(x_H.shape[0])
    xq, xd = np.empty(nb * BLOCK, np.int8), np.empty(nb, np.float32)
    quantize_activation_into(x_H, xq, xd)
    return xq, xd


def quantize_activation_ref(x_H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x_H = np.asarray(x_H, dtype=np.float32)
    nb = n_blocks(x_H.shape[0])
    xb = np.zeros(nb * BLOCK, np.float32)
    xb[: x_H.shape[0]] = x_H
    xb = xb.reshape(nb, BLOCK)
    d = np.abs(xb).max(axis=1) / np.float32(127)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d > 0)
    return _round_half_away(xb * inv[:, None]).astype(np.int8).reshape(-1), d


def dequantize_activation(xq: np.ndarray, xd: np.ndarray, cols: int) -> np.ndarray:
    return (xq.reshape(-1, BLOCK).astype(np.float64) * xd[:, None]).reshape(-1)[:cols]


def activation_ref(x_H: np.ndarray, code: int) -> np.ndarray:
    """The activation a kernel of format ``code`` effectively multiplies with (float64)."""
    if code == F32:
        return np.asarray(x_H, dtype=np.float64)
    return dequantize_activation(*quantize_activation_ref(x_H), len(x_H))


# ---------------------------------------------------------------------------------------------
# Row primitives, inlined into every kernel (``row`` is one flat uint8 row or bundle)


@njit(fastmath=FASTMATH, cache=True, inline="always")
def row_dot(row, offset, code, cols, x, xq, xd):
    """Weights ``row[offset:]`` (``cols`` of them in format ``code``) dotted with the activation:
    ``x`` (float32) for f32, ``(xq, xd)`` from ``quantize_activation`` for Q formats."""
    if code == F32:
        return simd.f32_dot(row, offset, x, cols)
    if code == Q8_0:
        return simd.q8_dot(row, offset, xq, xd, xd.shape[0])
    return simd.q4_dot(row, offset, xq, xd, xd.shape[0])


@njit(fastmath=FASTMATH, cache=True, inline="always")
def row_axpy(row, offset, code, cols, coef, y):
    """``y += coef * weights row[offset:]``; for Q formats ``y`` holds whole blocks (``n_blocks(cols) * 32``)."""
    if code == F32:
        w = row[offset : offset + 4 * cols].view(np.float32)
        for j in range(cols):
            y[j] += coef * w[j]
    elif code == Q8_0:
        simd.q8_axpy(row, offset, coef, y, n_blocks(cols))
    else:
        simd.q4_axpy(row, offset, coef, y, n_blocks(cols))


@njit(cache=True, fastmath=False, inline="always")
def thread_range(t, n_threads, n):
    """Items [lo, hi) of thread ``t`` when ``n`` items are split into ``n_threads`` contiguous ranges."""
    return t * n // n_threads, (t + 1) * n // n_threads


# ---------------------------------------------------------------------------------------------
# Kernels on whole matrices


@njit(cache=True, fastmath=False, inline="always")
def interleaved_block_into(line, code, R, slot, b, out):
    """Copy block ``b`` of row ``slot`` of the interleaved stored row ``line`` into ``out`` as a plain block."""
    if code == Q8_0:
        start = (b * R + slot) * simd.Q8_BLOCK_BYTES
        out[:] = line[start : start + simd.Q8_BLOCK_BYTES]
    else:
        start = b * R * simd.Q4_BLOCK_BYTES
        out[:2] = line[start + 2 * slot : start + 2 * slot + 2]
        out[2:] = line[start + 2 * R + 16 * slot : start + 2 * R + 16 * slot + 16]


@njit(fastmath=FASTMATH, cache=True, inline="always")
def group_dot_into(line, code, xq, xd, y, y_offset):
    """y[y_offset + i] = row i . x for the ``INTERLEAVE`` rows of one stored row ``line`` of an interleaved matrix."""
    if code == Q8_0:
        simd.q8_dot_rows(line, 0, xq, xd, xd.shape[0], y, y_offset)
    else:
        simd.q4_dot_rows(line, 0, xq, xd, xd.shape[0], y, y_offset)


@njit(fastmath=FASTMATH, cache=True, inline="always")
def rows_dot_into(data, code, cols, x, xq, xd, lo, hi, y):
    """y[r] = row r . x for rows [lo, hi) of ``data``, plain or interleaved (then ``lo`` and ``hi`` are multiples of
    ``INTERLEAVE``): one row at a time, or one interleaved group of rows at a time, in one stream."""
    R = rows_per_line(data, code, cols)
    if R == 1:
        for r in range(lo, hi):
            y[r] = row_dot(data[r], 0, code, cols, x, xq, xd)
    else:
        for g in range(lo // R, hi // R):
            group_dot_into(data[g], code, xq, xd, y, g * R)


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def gemv_into(data, code, cols, x, xq, xd, y):
    """y = W x for W = ``data`` (rows, row_bytes) or interleaved, in format ``code``; rows (or interleaved groups of
    rows) split evenly across threads."""
    R = rows_per_line(data, code, cols)
    for g in prange(data.shape[0]):
        rows_dot_into(data, code, cols, x, xq, xd, g * R, (g + 1) * R, y)


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _gather_gemv(data, code, cols, x, xq, xd, idx):
    y = np.empty(idx.shape[0], dtype=np.float32)
    for k in prange(idx.shape[0]):
        y[k] = row_dot(data[idx[k]], 0, code, cols, x, xq, xd)
    return y


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _axpy_rows(data, code, cols, coef, idx, n_threads):
    # each thread sums its own range of rows into its own partial vector: no race, one short reduction
    width = n_blocks(cols) * BLOCK
    partial = np.zeros((n_threads, width), dtype=np.float32)
    for t in prange(n_threads):
        lo, hi = thread_range(t, n_threads, idx.shape[0])
        for k in range(lo, hi):
            row_axpy(data[idx[k]], 0, code, cols, coef[k], partial[t])
    y = np.zeros(cols, dtype=np.float32)
    for t in range(n_threads):
        for j in range(cols):
            y[j] += partial[t, j]
    return y


def activation_for(code: int, x_H: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x, xq, xd)`` as the kernels take them: the Q8_0 activation only for Q formats (else empty)."""
    x_H = np.ascontiguousarray(x_H, dtype=np.float32)
    if code == F32:
        return x_H, np.empty(0, np.int8), np.empty(0, np.float32)
    return (x_H, *quantize_activation(x_H))


def _check(W: QMatrix, x_H: np.ndarray | None = None, idx: np.ndarray | None = None) -> None:
    if W.data.ndim != 2:
        raise ValueError(f"need one matrix (rows, row_bytes); got a stack {W.data.shape} (index it: W[layer])")
    if idx is not None and W.interleave > 1:
        raise ValueError("rows are read one by one here: pass the plain layout (W.plain()), not an interleaved one")
    if x_H is not None and np.shape(x_H) != (W.cols,):
        raise ValueError(f"input has shape {np.shape(x_H)}; the matrix has {W.cols} columns")
    if idx is not None and len(idx) and (np.min(idx) < 0 or np.max(idx) >= W.rows):
        raise IndexError(f"row indices must lie in [0, {W.rows})")


def gemv(W: QMatrix, x_H: np.ndarray) -> np.ndarray:
    """y = W x for a ``QMatrix`` in any format (the Q formats quantise x to Q8_0 blocks first)."""
    _check(W, x_H)
    y = np.empty(W.rows, np.float32)
    gemv_into(W.data, W.code, W.cols, *activation_for(W.code, x_H), y)
    return y


def gemv_ref(W: QMatrix, x_H: np.ndarray) -> np.ndarray:
    return (dequantize(W).astype(np.float64) @ activation_ref(x_H, W.code)).astype(np.float32)


def gather_gemv(W: QMatrix, x_H: np.ndarray, idx_K: np.ndarray) -> np.ndarray:
    """y[k] = W[idx[k]] . x: only the K listed rows are read."""
    _check(W, x_H, idx_K)
    return _gather_gemv(W.data, W.code, W.cols, *activation_for(W.code, x_H), np.asarray(idx_K, np.int64))


def gather_gemv_ref(W: QMatrix, x_H: np.ndarray, idx_K: np.ndarray) -> np.ndarray:
    return (dequantize(W)[np.asarray(idx_K, np.int64)].astype(np.float64) @ activation_ref(x_H, W.code)).astype(
        np.float32
    )


def axpy_rows(W: QMatrix, coef_K: np.ndarray, idx_K: np.ndarray) -> np.ndarray:
    """y = sum_k coef[k] * W[idx[k], :], a vector of W's ``cols``; rows split across threads."""
    _check(W, None, idx_K)
    coef_K = np.ascontiguousarray(coef_K, dtype=np.float32)
    if coef_K.shape != np.shape(idx_K):
        raise ValueError(f"{coef_K.shape[0]} coefficients for {len(idx_K)} rows")
    return _axpy_rows(W.data, W.code, W.cols, coef_K, np.asarray(idx_K, np.int64), numba.get_num_threads())


def axpy_rows_ref(W: QMatrix, coef_K: np.ndarray, idx_K: np.ndarray) -> np.ndarray:
    rows = dequantize(W)[np.asarray(idx_K, np.int64)].astype(np.float64)
    return (np.asarray(coef_K, np.float64) @ rows).astype(np.float32) if len(idx_K) else np.zeros(W.cols, np.float32)

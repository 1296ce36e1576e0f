"""Numba GEMV kernels for dense and activation-sparse decoding, each beside its NumPy reference.

Decoding one token is a chain of matrix-vector products whose cost is reading the weights
once. An activation-sparse FFN (Turbo Sparse section 7, as run by PowerInfer) reads only the
rows of the neurons that fire, so its cost falls with the fraction of active neurons.

Design:

- Weights are float32 and C-contiguous, stored ``(out, in)`` like ``nn.Linear.weight``, so a
  gate or up neuron is one contiguous row and a sparse gate/up is a gather over active rows.
- The down projection is kept transposed, ``W_down_T`` of shape ``(intermediate, hidden)``, one
  contiguous row per neuron (the PowerInfer layout): the sparse down projection is an axpy
  ``y = sum_i c_i * W_down_T[i, :]`` over active neurons, reading only their rows.
- The axpy is parallelised over output chunks, one per thread: every thread walks all active
  neurons but writes only its own slice of ``y``, so there is no race and no reduction step.
- ``fastmath`` is limited to ``_FASTMATH`` (reassociation, contraction, ...): dot products
  vectorise, while NaN/Inf semantics stay intact, so ``g > 0`` and ``c != 0`` tests stay exact.
- int8 weights use symmetric per-row scales; a row is dequantised on the fly inside the dot
  product (``scale[r] * sum(q[r, j] * x[j])``), so no float copy of the matrix is ever made.
- Gated-MLP variants come from the one registry, ``models.variants.VARIANTS``: each is a gate
  activation and an up activation, and kernels take the integer code the registry derives
  (``variant_code``), since an integer branch inside a Numba loop is cheaper than a string. Any
  variant built from the registry's activations runs here with no change to this module.
- Index arrays of active neurons are int64 (int32 also works, at the cost of one more compile);
  they need not be sorted, but must be duplicate-free (a duplicate would be counted twice).
- ``validate_kernels()`` runs every kernel against its reference, which also JIT-compiles
  them (``cache=True`` keeps the machine code on disk), so the first call is never timed.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

from ..models.variants import VARIANTS, get_variant

# Every LLVM fast-math flag except 'nnan' and 'ninf': reductions may be reordered and fused,
# but comparisons with zero keep their IEEE meaning.
_FASTMATH = {"reassoc", "contract", "arcp", "nsz", "afn"}



def variant_code(variant, **variant_kwargs) -> tuple[int, np.float32]:
    """``(code, shift)`` of a gated-MLP variant of the one registry (``models.variants``), for the kernels.

    ``variant`` is a registry name, or an already resolved ``(code, shift)`` pair (passed through).
    """
    if isinstance(variant, tuple):
        return int(variant[0]), np.float32(variant[1])
    code, shift = get_variant(variant).kernel_code(**variant_kwargs)
    return code, np.float32(shift)


# ---------------------------------------------------------------------------------------------
# Row dot products (inlined into the kernels below)


@njit(fastmath=_FASTMATH, cache=True, inline="always")
def _row_dot(W, r, x):
    acc = np.float32(0.0)
    for j in range(x.shape[0]):
        acc += W[r, j] * x[j]
    return acc


@njit(fastmath=_FASTMATH, cache=True, inline="always")
def _row_dot_q(Wq, scale, r, x):
    acc = np.float32(0.0)
    for j in range(x.shape[0]):
        acc += np.float32(Wq[r, j]) * x[j]
    return acc * scale[r]


@njit(fastmath=_FASTMATH, cache=True, inline="always")
def _gate_act(g, code, shift):
    """The gate activation of variant ``code`` (codes: ``models.variants.GATE_ACTIVATIONS``)."""
    gate = code >> 1
    if gate == 0:  # silu
        return g / (np.float32(1.0) + np.float32(math.exp(-g)))
    if gate == 1:  # gelu, tanh approximation (transformers' gelu_pytorch_tanh)
        inner = np.float32(0.7978845608028654) * (g + np.float32(0.044715) * g * g * g)
        return np.float32(0.5) * g * (np.float32(1.0) + np.float32(math.tanh(inner)))
    if gate == 2:  # relu
        return g if g > 0 else np.float32(0.0)
    if gate == 3:  # shifted relu: relu(g - b)
        return g - shift if g > shift else np.float32(0.0)
    return g * g if g > 0 else np.float32(0.0)  # relu2


@njit(fastmath=_FASTMATH, cache=True, inline="always")
def _up_act(u, code):
    if code & 1:  # relu on the up branch (dReLU)
        return u if u > 0 else np.float32(0.0)
    return u


@njit(fastmath=_FASTMATH, cache=True, inline="always")
def _combine(g, u, code, shift):
    """combined = gate_act(g) * up_act(u) for one neuron; 0 exactly wherever a ReLU branch is off."""
    return _gate_act(g, code, shift) * _up_act(u, code)


def combine_ref(g: np.ndarray, u: np.ndarray, variant) -> np.ndarray:
    """NumPy reference of the gated-MLP combination, any leading shape; ``variant`` as in ``variant_code``."""
    code, shift = variant_code(variant)
    g, u = np.asarray(g, dtype=np.float32), np.asarray(u, dtype=np.float32)
    gate = code >> 1
    with np.errstate(over="ignore"):  # exp(-g) = inf for g << 0 gives silu(g) = -0, as wanted
        if gate == 0:
            a = g / (np.float32(1) + np.exp(-g))
        elif gate == 1:
            a = 0.5 * g * (1 + np.tanh(np.float32(0.7978845608028654) * (g + np.float32(0.044715) * g**3)))
        elif gate == 2:
            a = np.maximum(g, 0)
        elif gate == 3:
            a = np.maximum(g - shift, 0)
        else:
            a = np.maximum(g, 0) ** 2
    return (a * (np.maximum(u, 0) if code & 1 else u)).astype(np.float32)


@njit(fastmath=_FASTMATH, cache=True)
def _gate_act_vec(g_N, code, shift):
    a_N = np.empty(g_N.shape[0], dtype=np.float32)
    for r in range(g_N.shape[0]):
        a_N[r] = _gate_act(g_N[r], code, shift)
    return a_N


def gate_activation(g_N: np.ndarray, variant) -> np.ndarray:
    """The variant's gate activation on a vector (what an exact-zero oracle tests against 0)."""
    return _gate_act_vec(np.ascontiguousarray(g_N, dtype=np.float32), *variant_code(variant))


@njit(fastmath=_FASTMATH, cache=True)
def _combine_vec(g_N, u_N, code, shift):
    c_N = np.empty(g_N.shape[0], dtype=np.float32)
    for r in range(g_N.shape[0]):
        c_N[r] = _combine(g_N[r], u_N[r], code, shift)
    return c_N


# ---------------------------------------------------------------------------------------------
# Dense GEMV, float32 and int8


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def gemv(W_OI, x_I):
    """y = W x for W of shape (out, in); the rows are split evenly across threads."""
    y_O = np.empty(W_OI.shape[0], dtype=np.float32)
    for r in prange(W_OI.shape[0]):
        y_O[r] = _row_dot(W_OI, r, x_I)
    return y_O


def gemv_ref(W_OI: np.ndarray, x_I: np.ndarray) -> np.ndarray:
    return W_OI @ x_I


def quantize_int8_rows(W_OI: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8: ``W ~ q * scale[:, None]`` with ``|q| <= 127``.

    The rounding error is at most ``scale / 2 = max|row| / 254`` per element. An all-zero row
    gets scale 1 (so dequantisation never divides by zero) and stays exactly zero.
    """
    W_OI = np.asarray(W_OI, dtype=np.float32)
    absmax_O = np.abs(W_OI).max(axis=1)
    scale_O = np.where(absmax_O > 0, absmax_O / 127.0, 1.0).astype(np.float32)
    q_OI = np.clip(np.rint(W_OI / scale_O[:, None]), -127, 127).astype(np.int8)
    return np.ascontiguousarray(q_OI), scale_O


def dequantize_int8_rows(q_OI: np.ndarray, scale_O: np.ndarray) -> np.ndarray:
    return q_OI.astype(np.float32) * scale_O[:, None]


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def gemv_int8(q_OI, scale_O, x_I):
    """y = dequant(q, scale) x without materialising the float matrix."""
    y_O = np.empty(q_OI.shape[0], dtype=np.float32)
    for r in prange(q_OI.shape[0]):
        y_O[r] = _row_dot_q(q_OI, scale_O, r, x_I)
    return y_O


def gemv_int8_ref(q_OI: np.ndarray, scale_O: np.ndarray, x_I: np.ndarray) -> np.ndarray:
    return dequantize_int8_rows(q_OI, scale_O) @ x_I


# ---------------------------------------------------------------------------------------------
# Sparse gate/up: a gather over the active rows


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def gather_gemv(W_NH, x_H, idx_K):
    """y[k] = W[idx[k]] . x: only the K listed rows of W (N neurons, H inputs) are read."""
    y_K = np.empty(idx_K.shape[0], dtype=np.float32)
    for k in prange(idx_K.shape[0]):
        y_K[k] = _row_dot(W_NH, idx_K[k], x_H)
    return y_K


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def gather_gemv_int8(q_NH, scale_N, x_H, idx_K):
    y_K = np.empty(idx_K.shape[0], dtype=np.float32)
    for k in prange(idx_K.shape[0]):
        y_K[k] = _row_dot_q(q_NH, scale_N, idx_K[k], x_H)
    return y_K


def gather_gemv_ref(W_NH: np.ndarray, x_H: np.ndarray, idx_K: np.ndarray) -> np.ndarray:
    return (W_NH[idx_K] @ x_H).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Sparse down projection: an axpy over active neurons, rows of W_down_T


@njit(cache=True, inline="always")
def _output_chunks(H, n_threads):
    """Split H outputs into one chunk per thread, chunk length a multiple of 16 floats.

    ``n_threads`` is an argument because ``numba.get_num_threads()`` inside a kernel would stop
    ``cache=True`` from writing it to disk; the Python wrappers pass the current count.
    """
    chunk = ((H + n_threads - 1) // n_threads + 15) // 16 * 16
    return chunk, (H + chunk - 1) // chunk


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _axpy_rows(WT_NH, coef_K, idx_K, n_threads):
    H = WT_NH.shape[1]
    y_H = np.zeros(H, dtype=np.float32)
    chunk, n_chunks = _output_chunks(H, n_threads)
    for c in prange(n_chunks):
        lo, hi = c * chunk, min(H, (c + 1) * chunk)
        # 1-D views: this loop form vectorises, while y_H[j] += a * WT_NH[r, j] ran ~3x slower
        y_C = y_H[lo:hi]
        for k in range(idx_K.shape[0]):
            a, row_C = coef_K[k], WT_NH[idx_K[k], lo:hi]
            for j in range(hi - lo):
                y_C[j] += a * row_C[j]
    return y_H


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _axpy_rows_int8(qT_NH, scaleT_N, coef_K, idx_K, n_threads):
    H = qT_NH.shape[1]
    y_H = np.zeros(H, dtype=np.float32)
    chunk, n_chunks = _output_chunks(H, n_threads)
    for c in prange(n_chunks):
        lo, hi = c * chunk, min(H, (c + 1) * chunk)
        y_C = y_H[lo:hi]
        for k in range(idx_K.shape[0]):
            r = idx_K[k]
            a, row_C = coef_K[k] * scaleT_N[r], qT_NH[r, lo:hi]
            for j in range(hi - lo):
                y_C[j] += a * np.float32(row_C[j])
    return y_H


def axpy_rows(WT_NH, coef_K, idx_K) -> np.ndarray:
    """y = sum_k coef[k] * WT[idx[k], :], parallel over output chunks (no two threads share a y)."""
    return _axpy_rows(WT_NH, coef_K, idx_K, numba.get_num_threads())


def axpy_rows_int8(qT_NH, scaleT_N, coef_K, idx_K) -> np.ndarray:
    """As ``axpy_rows`` on per-neuron int8 rows: the row scale folds into the coefficient."""
    return _axpy_rows_int8(qT_NH, scaleT_N, coef_K, idx_K, numba.get_num_threads())


def axpy_rows_ref(WT_NH: np.ndarray, coef_K: np.ndarray, idx_K: np.ndarray) -> np.ndarray:
    return (coef_K @ WT_NH[idx_K]).astype(np.float32)  # K = 0 gives zeros(H)


# ---------------------------------------------------------------------------------------------
# FFN: dense reference path and the fused sparse path


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _gate_up_dense(Wg_NH, Wu_NH, x_H, code, shift):
    c_N = np.empty(Wg_NH.shape[0], dtype=np.float32)
    for r in prange(Wg_NH.shape[0]):
        c_N[r] = _combine(_row_dot(Wg_NH, r, x_H), _row_dot(Wu_NH, r, x_H), code, shift)
    return c_N


def combined_dense(x_H, w_gate_NH, w_up_NH, variant: str = "swiglu") -> np.ndarray:
    """combined (N,) over all neurons in one pass over gate and up (what oracles need)."""
    return _gate_up_dense(w_gate_NH, w_up_NH, x_H, *variant_code(variant))


def ffn_dense(x_H, w_gate_NH, w_up_NH, w_down_HN, variant: str = "swiglu") -> np.ndarray:
    """Dense gated MLP, the baseline: gate and up over all N neurons, then a dense down GEMV.

    Gate and up are read in one pass (one row of each per neuron); ``w_down_HN`` is the
    ``nn.Linear`` layout (hidden, intermediate), as llama.cpp would read it.
    """
    c_N = _gate_up_dense(w_gate_NH, w_up_NH, x_H, *variant_code(variant))
    return gemv(w_down_HN, c_N)


def ffn_dense_int8(x_H, gate_q, up_q, down_q, variant: str = "swiglu") -> np.ndarray:
    """``ffn_dense`` on int8 weights, each ``*_q`` a ``(q, scale)`` pair; ``down_q`` is (hidden, N)."""
    c_N = _combine_vec(gemv_int8(*gate_q, x_H), gemv_int8(*up_q, x_H), *variant_code(variant))
    return gemv_int8(*down_q, c_N)


def ffn_dense_ref(x_H, w_gate_NH, w_up_NH, w_down_HN, variant: str = "swiglu") -> np.ndarray:
    return w_down_HN @ combine_ref(w_gate_NH @ x_H, w_up_NH @ x_H, variant)


@njit(cache=True)
def _drop_zeros(c_K, idx_K):
    """The (coefficient, neuron) pairs whose combined value is not exactly zero (serial, O(K))."""
    live_K = c_K != 0
    return c_K[live_K], idx_K[live_K]


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _ffn_sparse(Wg_NH, Wu_NH, WdT_NH, x_H, idx_K, code, shift, n_threads):
    # 1. combined values of the active neurons only. The up row is read only where the gate's
    #    activation is not exactly zero: with a ReLU-family gate, a predicted neuron that is in
    #    fact off costs one row.
    c_K = np.empty(idx_K.shape[0], dtype=np.float32)
    for k in prange(idx_K.shape[0]):
        r = idx_K[k]
        a = _gate_act(_row_dot(Wg_NH, r, x_H), code, shift)
        c_K[k] = a * _up_act(_row_dot(Wu_NH, r, x_H), code) if a != 0 else np.float32(0.0)
    # 2. exact zeros contribute nothing: leave their W_down_T rows unread.
    c_L, idx_L = _drop_zeros(c_K, idx_K)
    # 3. y = sum over live neurons of c * W_down_T[row], parallel over output chunks.
    return _axpy_rows(WdT_NH, c_L, idx_L, n_threads)


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _ffn_sparse_int8(qg_NH, sg_N, qu_NH, su_N, qdT_NH, sdT_N, x_H, idx_K, code, shift, n_threads):
    c_K = np.empty(idx_K.shape[0], dtype=np.float32)
    for k in prange(idx_K.shape[0]):
        r = idx_K[k]
        a = _gate_act(_row_dot_q(qg_NH, sg_N, r, x_H), code, shift)
        c_K[k] = a * _up_act(_row_dot_q(qu_NH, su_N, r, x_H), code) if a != 0 else np.float32(0.0)
    c_L, idx_L = _drop_zeros(c_K, idx_K)
    return _axpy_rows_int8(qdT_NH, sdT_N, c_L, idx_L, n_threads)


def ffn_sparse(x_H, w_gate_NH, w_up_NH, w_down_T_NH, idx_K, variant: str = "drelu") -> np.ndarray:
    """Fused activation-sparse FFN over the active neurons ``idx_K`` (from an oracle or predictor).

    Gate and up are computed on the active rows only, neurons whose combined value is exactly
    zero are skipped, and the down projection is an axpy over rows of ``w_down_T_NH``
    (intermediate, hidden). With ``idx_K`` = all neurons it equals ``ffn_dense``.
    """
    return _ffn_sparse(w_gate_NH, w_up_NH, w_down_T_NH, x_H, idx_K, *variant_code(variant), numba.get_num_threads())


def ffn_sparse_int8(x_H, gate_q, up_q, down_T_q, idx_K, variant: str = "drelu") -> np.ndarray:
    """``ffn_sparse`` on int8 weights; each ``*_q`` is a ``(q, scale)`` pair from ``quantize_int8_rows``."""
    (qg, sg), (qu, su), (qd, sd) = gate_q, up_q, down_T_q
    return _ffn_sparse_int8(qg, sg, qu, su, qd, sd, x_H, idx_K, *variant_code(variant), numba.get_num_threads())


def ffn_sparse_ref(x_H, w_gate_NH, w_up_NH, w_down_T_NH, idx_K, variant: str = "drelu") -> np.ndarray:
    """Eq. 4 of the paper with the mask given as indices: (combined * mask) W_down."""
    mask_N = np.zeros(w_gate_NH.shape[0], dtype=bool)
    mask_N[idx_K] = True
    c_N = combine_ref(w_gate_NH @ x_H, w_up_NH @ x_H, variant) * mask_N
    return (c_N @ w_down_T_NH).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Validation (also the JIT warm-up)


def _assert_close(name: str, got: np.ndarray, want: np.ndarray, rtol: float = 2e-4) -> float:
    """Max error relative to the reference's scale; float32 sums in another order differ a little."""
    if got.shape != want.shape or got.dtype != np.float32:
        raise AssertionError(f"{name}: got {got.dtype}{got.shape}, want float32{want.shape}")
    err = float(np.max(np.abs(got - want), initial=0.0))
    scale = float(np.max(np.abs(want), initial=0.0)) + 1e-6
    if err > rtol * scale:
        raise AssertionError(f"{name}: max |error| {err:.3g} exceeds {rtol} x {scale:.3g}")
    return err / scale


def validate_kernels(seed: int = 0, shapes=((1, 1), (7, 33), (257, 96), (64, 1000))) -> dict[str, float]:
    """Run every kernel against its NumPy reference on random (N neurons, H hidden) shapes.

    Compiles every kernel for float32/int64 inputs first, so call it before timing anything.
    Raises AssertionError on a mismatch; returns the worst relative error of each kernel.
    """
    rng = np.random.default_rng(seed)
    worst: dict[str, float] = {}

    def check(name, got, want, rtol=2e-4):
        worst[name] = max(worst.get(name, 0.0), _assert_close(name, got, want, rtol))

    for N, H in shapes:
        # 1/sqrt(fan-in) weights keep activations O(1), as in a trained model
        Wg, Wu = (rng.standard_normal((N, H), dtype=np.float32) / np.float32(np.sqrt(H)) for _ in range(2))
        WdT = rng.standard_normal((N, H), dtype=np.float32) / np.float32(np.sqrt(N))
        Wd = np.ascontiguousarray(WdT.T)
        x = rng.standard_normal(H, dtype=np.float32)
        qg, qu, qd = quantize_int8_rows(Wg), quantize_int8_rows(Wu), quantize_int8_rows(WdT)
        idx_sets = {
            "none": np.empty(0, np.int64),
            "one": np.array([N - 1], np.int64),
            "half_sorted": np.sort(rng.permutation(N)[: max(1, N // 2)]).astype(np.int64),
            "unsorted": rng.permutation(N).astype(np.int64)[: max(1, (2 * N) // 3)],
            "all": np.arange(N, dtype=np.int64),
        }
        check("gemv", gemv(Wg, x), gemv_ref(Wg, x))
        check("gemv_int8", gemv_int8(*qg, x), gemv_int8_ref(*qg, x))
        deq = [dequantize_int8_rows(*q) for q in (qg, qu, qd)]
        qd_dense = quantize_int8_rows(Wd)
        for variant in VARIANTS:  # every registered variant, with its default arguments
            check(f"ffn_dense[{variant}]", ffn_dense(x, Wg, Wu, Wd, variant), ffn_dense_ref(x, Wg, Wu, Wd, variant))
            check(
                f"ffn_dense_int8[{variant}]",
                ffn_dense_int8(x, qg, qu, qd_dense, variant),
                ffn_dense_ref(x, deq[0], deq[1], dequantize_int8_rows(*qd_dense), variant),
                rtol=1e-3,
            )
        for idx in idx_sets.values():
            coef = rng.standard_normal(len(idx), dtype=np.float32)
            check("gather_gemv", gather_gemv(Wg, x, idx), gather_gemv_ref(Wg, x, idx))
            check("gather_gemv_int8", gather_gemv_int8(*qg, x, idx), gather_gemv_ref(deq[0], x, idx))
            check("axpy_rows", axpy_rows(WdT, coef, idx), axpy_rows_ref(WdT, coef, idx))
            check("axpy_rows_int8", axpy_rows_int8(*qd, coef, idx), axpy_rows_ref(deq[2], coef, idx))
            for variant in VARIANTS:  # every registered variant, with its default arguments
                check(
                    f"ffn_sparse[{variant}]",
                    ffn_sparse(x, Wg, Wu, WdT, idx, variant),
                    ffn_sparse_ref(x, Wg, Wu, WdT, idx, variant),
                )
                check(
                    f"ffn_sparse_int8[{variant}]",
                    ffn_sparse_int8(x, qg, qu, qd, idx, variant),
                    ffn_sparse_ref(x, *deq, idx, variant),
                    rtol=1e-3,
                )
    return worst

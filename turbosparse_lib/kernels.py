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
- Gated-MLP variants are chosen by name (``VARIANTS``); kernels take the integer code, since
  an integer branch inside a Numba loop is cheaper and simpler than a string.
- Index arrays of active neurons are int64 (int32 also works, at the cost of one more compile);
  they need not be sorted, but must be duplicate-free (a duplicate would be counted twice).
- ``validate_kernels()`` runs every kernel against its reference, which also JIT-compiles
  them (``cache=True`` keeps the machine code on disk), so the first call is never timed.
"""

from __future__ import annotations

import math
import os

import numba
import numpy as np
from numba import njit, prange

# Every LLVM fast-math flag except 'nnan' and 'ninf': reductions may be reordered and fused,
# but comparisons with zero keep their IEEE meaning.
_FASTMATH = {"reassoc", "contract", "arcp", "nsz", "afn"}

# Gated-MLP variants the kernels implement: combined = act(gate) * up, except dReLU
# (paper eq. 2), which puts a ReLU on both branches.
VARIANTS = {"swiglu": 0, "reglu": 1, "drelu": 2}
_SWIGLU, _REGLU, _DRELU = 0, 1, 2


def variant_code(variant: str) -> int:
    """The integer code of a gated-MLP variant name, with an error that lists the valid names."""
    try:
        return VARIANTS[variant]
    except KeyError:
        raise ValueError(
            f"unsupported MLP variant {variant!r}; the kernels implement {sorted(VARIANTS)}"
        ) from None


# ---------------------------------------------------------------------------------------------
# Threads


def set_threads(n: int) -> None:
    """Use ``n`` threads in Numba kernels and in torch (the baselines timed beside them)."""
    import torch

    max_n = numba.config.NUMBA_NUM_THREADS
    if not 1 <= n <= max_n:
        raise ValueError(f"threads must be in [1, {max_n}] (NUMBA_NUM_THREADS); got {n}")
    numba.set_num_threads(n)
    torch.set_num_threads(n)


def thread_info() -> dict:
    """Thread settings to print beside every timing."""
    import torch

    try:  # only known once a parallel kernel has run
        layer = numba.threading_layer()
    except ValueError:
        layer = "not yet initialised"
    return {
        "numba_threads": numba.get_num_threads(),
        "numba_max_threads": numba.config.NUMBA_NUM_THREADS,
        "numba_threading_layer": layer,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        # NumPy's BLAS (used by Engine.prefill) follows these variables, not set_threads().
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
    }


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
def _combine(g, u, code):
    """combined = act(g) * u for one neuron; 0 exactly wherever a ReLU branch is off."""
    if code == _SWIGLU:
        return g / (np.float32(1.0) + np.float32(math.exp(-g))) * u
    if g <= 0:  # reglu and drelu: ReLU on the gate
        return np.float32(0.0)
    if code == _DRELU and u <= 0:  # drelu only: ReLU on the up branch too
        return np.float32(0.0)
    return g * u


def combine_ref(g: np.ndarray, u: np.ndarray, variant: str) -> np.ndarray:
    """NumPy reference of the gated-MLP combination, any leading shape."""
    variant_code(variant)
    if variant == "swiglu":
        with np.errstate(over="ignore"):  # exp(-g) = inf for g << 0 gives silu(g) = -0, as wanted
            return (g / (1.0 + np.exp(-g)) * u).astype(np.float32)
    if variant == "reglu":
        return np.maximum(g, 0) * u
    return np.maximum(g, 0) * np.maximum(u, 0)  # drelu, eq. 2


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
def _gate_up_dense(Wg_NH, Wu_NH, x_H, code):
    c_N = np.empty(Wg_NH.shape[0], dtype=np.float32)
    for r in prange(Wg_NH.shape[0]):
        c_N[r] = _combine(_row_dot(Wg_NH, r, x_H), _row_dot(Wu_NH, r, x_H), code)
    return c_N


def combined_dense(x_H, w_gate_NH, w_up_NH, variant: str = "swiglu") -> np.ndarray:
    """combined (N,) over all neurons in one pass over gate and up (what oracles need)."""
    return _gate_up_dense(w_gate_NH, w_up_NH, x_H, variant_code(variant))


def ffn_dense(x_H, w_gate_NH, w_up_NH, w_down_HN, variant: str = "swiglu") -> np.ndarray:
    """Dense gated MLP, the baseline: gate and up over all N neurons, then a dense down GEMV.

    Gate and up are read in one pass (one row of each per neuron); ``w_down_HN`` is the
    ``nn.Linear`` layout (hidden, intermediate), as llama.cpp would read it.
    """
    c_N = _gate_up_dense(w_gate_NH, w_up_NH, x_H, variant_code(variant))
    return gemv(w_down_HN, c_N)


def ffn_dense_int8(x_H, gate_q, up_q, down_q, variant: str = "swiglu") -> np.ndarray:
    """``ffn_dense`` on int8 weights, each ``*_q`` a ``(q, scale)`` pair; ``down_q`` is (hidden, N)."""
    c_N = combine_ref(gemv_int8(*gate_q, x_H), gemv_int8(*up_q, x_H), variant)
    return gemv_int8(*down_q, c_N)


def ffn_dense_ref(x_H, w_gate_NH, w_up_NH, w_down_HN, variant: str = "swiglu") -> np.ndarray:
    return w_down_HN @ combine_ref(w_gate_NH @ x_H, w_up_NH @ x_H, variant)


@njit(cache=True)
def _drop_zeros(c_K, idx_K):
    """The (coefficient, neuron) pairs whose combined value is not exactly zero (serial, O(K))."""
    live_K = c_K != 0
    return c_K[live_K], idx_K[live_K]


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _ffn_sparse(Wg_NH, Wu_NH, WdT_NH, x_H, idx_K, code, n_threads):
    # 1. combined values of the active neurons only. With a ReLU gate (reglu, drelu) the up row
    #    is read only where the gate fired: a predicted neuron that is in fact off costs one row.
    c_K = np.empty(idx_K.shape[0], dtype=np.float32)
    for k in prange(idx_K.shape[0]):
        r = idx_K[k]
        g = _row_dot(Wg_NH, r, x_H)
        if code != _SWIGLU and g <= 0:
            c_K[k] = 0.0
        else:
            c_K[k] = _combine(g, _row_dot(Wu_NH, r, x_H), code)
    # 2. exact zeros contribute nothing: leave their W_down_T rows unread.
    c_L, idx_L = _drop_zeros(c_K, idx_K)
    # 3. y = sum over live neurons of c * W_down_T[row], parallel over output chunks.
    return _axpy_rows(WdT_NH, c_L, idx_L, n_threads)


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _ffn_sparse_int8(qg_NH, sg_N, qu_NH, su_N, qdT_NH, sdT_N, x_H, idx_K, code, n_threads):
    c_K = np.empty(idx_K.shape[0], dtype=np.float32)
    for k in prange(idx_K.shape[0]):
        r = idx_K[k]
        g = _row_dot_q(qg_NH, sg_N, r, x_H)
        if code != _SWIGLU and g <= 0:
            c_K[k] = 0.0
        else:
            c_K[k] = _combine(g, _row_dot_q(qu_NH, su_N, r, x_H), code)
    c_L, idx_L = _drop_zeros(c_K, idx_K)
    return _axpy_rows_int8(qdT_NH, sdT_N, c_L, idx_L, n_threads)


def ffn_sparse(x_H, w_gate_NH, w_up_NH, w_down_T_NH, idx_K, variant: str = "drelu") -> np.ndarray:
    """Fused activation-sparse FFN over the active neurons ``idx_K`` (from an oracle or predictor).

    Gate and up are computed on the active rows only, neurons whose combined value is exactly
    zero are skipped, and the down projection is an axpy over rows of ``w_down_T_NH``
    (intermediate, hidden). With ``idx_K`` = all neurons it equals ``ffn_dense``.
    """
    return _ffn_sparse(w_gate_NH, w_up_NH, w_down_T_NH, x_H, idx_K, variant_code(variant), numba.get_num_threads())


def ffn_sparse_int8(x_H, gate_q, up_q, down_T_q, idx_K, variant: str = "drelu") -> np.ndarray:
    """``ffn_sparse`` on int8 weights; each ``*_q`` is a ``(q, scale)`` pair from ``quantize_int8_rows``."""
    (qg, sg), (qu, su), (qd, sd) = gate_q, up_q, down_T_q
    return _ffn_sparse_int8(qg, sg, qu, su, qd, sd, x_H, idx_K, variant_code(variant), numba.get_num_threads())


def ffn_sparse_ref(x_H, w_gate_NH, w_up_NH, w_down_T_NH, idx_K, variant: str = "drelu") -> np.ndarray:
    """Eq. 4 of the paper with the mask given as indices: (combined * mask) W_down."""
    mask_N = np.zeros(w_gate_NH.shape[0], dtype=bool)
    mask_N[idx_K] = True
    c_N = combine_ref(w_gate_NH @ x_H, w_up_NH @ x_H, variant) * mask_N
    return (c_N @ w_down_T_NH).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Decode-step attention: RoPE, KV-cache write and grouped-query attention for one token


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def decode_attention(qkv_Q, k_cache_GCE, v_cache_GCE, cos_R, sin_R, pos, n_heads, lo):
    """One token's attention, fused so a decode step is not a string of small NumPy calls.

    ``qkv_Q`` holds q heads, then k heads, then v heads (each ``head_dim`` E); ``cos_R``/``sin_R``
    are the RoPE row of position ``pos`` (R = E / 2, rotate-half layout). Writes k, v at ``pos``
    into the caches (G kv heads, capacity C, E), then each query head h attends with kv head
    ``h // (n_heads / G)`` over positions ``lo..pos``. Returns (n_heads * E,).
    """
    G, E = k_cache_GCE.shape[0], k_cache_GCE.shape[2]
    R, rep, S = E // 2, n_heads // G, pos + 1 - lo
    for g in range(G):  # k gets RoPE, v is copied as is
        k0, v0 = (n_heads + g) * E, (n_heads + G + g) * E
        for i in range(R):
            x1, x2 = qkv_Q[k0 + i], qkv_Q[k0 + R + i]
            k_cache_GCE[g, pos, i] = x1 * cos_R[i] - x2 * sin_R[i]
            k_cache_GCE[g, pos, R + i] = x2 * cos_R[i] + x1 * sin_R[i]
        for j in range(E):
            v_cache_GCE[g, pos, j] = qkv_Q[v0 + j]
    scale = np.float32(1.0 / math.sqrt(E))
    out_D = np.empty(n_heads * E, dtype=np.float32)
    for h in prange(n_heads):
        g, q0 = h // rep, h * E
        q_E = np.empty(E, dtype=np.float32)
        for i in range(R):
            x1, x2 = qkv_Q[q0 + i], qkv_Q[q0 + R + i]
            q_E[i] = x1 * cos_R[i] - x2 * sin_R[i]
            q_E[R + i] = x2 * cos_R[i] + x1 * sin_R[i]
        scores_S = np.empty(S, dtype=np.float32)
        top = -np.inf
        for t in range(S):
            k_E = k_cache_GCE[g, lo + t]
            acc = np.float32(0.0)
            for j in range(E):
                acc += q_E[j] * k_E[j]
            scores_S[t] = acc * scale
            top = max(top, scores_S[t])
        total = np.float32(0.0)
        for t in range(S):  # softmax, max-subtracted as in float32 torch
            scores_S[t] = np.float32(math.exp(scores_S[t] - top))
            total += scores_S[t]
        o_E = np.zeros(E, dtype=np.float32)
        for t in range(S):
            p, v_E = scores_S[t] / total, v_cache_GCE[g, lo + t]
            for j in range(E):
                o_E[j] += p * v_E[j]
        out_D[q0 : q0 + E] = o_E
    return out_D


def decode_attention_ref(qkv_Q, k_cache_GCE, v_cache_GCE, cos_R, sin_R, pos, n_heads, lo):
    """NumPy reference of ``decode_attention`` (also writes the caches)."""
    G, E = k_cache_GCE.shape[0], k_cache_GCE.shape[2]
    R, rep = E // 2, n_heads // G

    def rope(x_nE):
        x1, x2 = x_nE[:, :R], x_nE[:, R:]
        return np.concatenate([x1 * cos_R - x2 * sin_R, x2 * cos_R + x1 * sin_R], axis=1)

    q_nE = rope(qkv_Q[: n_heads * E].reshape(n_heads, E))
    k_cache_GCE[:, pos] = rope(qkv_Q[n_heads * E : (n_heads + G) * E].reshape(G, E))
    v_cache_GCE[:, pos] = qkv_Q[(n_heads + G) * E :].reshape(G, E)
    K_nSE = np.repeat(k_cache_GCE[:, lo : pos + 1], rep, axis=0)  # repeat_kv
    V_nSE = np.repeat(v_cache_GCE[:, lo : pos + 1], rep, axis=0)
    scores_nS = np.einsum("ne,nse->ns", q_nE, K_nSE) / np.float32(np.sqrt(E))
    p_nS = np.exp(scores_nS - scores_nS.max(axis=1, keepdims=True))
    p_nS /= p_nS.sum(axis=1, keepdims=True)
    return np.einsum("ns,nse->ne", p_nS, V_nSE).reshape(-1).astype(np.float32)


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
        for variant in VARIANTS:
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
            for variant in VARIANTS:
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
    for n_heads, G, E, pos, lo in ((4, 2, 16, 0, 0), (6, 3, 10, 9, 0), (4, 4, 8, 12, 5)):
        C = pos + 3
        qkv = rng.standard_normal((n_heads + 2 * G) * E, dtype=np.float32)
        angles = np.float32(pos) / np.float32(100.0) ** (np.arange(0, E, 2, dtype=np.float32) / E)
        cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
        k1, v1 = rng.standard_normal((2, G, C, E), dtype=np.float32)
        k2, v2 = k1.copy(), v1.copy()  # the kernel and the reference each write their own cache
        got = decode_attention(qkv, k1, v1, cos, sin, pos, n_heads, lo)
        check("decode_attention", got, decode_attention_ref(qkv, k2, v2, cos, sin, pos, n_heads, lo))
        check("decode_attention[k cache]", k1[:, pos], k2[:, pos])
    return worst

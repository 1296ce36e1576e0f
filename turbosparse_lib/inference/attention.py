"""Decode-step attention: RoPE, KV-cache write and grouped-query attention for one token, beside its NumPy reference."""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from . import simd
from .kernels import FASTMATH, assert_close


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def decode_attention(qkv_Q, k_cache_GCE, v_cache_GCE, cos_R, sin_R, pos, n_heads, lo, scale, softcap):
    """One token's attention, fused so a decode step is not a string of small NumPy calls.

    ``qkv_Q`` holds q heads, then k heads, then v heads (each ``head_dim`` E); ``cos_R``/``sin_R``
    are the RoPE row of position ``pos`` (R = E / 2, rotate-half layout). Writes k, v at ``pos``
    into the caches (G kv heads, capacity C, E), then each query head h attends with kv head
    ``h // (n_heads / G)`` over positions ``lo..pos``, scores times ``scale`` (float32; Llama: 1 / sqrt(E)) and,
    where ``softcap > 0`` (Gemma 2), soft-capped to ``softcap * tanh(score / softcap)``. Returns (n_heads * E,).
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
            score = simd.f32_dot(k_cache_GCE[g, lo + t], 0, q_E, E) * scale
            if softcap > 0:
                score = np.float32(math.tanh(score / softcap)) * softcap
            scores_S[t] = score
            top = max(top, score)
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


def decode_attention_ref(qkv_Q, k_cache_GCE, v_cache_GCE, cos_R, sin_R, pos, n_heads, lo, scale, softcap):
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
    scores_nS = np.einsum("ne,nse->ns", q_nE, K_nSE) * np.float32(scale)
    if softcap > 0:
        scores_nS = np.tanh(scores_nS / np.float32(softcap)) * np.float32(softcap)
    p_nS = np.exp(scores_nS - scores_nS.max(axis=1, keepdims=True))
    p_nS /= p_nS.sum(axis=1, keepdims=True)
    return np.einsum("ns,nse->ne", p_nS, V_nSE).reshape(-1).astype(np.float32)


def validate_attention(seed: int = 0) -> dict[str, float]:
    """``decode_attention`` against its reference on a few head layouts (also the JIT compile)."""
    rng = np.random.default_rng(seed)
    worst: dict[str, float] = {}

    def check(name, got, want, rtol=2e-4):
        worst[name] = max(worst.get(name, 0.0), assert_close(name, got, want, rtol))

    for n_heads, G, E, pos, lo, softcap in ((4, 2, 16, 0, 0, 0.0), (6, 3, 10, 9, 0, 2.0), (4, 4, 8, 12, 5, 0.0)):
        C = pos + 3
        qkv = rng.standard_normal((n_heads + 2 * G) * E, dtype=np.float32)
        angles = np.float32(pos) / np.float32(100.0) ** (np.arange(0, E, 2, dtype=np.float32) / E)
        cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
        k1, v1 = rng.standard_normal((2, G, C, E), dtype=np.float32)
        k2, v2 = k1.copy(), v1.copy()  # the kernel and the reference each write their own cache
        scale = np.float32(1.0 / math.sqrt(E))
        got = decode_attention(qkv, k1, v1, cos, sin, pos, n_heads, lo, scale, np.float32(softcap))
        check("decode_attention", got, decode_attention_ref(qkv, k2, v2, cos, sin, pos, n_heads, lo, scale, softcap))
        check("decode_attention[k cache]", k1[:, pos], k2[:, pos])
    return worst

"""The decode engine's model in NumPy: prefill of a float32 engine, and the reference of every engine.

All prompt tokens at once with matmuls on the (dequantised) weights, causal attention with the
same RoPE tables, sliding windows, grouped-query layout, scale, soft-caps and extra norms as the
decode kernels. For the Q formats every matrix input is first rounded to Q8_0 blocks per token, as
the kernels do, so this is the quantised model itself, not its float original: what
``Engine.reference_logits`` compares the compiled decode step with.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from . import kernels, quant

if TYPE_CHECKING:
    from .engine import Engine


def rms_norm(x_TH: np.ndarray, w_H: np.ndarray, eps: float) -> np.ndarray:
    """LlamaRMSNorm in float32 over the last axis."""
    var_T1 = np.mean(x_TH * x_TH, axis=-1, keepdims=True)
    return w_H * (x_TH / np.sqrt(var_T1 + np.float32(eps)))


def _rope(engine: Engine, li: int, x_TnE: np.ndarray, positions_T: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE on (T, heads, head_dim) at the given positions, with layer ``li``'s tables."""
    R = engine.config.head_dim // 2
    cos_PR, sin_PR = engine.rope_tables(li)
    cos, sin = cos_PR[positions_T][:, None, :], sin_PR[positions_T][:, None, :]
    x1, x2 = x_TnE[..., :R], x_TnE[..., R:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _attention(engine: Engine, li: int, h_TH: np.ndarray, w_qkv_QH, w_o_HD, act) -> np.ndarray:
    """T prompt tokens at positions pos..pos+T-1 with NumPy matmuls; writes their k, v to the cache."""
    cfg, w = engine.config, engine.weights
    T, E, G, rep = h_TH.shape[0], cfg.head_dim, cfg.num_kv_heads, cfg.n_rep
    qkv_TQ = act(h_TH) @ w_qkv_QH.T
    if w.b_qkv_LQ is not None:
        qkv_TQ = qkv_TQ + w.b_qkv_LQ[li]
    q_end, k_end = cfg.num_heads * E, (cfg.num_heads + G) * E
    positions_T = np.arange(engine.pos, engine.pos + T)
    q_TnE, k_TgE = qkv_TQ[:, :q_end].reshape(T, cfg.num_heads, E), qkv_TQ[:, q_end:k_end].reshape(T, G, E)
    if w.qk_norm_L2E is not None:  # Qwen3: each head normalised before RoPE
        q_TnE = rms_norm(q_TnE, w.qk_norm_L2E[li, 0], cfg.rms_norm_eps)
        k_TgE = rms_norm(k_TgE, w.qk_norm_L2E[li, 1], cfg.rms_norm_eps)
    q_TnE, k_TgE = _rope(engine, li, q_TnE, positions_T), _rope(engine, li, k_TgE, positions_T)
    engine.k_cache[li, :, engine.pos : engine.pos + T] = k_TgE.transpose(1, 0, 2)
    engine.v_cache[li, :, engine.pos : engine.pos + T] = qkv_TQ[:, k_end:].reshape(T, G, E).transpose(1, 0, 2)

    # keys lo..end-1 can be seen by some new query; the mask narrows that per query
    lo, end, window = engine.window_start(li, engine.pos), engine.pos + T, int(cfg.windows_L[li])
    K_gSE, V_gSE = engine.k_cache[li, :, lo:end], engine.v_cache[li, :, lo:end]
    q_grTE = q_TnE.reshape(T, G, rep, E).transpose(1, 2, 0, 3)  # head h reads kv head h // rep
    scores_grTS = (q_grTE @ K_gSE[:, None].transpose(0, 1, 3, 2)) * cfg.scale
    if cfg.attn_softcap:
        scores_grTS = np.tanh(scores_grTS / np.float32(cfg.attn_softcap)) * np.float32(cfg.attn_softcap)
    key_S, query_T1 = np.arange(lo, end), positions_T[:, None]
    visible_TS = key_S <= query_T1
    if window:
        visible_TS &= key_S > query_T1 - window
    scores_grTS = np.where(visible_TS, scores_grTS, -np.inf)
    p_grTS = np.exp(scores_grTS - scores_grTS.max(axis=-1, keepdims=True))
    p_grTS /= p_grTS.sum(axis=-1, keepdims=True)
    out_TD = (p_grTS @ V_gSE[:, None]).transpose(2, 0, 1, 3).reshape(T, cfg.num_heads * E)
    y_TH = act(out_TD) @ w_o_HD.T
    if w.b_o_LH is not None:
        y_TH = y_TH + w.b_o_LH[li]
    return y_TH if w.post_attn_norm_LH is None else rms_norm(y_TH, w.post_attn_norm_LH[li], cfg.rms_norm_eps)


def soft_cap(logits: np.ndarray, cap: float) -> np.ndarray:
    """``cap * tanh(logits / cap)`` in float32 (Gemma 2/3's final_logit_softcapping); ``logits`` when ``cap`` is 0."""
    if not cap:
        return logits
    c = np.float32(cap)
    return (np.tanh(logits / c) * c).astype(np.float32)


def forward_numpy(engine: Engine, ids_T: np.ndarray, all_logits: bool) -> np.ndarray:
    """Run ``ids_T`` after the engine's cached positions (writing their k, v); the last logits (V,), or (T, V)."""
    cfg, w = engine.config, engine.weights
    code, H = w.qkv.code, cfg.hidden_size

    def act(x_TC):  # what a kernel of this format multiplies the weights with
        return (
            x_TC
            if code == quant.F32
            else np.stack([quant.activation_ref(x_C, code) for x_C in x_TC]).astype(np.float32)
        )

    x_TH = quant.dequantize(quant.QMatrix(w.embed.plain().data[ids_T], w.embed.fmt, H)) * np.float32(cfg.embed_scale)
    for li in range(cfg.num_layers):
        h_TH = rms_norm(x_TH, w.attn_norm_LH[li], cfg.rms_norm_eps)
        x_TH = x_TH + _attention(engine, li, h_TH, quant.dequantize(w.qkv[li]), quant.dequantize(w.o[li]), act)
        h_TH = act(rms_norm(x_TH, w.ffn_norm_LH[li], cfg.rms_norm_eps))
        ffn = w.ffn[li]
        c_TN = kernels.combine_ref(h_TH @ ffn.dequantized(0).T, h_TH @ ffn.dequantized(1).T, cfg.act)
        y_TH = c_TN @ ffn.dequantized(2)
        if w.post_ffn_norm_LH is not None:
            y_TH = rms_norm(y_TH, w.post_ffn_norm_LH[li], cfg.rms_norm_eps)
        x_TH = x_TH + y_TH
    engine.pos += len(ids_T)
    h_TH = act(rms_norm(x_TH if all_logits else x_TH[-1:], w.final_norm_H, cfg.rms_norm_eps))
    logits_TV = soft_cap(
        np.ascontiguousarray(h_TH, dtype=np.float32) @ quant.dequantize(w.lm_head).T, cfg.final_softcap
    )
    return logits_TV if all_logits else logits_TV[0]

"""The fused decode step: a whole token (or a layer half) in one compiled call, for every weight format.

A decoder layer is RMSNorm, the qkv GEMV, RoPE and attention, the o GEMV, RMSNorm and the FFN.
Called one kernel at a time from Python, each call pays its dispatch (argument unboxing, a few
microseconds) and the glue between calls runs in the interpreter; at SmolLM2's size that was a
visible share of a token. Here the glue is compiled too:

- ``decode_token``: one call per token: the embedding, every layer and the lm_head. The FFN
  runs dense, over masks the caller packed for the whole token (``MASKS_PACKED``: recorded
  masks replayed, or any provider that can say a token's masks up front), or with the exact-zero
  oracle computed in line (``MASKS_EXACT_IN_LINE``: every gate row read, the rest only where it fires), or over
  the masks a trained predictor computes in line (``MASKS_PREDICTED``: ``predicted_neurons``, the predictors'
  two GEMVs per layer inside the same call; called from Python between two half-layer calls instead, they cost
  SmolLM2 two dispatches and the interpreter's glue per layer, a large share of a quantised token).
- ``attention_half`` / ``ffn_half``: one layer in two calls, so any other mask provider written in Python
  (``(layer_idx, x_normed_H) -> idx``) runs between them on the very input the FFN will see.

Work is split across threads inside the kernels (rows of a GEMV, heads of attention, neurons of
the FFN), as llama.cpp splits each op: four parallel regions per layer, with no Python between.
Every matrix is a stack over layers in one format (``quant``: f32, q8_0, q4_0), the FFN in the
bundled layout (``bundles``). Inside ``decode_token`` the time-stamp counter (``simd.cycle_counter``)
splits the token's time into embed, attention, mask, ffn and lm_head, so a profile describes the
fused step itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit

from . import quant, simd
from .attention import decode_attention
from .bundles import FFNBundles, layer_ffn_into
from .kernels import FASTMATH
from .simd import BLOCK

MASKS_DENSE, MASKS_PACKED, MASKS_EXACT_IN_LINE, MASKS_PREDICTED = 0, 1, 2, 3
PREDICT_MLP, PREDICT_PREVIEW = 0, 1  # the predictor kinds ``predicted_neurons`` runs (``predictors.provider``)
# profile slots of decode_token's ``ticks``
TICKS = ("embed", "attention", "mask", "ffn", "lm_head")
ATTENTION_ARGS = 12  # ModelWeights.kernel_args()[:12] are attention_half's weights, the rest ffn_half's


@dataclass
class ModelWeights:
    """Every weight a decode step reads, stacked over layers, matrices in one format ``fmt``.

    Norms and biases stay float32 (llama.cpp keeps them F32 too). ``embed`` is ``lm_head`` itself
    when the model ties them, so a tied quantised model reads one quantised matrix for both.
    """

    fmt: str
    attn_norm_LH: np.ndarray
    ffn_norm_LH: np.ndarray
    qkv: quant.QMatrix  # (L, Q, .): q heads, then k heads, then v heads
    o: quant.QMatrix  # (L, H, .)
    ffn: FFNBundles  # (L, N, .)
    final_norm_H: np.ndarray
    lm_head: quant.QMatrix  # (V, .)
    embed: quant.QMatrix  # (V, .), lm_head when tied
    b_qkv_LQ: np.ndarray | None = None  # attention_bias models only
    b_o_LH: np.ndarray | None = None
    qk_norm_L2E: np.ndarray | None = None  # Qwen3: RMSNorm weights of each q head, then of each k head, before RoPE
    post_attn_norm_LH: np.ndarray | None = None  # Gemma 2/3: RMSNorm of the attention's output, before the residual
    post_ffn_norm_LH: np.ndarray | None = None  # ... and of the FFN's output

    @classmethod
    def quantize(
        cls,
        fmt: str,
        attn_norm_LH,
        ffn_norm_LH,
        w_qkv_LQH,
        w_o_LHD,
        w_gate_LNH,
        w_up_LNH,
        w_down_LHN,
        final_norm_H,
        lm_head_VH,
        embed_VH=None,
        b_qkv_LQ=None,
        b_o_LH=None,
        qk_norm_L2E=None,
        post_attn_norm_LH=None,
        post_ffn_norm_LH=None,
        dense_layout: bool = False,
    ) -> ModelWeights:
        """From float weights in ``nn.Linear`` layout, stacked over layers; ``embed_VH=None``: tied to lm_head;
        ``dense_layout``: the FFN also in the dense path's layout (``FFNBundles``)."""
        # the matrices only dense GEMVs read are interleaved in the Q formats (quant.QMatrix.interleaved), the same
        # results read faster; a tied embedding reads its row from the interleaved lm_head
        lm_head = quant.quantize(lm_head_VH, fmt).interleaved()
        f32 = lambda a: None if a is None else np.ascontiguousarray(a, dtype=np.float32)
        return cls(
            fmt,
            f32(attn_norm_LH),
            f32(ffn_norm_LH),
            quant.quantize(w_qkv_LQH, fmt).interleaved(),
            quant.quantize(w_o_LHD, fmt).interleaved(),
            FFNBundles.from_weights(w_gate_LNH, w_up_LNH, w_down_LHN, fmt, dense_layout),
            f32(final_norm_H),
            lm_head,
            lm_head if embed_VH is None else quant.quantize(embed_VH, fmt),  # plain: one row read per token
            f32(b_qkv_LQ),
            f32(b_o_LH),
            f32(qk_norm_L2E),
            f32(post_attn_norm_LH),
            f32(post_ffn_norm_LH),
        )

    @property
    def tied(self) -> bool:
        return self.embed is self.lm_head

    @property
    def nbytes(self) -> int:
        """Bytes held (a tied embedding once)."""
        mats = [self.qkv, self.o, self.ffn, self.lm_head] + ([] if self.tied else [self.embed])
        norms = (self.attn_norm_LH, self.ffn_norm_LH, self.final_norm_H, self.post_attn_norm_LH, self.post_ffn_norm_LH)
        return sum(m.nbytes for m in mats) + sum(a.nbytes for a in norms if a is not None)

    def kernel_args(self) -> tuple:
        """The arrays ``decode_token`` takes, in its order (absent biases and norms as placeholders, each with a
        flag): ``attention_half`` takes the first ``ATTENTION_ARGS``, ``ffn_half`` the rest."""
        L, Q, H = self.qkv.data.shape[0], self.qkv.rows, self.o.rows
        b_qkv = np.zeros((L, Q), np.float32) if self.b_qkv_LQ is None else self.b_qkv_LQ
        b_o = np.zeros((L, H), np.float32) if self.b_o_LH is None else self.b_o_LH
        qk_norm = np.ones((L, 2, 1), np.float32) if self.qk_norm_L2E is None else self.qk_norm_L2E
        no_norm = np.ones((L, 1), np.float32)
        post_attn = no_norm if self.post_attn_norm_LH is None else self.post_attn_norm_LH
        post_ffn = no_norm if self.post_ffn_norm_LH is None else self.post_ffn_norm_LH
        return (
            self.attn_norm_LH,
            self.qkv.data,
            b_qkv,
            self.b_qkv_LQ is not None,
            qk_norm,
            self.qk_norm_L2E is not None,
            self.o.data,
            b_o,
            self.b_o_LH is not None,
            post_attn,
            self.post_attn_norm_LH is not None,
            self.ffn_norm_LH,
            self.ffn.data,
            self.ffn.down_scale,
            self.ffn.gate_up,
            self.ffn.down_rows,
            post_ffn,
            self.post_ffn_norm_LH is not None,
        )


@njit(fastmath=FASTMATH, cache=True)
def rms_norm_into(x, w, eps, out):
    """out = w * x / sqrt(mean(x^2) + eps), as LlamaRMSNorm in float32."""
    ss = simd.f32_dot(x, 0, x, x.shape[0])
    inv = np.float32(1.0) / np.sqrt(ss / np.float32(x.shape[0]) + np.float32(eps))
    for j in range(x.shape[0]):
        out[j] = w[j] * (x[j] * inv)


@njit(fastmath=FASTMATH, cache=True)
def head_norms_into(qkv, qk_norm, n_heads, n_kv_heads, head_dim, eps):
    """Qwen3's q and k norms: ``rms_norm_into`` of every q head with ``qk_norm[0]`` and of every k head with
    ``qk_norm[1]`` (weights of ``head_dim``), in place in ``qkv`` (q heads, k heads, v heads), before RoPE."""
    for h in range(n_heads + n_kv_heads):
        seg = qkv[h * head_dim : (h + 1) * head_dim]
        rms_norm_into(seg, qk_norm[0] if h < n_heads else qk_norm[1], eps, seg)


@njit(cache=True, fastmath=False)
def activation_buffers(code, n):
    """Q8_0 activation buffers for an input of ``n`` values (empty for f32, which reads x itself)."""
    if code == quant.F32:
        return np.empty(0, np.int8), np.empty(0, np.float32)
    nb = quant.n_blocks(n)
    return np.empty(nb * BLOCK, np.int8), np.empty(nb, np.float32)


@njit(fastmath=FASTMATH, cache=True)
def matvec(data, code, cols, x, y):
    """y = W x for one matrix (rows, row_bytes): quantises x first where the format needs it."""
    xq, xd = activation_buffers(code, cols)
    if code != quant.F32:
        quant.quantize_activation_into(x, xq, xd)
    quant.gemv_into(data, code, cols, x, xq, xd, y)


# fmt: off
# not formatted: one argument a line would stretch these Numba kernels (flat arrays, as Numba compiles best) over
# a hundred lines
@njit(fastmath=FASTMATH, cache=True)
def attention_half(li, x, attn_norm, qkv, b_qkv, has_b_qkv, qk_norm, has_qk_norm, o, b_o, has_b_o, post_attn_norm,
                   has_post_attn_norm, ffn_norm, code, n_heads, head_dim, eps, scale, softcap, k_cache, v_cache, cos,
                   sin, layer_rope, pos, windows, h_out):
    """Layer ``li``'s attention block on the residual stream ``x`` (updated in place); ``h_out`` gets
    the FFN's input, RMSNorm(x). Writes this position's k and v into the layer's cache. ``cos``/``sin``
    are RoPE tables (tables, positions, head_dim / 2), layer ``li`` reading table ``layer_rope[li]``;
    ``windows[li]`` is its sliding window (0: none). Gemma 2/3 normalise the block's output (``post_attn_norm``)."""
    H = x.shape[0]
    h = np.empty(H, np.float32)
    rms_norm_into(x, attn_norm[li], eps, h)
    qkv_Q = np.empty(quant.matrix_rows(qkv[li], code, H), np.float32)
    matvec(qkv[li], code, H, h, qkv_Q)
    if has_b_qkv:
        qkv_Q += b_qkv[li]
    if has_qk_norm:
        head_norms_into(qkv_Q, qk_norm[li], n_heads, k_cache.shape[1], head_dim, eps)
    window, r = windows[li], layer_rope[li]
    lo = max(0, pos - window + 1) if window > 0 else 0
    out_D = decode_attention(qkv_Q, k_cache[li], v_cache[li], cos[r, pos], sin[r, pos], pos, n_heads, lo, scale,
                             softcap)
    y_H = np.empty(H, np.float32)
    matvec(o[li], code, n_heads * head_dim, out_D, y_H)
    if has_b_o:
        for j in range(H):
            y_H[j] += b_o[li, j]
    if has_post_attn_norm:
        rms_norm_into(y_H, post_attn_norm[li], eps, y_H)
    for j in range(H):
        x[j] += y_H[j]
    rms_norm_into(x, ffn_norm[li], eps, h_out)


@njit(fastmath=FASTMATH, cache=True)
def ffn_half(li, x, h, ffn, ffn_scale, gate_up, down_rows, post_ffn_norm, has_post_ffn_norm, eps, code, idx, n,
             use_idx, skip_zeros, act, shift, n_threads, rows_read):
    """Layer ``li``'s FFN on ``h`` (dense, over ``idx[:n]``, or the exact-zero oracle), added to ``x`` (Gemma 2/3:
    normalised first by ``post_ffn_norm``). Dense reads the dense layout (``gate_up``, ``down_rows``) where the
    weights hold one, else the bundles; gate-first reads its gate rows there too."""
    H = x.shape[0]
    xq, xd = activation_buffers(code, H)
    if code != quant.F32:
        quant.quantize_activation_into(h, xq, xd)
    y = np.empty(H, np.float32)
    layer_ffn_into(ffn[li], ffn_scale[li], gate_up[li], down_rows[li], code, H, h, xq, xd, idx, n, use_idx, skip_zeros,
                   act, shift, n_threads, y, rows_read)
    if has_post_ffn_norm:
        rms_norm_into(y, post_ffn_norm[li], eps, y)
    x += y


@njit(fastmath=FASTMATH, cache=True)
def embed_row(embed, code, token, H, scale):
    """The float32 embedding of ``token`` (a dequantised row for the Q formats, plain or interleaved), times ``scale``
    (Gemma: sqrt(H))."""
    x = np.zeros(quant.n_blocks(H) * BLOCK, np.float32)
    R = quant.rows_per_line(embed, code, H)
    if R == 1:
        quant.row_axpy(embed[token], 0, code, H, np.float32(1.0), x)
    else:  # the row's blocks lie among its group's: each copied out as a plain block, then dequantised
        line, block = embed[token // R], np.empty(quant.row_bytes_of(code, BLOCK), np.uint8)
        for b in range(quant.n_blocks(H)):
            quant.interleaved_block_into(line, code, R, token % R, b, block)
            quant.row_axpy(block, 0, code, BLOCK, np.float32(1.0), x[b * BLOCK : (b + 1) * BLOCK])
    out = x[:H].copy()
    if scale != np.float32(1.0):
        for j in range(H):
            out[j] *= scale
    return out


@njit(fastmath=FASTMATH, cache=True)
def lm_head_logits(x, final_norm, eps, lm_head, code):
    H = x.shape[0]
    h = np.empty(H, np.float32)
    rms_norm_into(x, final_norm, eps, h)
    logits = np.empty(quant.matrix_rows(lm_head, code, H), np.float32)
    matvec(lm_head, code, H, h, logits)
    return logits


@njit(cache=True, fastmath=False)
def preview_mask(z_2N, score_floor, score_sure, log_threshold):
    """Neurons ``i`` with ``Phi(z[i]) Phi(z[N + i]) >= exp(log_threshold)``. Where either score is below
    ``score_floor`` (at most ``Phi^-1`` of the threshold) the product cannot reach it; where both reach
    ``score_sure`` (at least ``Phi^-1`` of its square root) it must; only the rest compute the probability."""
    n = z_2N.shape[0] // 2
    out = np.empty(n, dtype=np.int64)
    k = 0
    for i in range(n):
        zg, zu = z_2N[i], z_2N[n + i]
        if zg < score_floor or zu < score_floor:
            continue
        if zg < score_sure or zu < score_sure:
            # log Phi(z) = log(erfc(-z / sqrt 2) / 2), well conditioned for z >= Phi^-1 of any threshold we use
            log_p = math.log(0.5 * math.erfc(-zg / math.sqrt(2.0))) + math.log(0.5 * math.erfc(-zu / math.sqrt(2.0)))
            if log_p < log_threshold:
                continue
        out[k] = i
        k += 1
    return out[:k]


@njit(fastmath=FASTMATH, cache=True)
def predicted_neurons(li, v, code, kind, w1, w2, b, logit_threshold, score_floor, score_sure, log_threshold):
    """Layer ``li``'s predicted neurons (ascending) from ``v``, the residual stream or the FFN's input, as
    ``predictors.provider.PredictorMaskProvider`` computes them with the same kernels, so the same list:
    ``h = W1 v``; the low-rank MLP (``PREDICT_MLP``) keeps the neurons whose ``W2 relu(h) + b`` reaches the layer's
    logit threshold, the preview (``PREDICT_PREVIEW``) those whose two scores ``W2 h + b`` pass ``preview_mask``.
    ``w1`` (L, r, .), ``w2`` (L, N or 2N, .) are stacks in the engine's format ``code``; the rest float per layer."""
    H, n_out = v.shape[0], b.shape[1]
    r = quant.matrix_rows(w1[li], code, H)
    h = np.empty(r, np.float32)
    matvec(w1[li], code, H, v, h)
    if kind == PREDICT_MLP:
        for j in range(r):
            if h[j] < 0:
                h[j] = np.float32(0.0)
    z = np.empty(n_out, np.float32)
    matvec(w2[li], code, r, h, z)
    for j in range(n_out):
        z[j] += b[li, j]
    if kind == PREDICT_PREVIEW:
        return preview_mask(z, score_floor[li], score_sure[li], log_threshold[li])
    return np.flatnonzero(z >= logit_threshold[li])


def no_predictor() -> tuple:
    """``decode_token``'s predictor arguments when it runs none: empty arrays of the types a predictor's have, so
    every mode shares one compiled ``decode_token``."""
    f32, f64 = np.empty((1, 0), np.float32), np.empty(1, np.float64)
    no_matrix = np.empty((1, 0, 0), np.uint8)
    return PREDICT_MLP, False, no_matrix, no_matrix, f32, np.empty(1, np.float32), f64, f64, f64


@njit(fastmath=FASTMATH, cache=True)
def decode_token(token, pos, attn_norm, qkv, b_qkv, has_b_qkv, qk_norm, has_qk_norm, o, b_o, has_b_o, post_attn_norm,
                 has_post_attn_norm, ffn_norm, ffn, ffn_scale, gate_up, down_rows, post_ffn_norm, has_post_ffn_norm,
                 final_norm, lm_head, embed, embed_scale, code, n_heads, head_dim, eps, scale, softcap, k_cache,
                 v_cache, cos, sin, layer_rope, windows, act, shift, masks_mode, mask_offsets, mask_idx, pred_kind,
                 pred_residual, pred_w1, pred_w2, pred_b, pred_logit_threshold, pred_score_floor, pred_score_sure,
                 pred_log_threshold, n_threads, ticks, rows_read):
    """Logits after ``token`` at position ``pos``: one compiled call for the whole token.

    ``masks_mode``: ``MASKS_DENSE``, ``MASKS_PACKED`` (layer l reads neurons
    ``mask_idx[mask_offsets[l]:mask_offsets[l + 1]]``), ``MASKS_EXACT_IN_LINE`` or ``MASKS_PREDICTED`` (the
    ``pred_*`` arguments, ``predicted_neurons``'s, on the residual stream with ``pred_residual``, else on the FFN's
    input; ``no_predictor`` gives them for the other modes). Adds the
    time-stamp-counter ticks of each component to ``ticks`` (order of ``TICKS``) and the FFN rows
    read (gate, up, down) to ``rows_read``. Returns (logits, active neurons summed over layers).
    """
    H, N = attn_norm.shape[1], ffn.shape[1]
    t0 = simd.cycle_counter()
    x = embed_row(embed, code, token, H, embed_scale)
    h = np.empty(H, np.float32)
    active = 0
    t1 = simd.cycle_counter()
    ticks[0] += t1 - t0
    for li in range(attn_norm.shape[0]):
        attention_half(li, x, attn_norm, qkv, b_qkv, has_b_qkv, qk_norm, has_qk_norm, o, b_o, has_b_o, post_attn_norm,
                       has_post_attn_norm, ffn_norm, code, n_heads, head_dim, eps, scale, softcap, k_cache, v_cache,
                       cos, sin, layer_rope, pos, windows, h)
        t2 = simd.cycle_counter()
        ticks[1] += t2 - t1
        if masks_mode == MASKS_PACKED:
            lo, hi = mask_offsets[li], mask_offsets[li + 1]
            ffn_half(li, x, h, ffn, ffn_scale, gate_up, down_rows, post_ffn_norm, has_post_ffn_norm, eps, code,
                     mask_idx[lo:hi], hi - lo, True, True, act, shift, n_threads, rows_read)
            active += hi - lo
        elif masks_mode == MASKS_PREDICTED:
            idx = predicted_neurons(li, x if pred_residual else h, code, pred_kind, pred_w1, pred_w2, pred_b,
                                    pred_logit_threshold, pred_score_floor, pred_score_sure, pred_log_threshold)
            t3 = simd.cycle_counter()
            ticks[2] += t3 - t2
            t2 = t3
            ffn_half(li, x, h, ffn, ffn_scale, gate_up, down_rows, post_ffn_norm, has_post_ffn_norm, eps, code,
                     idx, idx.shape[0], True, True, act, shift, n_threads, rows_read)
            active += idx.shape[0]
        else:
            before = rows_read[2]
            in_line = masks_mode == MASKS_EXACT_IN_LINE
            ffn_half(li, x, h, ffn, ffn_scale, gate_up, down_rows, post_ffn_norm, has_post_ffn_norm, eps, code,
                     mask_idx, N, False, in_line, act, shift, n_threads, rows_read)
            active += rows_read[2] - before if in_line else N
        t1 = simd.cycle_counter()
        ticks[3] += t1 - t2
    logits = lm_head_logits(x, final_norm, eps, lm_head, code)
    ticks[4] += simd.cycle_counter() - t1
    return logits, active
# fmt: on


@njit(cache=True, fastmath=False)
def _busy_ticks(n):
    t0 = simd.cycle_counter()
    acc = 0.0
    for i in range(n):
        acc += np.sqrt(np.float64(i))
    return simd.cycle_counter() - t0, acc


_TICK_SECONDS: list[float] = []


def seconds_per_tick() -> float:
    """Seconds per time-stamp-counter tick, measured once per process against ``perf_counter``
    (the counter runs at a constant rate on current x86 CPUs); NaN where there is no counter."""
    from time import perf_counter

    if not simd.CYCLE_COUNTER_AVAILABLE:
        return float("nan")
    if not _TICK_SECONDS:
        _busy_ticks(10)  # compile
        t0 = perf_counter()
        ticks, _ = _busy_ticks(20_000_000)
        _TICK_SECONDS.append((perf_counter() - t0) / max(ticks, 1))
    return _TICK_SECONDS[0]

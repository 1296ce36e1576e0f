"""A CPU decode engine for Llama/Mistral/Qwen2/Qwen3/Gemma-shaped weights: dense or sparse FFN, f32, Q8_0 or Q4_0.

This is the laptop-scale stand-in for PowerInfer in the paper's section 7: the same weights
decoded once with dense FFNs (the llama.cpp baseline) and once with FFNs that read only the
neurons a mask provider marks active, at the precisions llama.cpp users run.

Design:

- Every matrix the engine reads per token (q, k, v, o, gate, up, down and the lm_head) is in one
  format, ``f32``, ``q8_0`` or ``q4_0`` (``quant``: llama.cpp's block layouts); ``quantized(fmt)``
  makes a quantised engine from a float one. Norms and biases stay float32, as in llama.cpp.
- q, k and v are one fused ``(q+k+v, hidden)`` matrix; the FFN is stored in the bundled neuron layout
  (``bundles``), which the sparse paths read, and the dense path too unless ``quantized(fmt, dense_layout=True)``
  also holds llama.cpp's dense layout for it (Q formats: 5-8% faster per token on SmolLM2 at Q8_0, 9-11% at
  Q4_0, in interleaved A/B runs).
- ``step`` is one compiled call per token (``step.decode_token``) when the FFN masks are known up
  front or computed in line: dense decoding, masks recorded and replayed (``RecordedMasks``), the
  exact-zero oracle (``ExactZeroOracle``), a trained predictor whose provider hands its weights to the step
  (``PredictorMaskProvider.fused_predictor``: the same masks, without Python between layers). Any other mask
  provider is called between two compiled halves of each layer (``step.attention_half`` / ``step.ffn_half``).
  ``step(..., fused=False)`` runs the unfused engine (one kernel per op, Python between them),
  the reference the fused step is tested against.
- The KV cache is two preallocated float32 arrays, ``(layers, kv_heads, capacity, head_dim)``.
- RoPE matches ``LlamaRotaryEmbedding`` for the default rope type (float32 ``inv_freq`` and
  angles, rotate-half layout); other rope types raise instead of silently decoding wrongly.
- Qwen2's q/k/v biases and Qwen3's per-head q and k RMSNorms (before RoPE) are applied where the model has them.
- Gemma (1, 2, 3 text): norms scale by ``1 + weight`` (folded into the weights when copied), the embedding is
  scaled by sqrt(hidden), Gemma 2/3 normalise each block's output before the residual add and scale scores by
  ``query_pre_attn_scalar ** -0.5``; Gemma 2 soft-caps the attention scores, Gemma 2/3 the logits.
- Grouped-query attention: query head ``h`` reads kv head ``h // (heads / kv_heads)``, as
  ``repeat_kv`` does. Sliding windows are honoured per layer (Mistral: every layer; Gemma 2/3 and Qwen2's
  ``max_window_layers``: some), and so is a RoPE theta per layer (Gemma 3's local and global layers).
- Prefill: float32 engines run all prompt tokens at once with NumPy matmuls (``reference``, also
  the reference every engine is tested against); quantised engines prefill token by token with the
  fused step, so prefill and decoding see exactly one model. The speed tables time decoding only.
- Sparse FFN masks come from a mask provider (``inference.masks``): any callable
  ``(layer_idx, x_normed_H) -> idx`` returning the active neuron indices (int64, duplicate-free).
- The MLP variant comes from the one registry (``models.variants``); the kernels take the integer
  code it derives, so any registered variant decodes.
- ``profile``: pass a dict to ``step``/``generate`` and it accumulates seconds per component
  (``embed``, ``attention``, ``mask``, ``ffn``, ``lm_head``, ``other``: call overhead), token and
  active-neuron counts and the FFN rows read of each kind (``rows_gate``, ``rows_up``, ``rows_down``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from time import perf_counter

import numba
import numpy as np

from ..models.registration import family
from . import bundles, generation, kernels, quant
from . import step as step_kernels
from .attention import decode_attention
from .hf_config import (
    GEMMA,
    gemma_settings,
    layer_rope_thetas,
    layer_windows,
    mlp_variant_of,
    weights_from_transformers,
)
from .masks import ExactZeroOracle, MaskProvider
from .reference import forward_numpy, soft_cap

_SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", *GEMMA)


@dataclass
class EngineConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    mlp_variant: str = "swiglu"  # a key of models.variants.VARIANTS
    mlp_variant_kwargs: dict = field(default_factory=dict)  # e.g. {"b": 1.0} for shifted_relu
    sliding_window: int | None = None  # Mistral: a query sees only the last `sliding_window` keys
    max_positions: int | None = None  # the model's max_position_embeddings: RoPE was trained no further
    # per layer, where layers differ (Gemma 2/3, Qwen2's max_window_layers): the window (0: full attention) and the
    # RoPE theta; None: every layer has ``sliding_window`` and ``rope_theta``
    layer_windows: tuple[int, ...] | None = None
    layer_rope_thetas: tuple[float, ...] | None = None
    embed_scale: float = 1.0  # Gemma: the embedding row times sqrt(hidden_size)
    attention_scale: float | None = None  # scores times this; None: 1 / sqrt(head_dim) (Gemma 2/3: its own)
    attn_softcap: float = 0.0  # Gemma 2: scores -> cap * tanh(scores / cap) before the softmax; 0: none
    final_softcap: float = 0.0  # Gemma 2/3: the same on the logits; 0: none

    def __post_init__(self):
        self.act = kernels.variant_code(self.mlp_variant, **self.mlp_variant_kwargs)  # (code, shift); fails early
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        self.n_rep = self.num_heads // self.num_kv_heads  # query heads per kv head
        self.qkv_size = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        L = self.num_layers
        windows = self.layer_windows or ((self.sliding_window or 0),) * L
        thetas = self.layer_rope_thetas or (self.rope_theta,) * L
        if len(windows) != L or len(thetas) != L or min(windows) < 0:
            raise ValueError(f"need {L} layer windows (>= 0) and RoPE thetas; got {windows} and {thetas}")
        self.windows_L = np.array(windows, np.int64)
        self.rope_thetas = tuple(sorted(set(thetas)))  # one RoPE table each; layer l reads table layer_rope_L[l]
        self.layer_rope_L = np.array([self.rope_thetas.index(t) for t in thetas], np.int64)
        scale = 1.0 / math.sqrt(self.head_dim) if self.attention_scale is None else self.attention_scale
        self.scale = np.float32(scale)

    @classmethod
    def from_hf_config(cls, config) -> EngineConfig:
        """Read a transformers Llama/Mistral/Qwen2/Qwen3/Gemma/Gemma2/Gemma3 config, refusing what the engine would
        get wrong."""
        if getattr(config, "mlp_bias", False):
            raise NotImplementedError("mlp_bias=True is not supported by the engine")
        if getattr(config, "use_bidirectional_attention", False):
            raise NotImplementedError("use_bidirectional_attention=True: the engine decodes causal models only")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        windows, thetas = layer_windows(config), layer_rope_thetas(config)
        return cls(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            vocab_size=config.vocab_size,
            rms_norm_eps=config.rms_norm_eps,
            rope_theta=thetas[0],
            mlp_variant=mlp_variant_of(config),
            mlp_variant_kwargs=dict(getattr(config, "mlp_variant_kwargs", None) or {}),
            sliding_window=(windows[0] or None) if len(set(windows)) == 1 else None,
            max_positions=getattr(config, "max_position_embeddings", None),
            layer_windows=None if len(set(windows)) == 1 else windows,
            layer_rope_thetas=None if len(set(thetas)) == 1 else thetas,
            **gemma_settings(config),
        )


def _reads_residual(provider) -> bool:
    """Whether a mask provider wants the residual stream entering the FFN's norm (PowerInfer-style predictors)
    instead of the normalised FFN input: its ``input`` attribute says so."""
    return getattr(provider, "input", "normed") == "residual"


class Engine:
    """Greedy decoding of a Llama/Mistral/Qwen2/Qwen3/Gemma model with Numba kernels, dense or sparse FFN, f32 or
    quantised."""

    def __init__(self, config: EngineConfig, weights: step_kernels.ModelWeights):
        c, w = config, weights
        expect = {
            "qkv": (c.num_layers, c.qkv_size, c.hidden_size),
            "o": (c.num_layers, c.hidden_size, c.num_heads * c.head_dim),
            "ffn": (c.num_layers, c.intermediate_size, c.hidden_size),
            "lm_head": (c.vocab_size, c.hidden_size),
        }
        got = {
            "qkv": (w.qkv.data.shape[0], w.qkv.rows, w.qkv.cols),
            "o": (w.o.data.shape[0], w.o.rows, w.o.cols),
            "ffn": (*w.ffn.data.shape[:2], w.ffn.hidden),
            "lm_head": (w.lm_head.rows, w.lm_head.cols),
        }
        if got != expect:
            raise ValueError(f"weights {got} do not match the config's shapes {expect}")
        self.config, self.weights = config, weights
        self._args = weights.kernel_args()
        self._quantized: dict[tuple[str, bool], Engine] = {}
        self.capacity, self.pos = 0, 0
        self.reset(256)

    @property
    def fmt(self) -> str:
        """The weights' format: 'f32', 'q8_0' or 'q4_0'."""
        return self.weights.fmt

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_transformers(cls, model, fmt: str = "f32") -> Engine:
        """Copy the weights of a transformers Llama / Mistral / Qwen2 / Qwen3 / Gemma / Gemma2 / Gemma3 causal LM, in
        format ``fmt``."""
        config = getattr(model, "config", None)
        model_type = family(getattr(config, "model_type", None))
        if model_type not in _SUPPORTED_ARCHITECTURES or not hasattr(model, "lm_head"):
            raise TypeError(
                f"Engine.from_transformers supports Llama, Mistral, Qwen2, Qwen3 and Gemma (1, 2, 3 text) causal "
                f"LMs (model_type in {_SUPPORTED_ARCHITECTURES}); got {type(model).__name__} "
                f"with model_type {model_type!r}"
            )
        return cls(EngineConfig.from_hf_config(config), weights_from_transformers(model, fmt))

    def quantized(self, fmt: str, dense_layout: bool = False) -> Engine:
        """This model with every matrix in ``fmt`` ('f32', 'q8_0', 'q4_0'), made once from the float32 weights
        and kept (an engine of its own: its own KV cache); ``self`` for this engine's own format.

        ``dense_layout`` (Q formats): the FFN is also held in llama.cpp's dense layout, which the dense path then
        reads (``bundles.dense_rows_into``: 5-8% faster per token on SmolLM2 at Q8_0, 9-11% at Q4_0, in interleaved
        A/B runs, for a second copy of the FFN), and gate-first for its gate rows; the sparse paths read the bundles
        either way. At f32 the bundles' dense path is kept: its down projection is one multiply-add per weight, no
        dequantisation, and measured faster than row dots there."""
        quant.format_code(fmt)
        if fmt == self.fmt:
            return self
        if self.fmt != "f32":
            raise ValueError(f"quantise from the float32 engine, not from a {self.fmt} one (that would round twice)")
        key = (fmt, bool(dense_layout))
        if key not in self._quantized:
            w, deq = self.weights, quant.dequantize  # float32 views of a float32 engine's weights
            weights = step_kernels.ModelWeights.quantize(
                fmt,
                w.attn_norm_LH,
                w.ffn_norm_LH,
                deq(w.qkv),
                deq(w.o),
                w.ffn.dequantized(0),
                w.ffn.dequantized(1),
                np.swapaxes(w.ffn.dequantized(2), -1, -2),
                w.final_norm_H,
                deq(w.lm_head),
                None if w.tied else deq(w.embed),
                w.b_qkv_LQ,
                w.b_o_LH,
                w.qk_norm_L2E,
                w.post_attn_norm_LH,
                w.post_ffn_norm_LH,
                dense_layout=bool(dense_layout),
            )
            self._quantized[key] = Engine(self.config, weights)
        return self._quantized[key]

    def ffn_layer(self, layer_idx: int) -> bundles.FFNBundles:
        """Layer ``layer_idx``'s FFN bundles (a view), for mask providers that read the weights."""
        return self.weights.ffn[layer_idx]

    # -- state -------------------------------------------------------------------------------

    def reset(self, capacity: int | None = None) -> None:
        """Empty the KV cache; grow it (and the RoPE tables) to ``capacity`` positions if needed."""
        cfg = self.config
        if capacity is not None and capacity > self.capacity:
            shape = (cfg.num_layers, cfg.num_kv_heads, capacity, cfg.head_dim)
            self.k_cache = np.zeros(shape, dtype=np.float32)
            self.v_cache = np.zeros(shape, dtype=np.float32)
            # LlamaRotaryEmbedding, default type: float32 inv_freq and angles, cos/sin of them; one table per theta
            exponent = np.arange(0, cfg.head_dim, 2, dtype=np.float32) / np.float32(cfg.head_dim)
            inv_freq_KR = np.stack([(1.0 / (np.float32(t) ** exponent)).astype(np.float32) for t in cfg.rope_thetas])
            angles_KPR = np.arange(capacity, dtype=np.float32)[None, :, None] * inv_freq_KR[:, None, :]
            self.cos_KPR, self.sin_KPR = np.cos(angles_KPR), np.sin(angles_KPR)  # R = head_dim / 2
            self.capacity = capacity
        self.pos = 0

    # -- prefill (NumPy, float32 engines) ----------------------------------------------------

    def window_start(self, layer_idx: int, first_query_pos: int) -> int:
        """The first cached position any query of layer ``layer_idx`` from ``first_query_pos`` on may attend to."""
        window = int(self.config.windows_L[layer_idx])
        return 0 if window == 0 else max(0, first_query_pos - window + 1)

    def rope_tables(self, layer_idx: int) -> tuple[np.ndarray, np.ndarray]:
        """Layer ``layer_idx``'s RoPE (cos, sin) tables, (capacity, head_dim / 2)."""
        k = self.config.layer_rope_L[layer_idx]
        return self.cos_KPR[k], self.sin_KPR[k]

    def prefill(self, token_ids, all_logits: bool = False) -> np.ndarray:
        """Run the prompt after the cached positions (dense FFN); the last logits (V,), or (T, V) with ``all_logits``.

        A float32 engine runs all tokens at once with NumPy matmuls; a quantised engine runs them one
        by one through the fused step, so that prefill and decoding use one set of kernels and numerics.
        """
        ids_T = self._check_prompt(token_ids)
        if self.fmt == "f32":
            return forward_numpy(self, ids_T, all_logits)
        logits = [self.step(int(t)) for t in ids_T]
        return np.stack(logits) if all_logits else logits[-1]

    def reference_logits(self, token_ids) -> np.ndarray:
        """(T, V) logits of every position of ``token_ids`` from a fresh cache, computed in NumPy on this
        engine's own weights and activation rounding: the reference its kernels are tested against."""
        ids_T = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        self.reset(max(self.capacity, len(ids_T)))
        return forward_numpy(self, self._check_prompt(ids_T), all_logits=True)

    def _check_prompt(self, token_ids) -> np.ndarray:
        ids_T = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if ids_T.shape[0] == 0:
            raise ValueError("empty prompt")
        if self.pos + ids_T.shape[0] > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; call reset() with more")
        if ids_T.min() < 0 or ids_T.max() >= self.config.vocab_size:
            raise IndexError(f"token ids must lie in [0, {self.config.vocab_size})")
        return ids_T

    # -- decoding ----------------------------------------------------------------------------

    def step(
        self,
        token_id: int,
        sparse: bool = False,
        mask_provider: MaskProvider | None = None,
        profile: dict | None = None,
        fused: bool = True,
    ) -> np.ndarray:
        """Decode one token at the next position; logits (V,).

        ``sparse=True`` runs every FFN over the neurons ``mask_provider(layer_idx, x_normed_H)``
        returns (default: ``ExactZeroOracle``, computed in line). ``fused=False`` runs the unfused
        engine (one kernel call per op) instead, with the same kernels and the same results.
        ``profile`` accumulates seconds per component (see the module docstring).
        """
        cfg = self.config
        if self.pos >= self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; call reset() with more")
        if not 0 <= int(token_id) < cfg.vocab_size:
            raise IndexError(f"token id {token_id} outside the vocabulary of {cfg.vocab_size}")
        if sparse and mask_provider is None:
            mask_provider = ExactZeroOracle(self)
        times = dict.fromkeys(("embed", "attention", "mask", "ffn", "lm_head", "other"), 0.0)
        rows_read = np.zeros(3, np.int64)
        packed = getattr(mask_provider, "token_masks", None) if sparse and fused else None
        masks = packed(cfg.num_layers) if packed is not None else None
        in_step = getattr(mask_provider, "fused_predictor", None) if sparse and fused else None
        predictor = in_step(self.fmt, cfg.num_layers) if in_step is not None else None
        if not fused:
            logits_V, active = self._step_unfused(int(token_id), sparse, mask_provider, times, rows_read)
        elif not sparse:
            logits_V, active = self._decode_token(int(token_id), fused_masks(None), times, rows_read)
        elif isinstance(mask_provider, ExactZeroOracle) and mask_provider.engine is self:
            logits_V, active = self._decode_token(int(token_id), fused_masks("in-line"), times, rows_read)
        elif predictor is not None:  # a trained predictor the fused step runs itself
            logits_V, active = self._decode_token(int(token_id), fused_masks("predicted"), times, rows_read, predictor)
        elif masks is not None:
            if len(masks[0]) != cfg.num_layers + 1:
                raise ValueError(f"packed masks for {len(masks[0]) - 1} layers; the model has {cfg.num_layers}")
            logits_V, active = self._decode_token(
                int(token_id), fused_masks(masks, cfg.intermediate_size), times, rows_read
            )
        else:
            logits_V, active = self._step_layers(int(token_id), mask_provider, times, rows_read)
        logits_V = soft_cap(logits_V, cfg.final_softcap)
        self.pos += 1
        if profile is not None:
            for key, seconds in times.items():
                profile[key] = profile.get(key, 0.0) + seconds
            counts = {
                "tokens": 1,
                "ffn_calls": cfg.num_layers,
                "active_neurons": int(active),
                "rows_gate": int(rows_read[0]),
                "rows_up": int(rows_read[1]),
                "rows_down": int(rows_read[2]),
            }
            for key, n in counts.items():
                profile[key] = profile.get(key, 0) + n
        return logits_V

    def _decode_token(
        self, token_id: int, masks: tuple, times: dict, rows_read: np.ndarray, predictor: tuple | None = None
    ):
        """One compiled call for the whole token; its time split by the time-stamp counter. ``predictor``: the
        arguments of ``step_kernels.predicted_neurons`` (a provider's ``fused_predictor``), with masks "predicted"."""
        cfg, w = self.config, self.weights
        ticks = np.zeros(len(step_kernels.TICKS), np.int64)
        t0 = perf_counter()
        logits_V, active = step_kernels.decode_token(
            token_id,
            self.pos,
            *self._args,
            w.final_norm_H,
            w.lm_head.data,
            w.embed.data,
            np.float32(cfg.embed_scale),
            w.qkv.code,
            cfg.num_heads,
            cfg.head_dim,
            cfg.rms_norm_eps,
            cfg.scale,
            np.float32(cfg.attn_softcap),
            self.k_cache,
            self.v_cache,
            self.cos_KPR,
            self.sin_KPR,
            cfg.layer_rope_L,
            cfg.windows_L,
            *cfg.act,
            *masks,
            *(predictor if predictor is not None else step_kernels.no_predictor()),
            numba.get_num_threads(),
            ticks,
            rows_read,
        )
        wall = perf_counter() - t0
        tick_s = step_kernels.seconds_per_tick()
        if np.isnan(tick_s):  # no time-stamp counter: the token's time is not split
            times["other"] += wall
        else:
            for key, n in zip(step_kernels.TICKS, ticks):
                times[key] += n * tick_s
            times["other"] += max(0.0, wall - ticks.sum() * tick_s)  # dispatch of the call
        return logits_V, active

    def _attention_args(self, li_x_h: tuple) -> tuple:
        cfg = self.config
        li, x_H, h_H = li_x_h
        return (
            li,
            x_H,
            *self._args[: step_kernels.ATTENTION_ARGS],
            self.weights.qkv.code,
            cfg.num_heads,
            cfg.head_dim,
            cfg.rms_norm_eps,
            cfg.scale,
            np.float32(cfg.attn_softcap),
            self.k_cache,
            self.v_cache,
            self.cos_KPR,
            self.sin_KPR,
            cfg.layer_rope_L,
            self.pos,
            cfg.windows_L,
            h_H,
        )

    def _provider_masks(self, provider: MaskProvider, li: int, h_H: np.ndarray) -> np.ndarray:
        try:
            return bundles.ascending(provider(li, h_H), self.config.intermediate_size)
        except (IndexError, ValueError) as e:
            raise type(e)(f"mask provider, layer {li}: {e}") from None

    def _step_layers(self, token_id: int, provider: MaskProvider, times: dict, rows_read: np.ndarray):
        """Two compiled calls per layer, the mask provider (Python) between them."""
        cfg, w, code = self.config, self.weights, self.weights.qkv.code
        t0 = perf_counter()
        x_H = step_kernels.embed_row(w.embed.data, code, token_id, cfg.hidden_size, np.float32(cfg.embed_scale))
        active = 0
        t1 = perf_counter()
        times["embed"] += t1 - t0
        for li in range(cfg.num_layers):
            h_H = np.empty(cfg.hidden_size, np.float32)
            step_kernels.attention_half(*self._attention_args((li, x_H, h_H)))
            t2 = perf_counter()
            idx_K = self._provider_masks(provider, li, x_H if _reads_residual(provider) else h_H)
            active += len(idx_K)
            t3 = perf_counter()
            step_kernels.ffn_half(
                li,
                x_H,
                h_H,
                *self._args[step_kernels.ATTENTION_ARGS :],
                cfg.rms_norm_eps,
                code,
                idx_K,
                len(idx_K),
                True,
                True,
                *cfg.act,
                numba.get_num_threads(),
                rows_read,
            )
            t4 = perf_counter()
            times["attention"] += t2 - t1
            times["mask"] += t3 - t2
            times["ffn"] += t4 - t3
            t1 = t4
        logits_V = step_kernels.lm_head_logits(x_H, w.final_norm_H, cfg.rms_norm_eps, w.lm_head.data, code)
        times["lm_head"] += perf_counter() - t1
        return logits_V, active

    def _step_unfused(
        self, token_id: int, sparse: bool, provider: MaskProvider | None, times: dict, rows_read: np.ndarray
    ):
        """The unfused engine: one kernel call per op (norms, GEMVs, attention, FFN), Python between them."""
        cfg, w = self.config, self.weights
        H, eps, code = cfg.hidden_size, cfg.rms_norm_eps, w.qkv.code
        t0 = perf_counter()
        x_H = step_kernels.embed_row(w.embed.data, code, token_id, H, np.float32(cfg.embed_scale))
        active = 0
        t1 = perf_counter()
        times["embed"] += t1 - t0
        for li in range(cfg.num_layers):
            h_H = np.empty(H, np.float32)
            step_kernels.rms_norm_into(x_H, w.attn_norm_LH[li], eps, h_H)
            qkv_Q = quant.gemv(w.qkv[li], h_H)
            if w.b_qkv_LQ is not None:
                qkv_Q += w.b_qkv_LQ[li]
            if w.qk_norm_L2E is not None:
                qk_norm = w.qk_norm_L2E[li]
                step_kernels.head_norms_into(qkv_Q, qk_norm, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, eps)
            cos_PR, sin_PR = self.rope_tables(li)
            out_D = decode_attention(
                qkv_Q,
                self.k_cache[li],
                self.v_cache[li],
                cos_PR[self.pos],
                sin_PR[self.pos],
                self.pos,
                cfg.num_heads,
                self.window_start(li, self.pos),
                cfg.scale,
                np.float32(cfg.attn_softcap),
            )
            y_H = quant.gemv(w.o[li], out_D)
            if w.b_o_LH is not None:
                y_H += w.b_o_LH[li]
            if w.post_attn_norm_LH is not None:
                step_kernels.rms_norm_into(y_H, w.post_attn_norm_LH[li], eps, y_H)
            x_H += y_H
            step_kernels.rms_norm_into(x_H, w.ffn_norm_LH[li], eps, h_H)
            t2 = perf_counter()
            idx_K = self._provider_masks(provider, li, x_H if _reads_residual(provider) else h_H) if sparse else None
            active += cfg.intermediate_size if idx_K is None else len(idx_K)
            t3 = perf_counter()
            y_H = bundles.ffn(w.ffn[li], h_H, idx_K, cfg.act, rows_read=rows_read)
            if w.post_ffn_norm_LH is not None:
                step_kernels.rms_norm_into(y_H, w.post_ffn_norm_LH[li], eps, y_H)
            x_H += y_H
            t4 = perf_counter()
            times["attention"] += t2 - t1
            times["mask"] += t3 - t2
            times["ffn"] += t4 - t3
            t1 = t4
        h_H = np.empty(H, np.float32)
        step_kernels.rms_norm_into(x_H, w.final_norm_H, eps, h_H)
        logits_V = quant.gemv(w.lm_head, h_H)
        times["lm_head"] += perf_counter() - t1
        return logits_V, active

    def generate(
        self,
        prompt_ids,
        max_new_tokens: int,
        sparse: bool = False,
        mask_provider: MaskProvider | None = None,
        profile: dict | None = None,
        eos_token_id: int | None = None,
        return_logits: bool = False,
        fused: bool = True,
    ):
        """Greedy decoding from a fresh cache; the new token ids (int64), prompt excluded.

        The prompt is prefilled densely and not profiled; each new token after the first is one
        ``step``. Stops early after ``eos_token_id`` if given. With ``return_logits`` also returns
        the (new tokens, V) logits each token was chosen from.
        """
        cfg = self.config
        prompt_T = generation.prompt_tokens(prompt_ids, max_new_tokens, cfg.vocab_size, cfg.max_positions)
        self.reset(prompt_T.shape[0] + max_new_tokens)
        if sparse and mask_provider is None:
            mask_provider = ExactZeroOracle(self)

        def step(token_id):
            return self.step(token_id, sparse, mask_provider, profile, fused)

        return generation.greedy(
            self.prefill, step, prompt_T, max_new_tokens, cfg.vocab_size, eos_token_id, return_logits
        )


def fused_masks(masks, n_neurons: int = 0) -> tuple:
    """``decode_token``'s (mode, offsets, indices) for: None (dense), 'in-line' (exact-zero oracle), 'predicted'
    (a trained predictor run inside the step), or a provider's packed masks for the token, ``(offsets (L+1,),
    indices)``: layer l's neurons are ``indices[offsets[l]:offsets[l+1]]`` (checked, since the kernel trusts them)."""
    empty = np.empty(0, np.int64)
    if masks is None:
        return step_kernels.MASKS_DENSE, np.zeros(1, np.int64), empty
    if isinstance(masks, str):
        modes = {"in-line": step_kernels.MASKS_EXACT_IN_LINE, "predicted": step_kernels.MASKS_PREDICTED}
        if masks not in modes:
            raise ValueError(f"unknown fused mask mode {masks!r}; choose one of {', '.join(modes)}")
        return modes[masks], np.zeros(1, np.int64), empty
    offsets, idx = (np.ascontiguousarray(a, dtype=np.int64) for a in masks)
    if offsets.ndim != 1 or offsets[0] != 0 or offsets[-1] != len(idx) or np.any(np.diff(offsets) < 0):
        raise ValueError(f"packed mask offsets must rise from 0 to {len(idx)}; got {offsets}")
    if len(idx) and (idx.min() < 0 or idx.max() >= n_neurons):
        raise IndexError(f"packed masks hold indices outside [0, {n_neurons})")
    falls = np.flatnonzero(idx[1:] <= idx[:-1]) + 1  # positions where the list does not rise
    if np.setdiff1d(falls, offsets).size:  # ... other than where a layer starts: sort each layer's list
        idx = np.concatenate([bundles.ascending(idx[lo:hi], n_neurons) for lo, hi in zip(offsets[:-1], offsets[1:])])
    return step_kernels.MASKS_PACKED, offsets, idx

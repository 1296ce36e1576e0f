"""A CPU decode engine for Llama/Mistral-shaped weights, dense or activation-sparse FFN.

This is the laptop-scale stand-in for PowerInfer in the paper's section 7: the same weights
decoded once with dense FFNs (the llama.cpp baseline) and once with FFNs that read only the
neurons a mask provider marks active.

Design:

- NumPy/Numba float32 throughout; decode-time GEMVs are the kernels of ``kernels``. q, k and v
  are one fused ``(q+k+v, hidden)`` matrix, so a token costs one GEMV for them, as in gpt-fast.
- Both down-projection layouts are kept: ``w_down_HN`` (nn.Linear layout) for the dense GEMV
  baseline and ``w_down_T_NH`` (one row per neuron) for the sparse axpy. Twice the down weights
  in memory, so that each path reads its weights the way its real counterpart does.
- The KV cache is two preallocated arrays per engine, ``(layers, kv_heads, capacity, head_dim)``.
- RoPE matches ``LlamaRotaryEmbedding`` for the default rope type (float32 ``inv_freq`` and
  angles, rotate-half layout); other rope types raise instead of silently decoding wrongly.
- Grouped-query attention: query head ``h`` reads kv head ``h // (heads / kv_heads)``, as
  ``repeat_kv`` does. Mistral's sliding window is honoured.
- ``step`` decodes one token, dense or sparse: GEMVs and a fused RoPE + KV-write + attention
  kernel, so a layer is a handful of kernel calls rather than dozens of small NumPy ops.
  Prefill runs all prompt tokens at once with NumPy matmuls and a dense FFN (the speed tables
  time decoding only); its attention is also the NumPy reference for the decode kernel.
- Sparse FFN masks come from a mask provider (``inference.masks``): any callable
  ``(layer_idx, x_normed_H) -> idx`` returning the active neuron indices (int64, duplicate-free).
  ``ExactZeroOracle`` and ``TopKOracle`` read the model's own activations; a trained predictor
  plugs in the same way.
- The MLP variant comes from the one registry (``models.variants``); the kernels take the integer
  code it derives, so any registered variant decodes.
- ``profile``: pass a dict to ``step``/``generate`` and it accumulates seconds per component
  (``embed``, ``attention``, ``mask``, ``ffn``, ``lm_head``) plus token and active-neuron counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from time import perf_counter
from typing import Literal

import numpy as np

from ..models.variants import get_variant, variant_of_hf_act
from . import kernels
from .attention import decode_attention
from .masks import ExactZeroOracle, MaskProvider

_SUPPORTED_ARCHITECTURES = ("llama", "mistral")


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

    def __post_init__(self):
        self.act = kernels.variant_code(self.mlp_variant, **self.mlp_variant_kwargs)  # (code, shift); fails early
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        self.n_rep = self.num_heads // self.num_kv_heads  # query heads per kv head
        self.qkv_size = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    @classmethod
    def from_hf_config(cls, config) -> "EngineConfig":
        """Read a transformers Llama/Mistral config, refusing what the engine would get wrong."""
        if getattr(config, "mlp_bias", False):
            raise NotImplementedError("mlp_bias=True is not supported by the engine")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            vocab_size=config.vocab_size,
            rms_norm_eps=config.rms_norm_eps,
            rope_theta=_rope_theta(config),
            mlp_variant=mlp_variant_of(config),
            mlp_variant_kwargs=dict(getattr(config, "mlp_variant_kwargs", None) or {}),
            sliding_window=getattr(config, "sliding_window", None),
        )


def mlp_variant_of(config) -> str:
    """``config.mlp_variant`` (set by ``models.swap.apply_variant``) or the variant implied by hidden_act,
    both from the one registry of ``models.variants``."""
    variant = getattr(config, "mlp_variant", None)
    return get_variant(variant).name if variant is not None else variant_of_hf_act(config.hidden_act)


def _rope_theta(config) -> float:
    """rope_theta for the default rope type; an error for any rope scaling we do not implement."""
    params = dict(getattr(config, "rope_parameters", None) or {})  # transformers >= 5
    legacy = getattr(config, "rope_scaling", None) or {}  # transformers 4.x
    rope_type = params.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    if rope_type != "default":
        raise NotImplementedError(
            f"rope type {rope_type!r} is not supported by the engine; only 'default' "
            "(inv_freq = theta ** (-2i / head_dim), no scaling) is implemented"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise NotImplementedError("partial_rotary_factor != 1 is not supported by the engine")
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


@dataclass
class LayerWeights:
    """One decoder layer, float32, C-contiguous. Q = (heads + 2 kv_heads) * head_dim, D = heads * head_dim."""

    attn_norm_H: np.ndarray
    w_qkv_QH: np.ndarray  # rows: q heads, then k heads, then v heads
    w_o_HD: np.ndarray
    ffn_norm_H: np.ndarray
    w_gate_NH: np.ndarray
    w_up_NH: np.ndarray
    w_down_HN: np.ndarray  # nn.Linear layout, for the dense GEMV
    w_down_T_NH: np.ndarray  # one row per neuron, for the sparse axpy
    b_qkv_Q: np.ndarray | None = None  # attention_bias=True models only
    b_o_H: np.ndarray | None = None
    # int8 copies of the FFN weights, (q, scale) pairs, set by Engine.quantize_ffn_int8()
    gate_q: tuple | None = None
    up_q: tuple | None = None
    down_q: tuple | None = None  # (hidden, N)
    down_T_q: tuple | None = None  # (N, hidden)


def _rms_norm(x_TH: np.ndarray, w_H: np.ndarray, eps: float) -> np.ndarray:
    var_T1 = np.mean(x_TH * x_TH, axis=-1, keepdims=True)
    return w_H * (x_TH / np.sqrt(var_T1 + np.float32(eps)))


class Engine:
    """Greedy decoding of a Llama/Mistral model with NumPy/Numba kernels, dense or sparse FFN."""

    def __init__(self, config: EngineConfig, layers: list[LayerWeights], embed_VH, final_norm_H, lm_head_VH):
        if len(layers) != config.num_layers:
            raise ValueError(f"{len(layers)} layers given, config says {config.num_layers}")
        self.config, self.layers = config, layers
        self.embed_VH, self.final_norm_H, self.lm_head_VH = embed_VH, final_norm_H, lm_head_VH
        self.ffn_dtype: Literal["float32", "int8"] = "float32"
        self.capacity, self.pos = 0, 0
        self.reset(256)

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_transformers(cls, model) -> "Engine":
        """Copy the weights of a transformers LlamaForCausalLM / MistralForCausalLM."""
        import torch

        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in _SUPPORTED_ARCHITECTURES or not hasattr(model, "lm_head"):
            raise TypeError(
                f"Engine.from_transformers supports LlamaForCausalLM and MistralForCausalLM "
                f"(model_type in {_SUPPORTED_ARCHITECTURES}); got {type(model).__name__} "
                f"with model_type {model_type!r}"
            )
        cfg = EngineConfig.from_hf_config(config)

        def f32(t: torch.Tensor) -> np.ndarray:  # a private float32 copy, never a view of torch memory
            return np.array(t.detach().to("cpu", torch.float32).numpy(), dtype=np.float32, order="C", copy=True)

        def bias(linear) -> np.ndarray | None:
            return None if linear.bias is None else f32(linear.bias)

        layers = []
        for block in model.model.layers:
            att, mlp = block.self_attn, block.mlp
            b_qkv = [bias(att.q_proj), bias(att.k_proj), bias(att.v_proj)]
            w_down = f32(mlp.down_proj.weight)
            layers.append(
                LayerWeights(
                    attn_norm_H=f32(block.input_layernorm.weight),
                    w_qkv_QH=np.concatenate([f32(att.q_proj.weight), f32(att.k_proj.weight), f32(att.v_proj.weight)]),
                    w_o_HD=f32(att.o_proj.weight),
                    ffn_norm_H=f32(block.post_attention_layernorm.weight),
                    w_gate_NH=f32(mlp.gate_proj.weight),
                    w_up_NH=f32(mlp.up_proj.weight),
                    w_down_HN=w_down,
                    w_down_T_NH=np.ascontiguousarray(w_down.T),
                    b_qkv_Q=None if b_qkv[0] is None else np.concatenate(b_qkv),
                    b_o_H=bias(att.o_proj),
                )
            )
        embed = f32(model.model.embed_tokens.weight)
        tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        lm_head = embed if tied else f32(model.lm_head.weight)  # one array when the embedding is tied
        return cls(cfg, layers, embed, f32(model.model.norm.weight), lm_head)

    def quantize_ffn_int8(self) -> "Engine":
        """Quantise every FFN matrix to per-row int8; ``step`` then runs the int8 FFN kernels."""
        for layer in self.layers:
            layer.gate_q = kernels.quantize_int8_rows(layer.w_gate_NH)
            layer.up_q = kernels.quantize_int8_rows(layer.w_up_NH)
            layer.down_q = kernels.quantize_int8_rows(layer.w_down_HN)
            layer.down_T_q = kernels.quantize_int8_rows(layer.w_down_T_NH)
        self.ffn_dtype = "int8"
        return self

    # -- state -------------------------------------------------------------------------------

    def reset(self, capacity: int | None = None) -> None:
        """Empty the KV cache; grow it (and the RoPE tables) to ``capacity`` positions if needed."""
        cfg = self.config
        if capacity is not None and capacity > self.capacity:
            shape = (cfg.num_layers, cfg.num_kv_heads, capacity, cfg.head_dim)
            self.k_cache = np.zeros(shape, dtype=np.float32)
            self.v_cache = np.zeros(shape, dtype=np.float32)
            # LlamaRotaryEmbedding, default type: float32 inv_freq and angles, cos/sin of them
            exponent = np.arange(0, cfg.head_dim, 2, dtype=np.float32) / np.float32(cfg.head_dim)
            inv_freq = (1.0 / (np.float32(cfg.rope_theta) ** exponent)).astype(np.float32)
            angles_PR = np.arange(capacity, dtype=np.float32)[:, None] * inv_freq[None, :]
            self.cos_PR, self.sin_PR = np.cos(angles_PR), np.sin(angles_PR)  # R = head_dim / 2
            self.capacity = capacity
        self.pos = 0

    # -- the forward pass --------------------------------------------------------------------

    def _rope(self, x_TnE: np.ndarray, positions_T: np.ndarray) -> np.ndarray:
        """Rotate-half RoPE on (T, heads, head_dim) at the given positions."""
        R = self.config.head_dim // 2
        cos, sin = self.cos_PR[positions_T][:, None, :], self.sin_PR[positions_T][:, None, :]
        x1, x2 = x_TnE[..., :R], x_TnE[..., R:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    def _window_start(self, first_query_pos: int) -> int:
        """The first cached position any query from ``first_query_pos`` on may attend to."""
        window = self.config.sliding_window
        return 0 if window is None else max(0, first_query_pos - window + 1)

    def _attention_step(self, li: int, h_H: np.ndarray) -> np.ndarray:
        """One decode token: fused QKV GEMV, the fused Numba attention kernel, o_proj GEMV."""
        cfg, layer = self.config, self.layers[li]
        qkv_Q = kernels.gemv(layer.w_qkv_QH, h_H)
        if layer.b_qkv_Q is not None:
            qkv_Q += layer.b_qkv_Q
        out_D = decode_attention(
            qkv_Q, self.k_cache[li], self.v_cache[li], self.cos_PR[self.pos], self.sin_PR[self.pos],
            self.pos, cfg.num_heads, self._window_start(self.pos),
        )  # fmt: skip
        y_H = kernels.gemv(layer.w_o_HD, out_D)
        return y_H if layer.b_o_H is None else y_H + layer.b_o_H

    def _attention_prefill(self, li: int, h_TH: np.ndarray) -> np.ndarray:
        """T prompt tokens at positions pos..pos+T-1 with NumPy matmuls; writes their k, v to the cache."""
        cfg, layer = self.config, self.layers[li]
        T, E, G, rep = h_TH.shape[0], cfg.head_dim, cfg.num_kv_heads, cfg.n_rep
        qkv_TQ = h_TH @ layer.w_qkv_QH.T
        if layer.b_qkv_Q is not None:
            qkv_TQ = qkv_TQ + layer.b_qkv_Q
        q_end, k_end = cfg.num_heads * E, (cfg.num_heads + G) * E
        positions_T = np.arange(self.pos, self.pos + T)
        q_TnE = self._rope(qkv_TQ[:, :q_end].reshape(T, cfg.num_heads, E), positions_T)
        k_TgE = self._rope(qkv_TQ[:, q_end:k_end].reshape(T, G, E), positions_T)
        self.k_cache[li, :, self.pos : self.pos + T] = k_TgE.transpose(1, 0, 2)
        self.v_cache[li, :, self.pos : self.pos + T] = qkv_TQ[:, k_end:].reshape(T, G, E).transpose(1, 0, 2)

        # keys lo..end-1 can be seen by some new query; the mask narrows that per query
        lo, end = self._window_start(self.pos), self.pos + T
        K_gSE, V_gSE = self.k_cache[li, :, lo:end], self.v_cache[li, :, lo:end]
        q_grTE = q_TnE.reshape(T, G, rep, E).transpose(1, 2, 0, 3)  # head h reads kv head h // rep
        scores_grTS = (q_grTE @ K_gSE[:, None].transpose(0, 1, 3, 2)) * np.float32(E**-0.5)
        key_S, query_T1 = np.arange(lo, end), positions_T[:, None]
        visible_TS = key_S <= query_T1
        if cfg.sliding_window is not None:
            visible_TS &= key_S > query_T1 - cfg.sliding_window
        scores_grTS = np.where(visible_TS, scores_grTS, -np.inf)
        p_grTS = np.exp(scores_grTS - scores_grTS.max(axis=-1, keepdims=True))
        p_grTS /= p_grTS.sum(axis=-1, keepdims=True)
        out_TD = (p_grTS @ V_gSE[:, None]).transpose(2, 0, 1, 3).reshape(T, cfg.num_heads * E)
        y_TH = out_TD @ layer.w_o_HD.T
        return y_TH if layer.b_o_H is None else y_TH + layer.b_o_H

    def _ffn(self, li: int, h_H: np.ndarray, idx_K: np.ndarray | None) -> np.ndarray:
        """One token's FFN: dense when ``idx_K`` is None, else sparse over the active neurons."""
        layer, variant = self.layers[li], self.config.act
        if self.ffn_dtype == "int8":
            if idx_K is None:
                return kernels.ffn_dense_int8(h_H, layer.gate_q, layer.up_q, layer.down_q, variant)
            return kernels.ffn_sparse_int8(h_H, layer.gate_q, layer.up_q, layer.down_T_q, idx_K, variant)
        if idx_K is None:
            return kernels.ffn_dense(h_H, layer.w_gate_NH, layer.w_up_NH, layer.w_down_HN, variant)
        return kernels.ffn_sparse(h_H, layer.w_gate_NH, layer.w_up_NH, layer.w_down_T_NH, idx_K, variant)

    def prefill(self, token_ids) -> np.ndarray:
        """Run the prompt (all tokens at once, dense FFN) after the cached positions; last logits (V,)."""
        ids_T = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        cfg, T = self.config, ids_T.shape[0]
        if T == 0:
            raise ValueError("empty prompt")
        if self.pos + T > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; call reset() with more")
        x_TH = self.embed_VH[ids_T]
        for li, layer in enumerate(self.layers):
            x_TH = x_TH + self._attention_prefill(li, _rms_norm(x_TH, layer.attn_norm_H, cfg.rms_norm_eps))
            h_TH = _rms_norm(x_TH, layer.ffn_norm_H, cfg.rms_norm_eps)
            if self.ffn_dtype == "int8":  # the int8 weights, so prefill and decode see one model
                x_TH = x_TH + np.stack([self._ffn(li, h_H, None) for h_H in h_TH])
            else:
                c_TN = kernels.combine_ref(h_TH @ layer.w_gate_NH.T, h_TH @ layer.w_up_NH.T, cfg.act)
                x_TH = x_TH + c_TN @ layer.w_down_HN.T
        self.pos += T
        h_H = _rms_norm(x_TH[-1], self.final_norm_H, cfg.rms_norm_eps)
        return kernels.gemv(self.lm_head_VH, np.ascontiguousarray(h_H))

    def step(
        self,
        token_id: int,
        sparse: bool = False,
        mask_provider: MaskProvider | None = None,
        profile: dict | None = None,
    ) -> np.ndarray:
        """Decode one token at the next position; logits (V,).

        ``sparse=True`` runs every FFN over the neurons ``mask_provider(layer_idx, x_normed_H)``
        returns (default: ``ExactZeroOracle``). ``profile`` accumulates seconds per component:
        ``attention`` includes both RMSNorms of the layer, ``mask`` is the provider's call,
        ``ffn`` the FFN kernel alone, ``lm_head`` the final norm and the vocabulary GEMV.
        """
        cfg = self.config
        if self.pos >= self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; call reset() with more")
        if sparse and mask_provider is None:
            mask_provider = ExactZeroOracle(self)
        times = {"embed": 0.0, "attention": 0.0, "mask": 0.0, "ffn": 0.0, "lm_head": 0.0}
        n_active = 0
        t0 = perf_counter()
        x_H = self.embed_VH[token_id].copy()
        t1 = perf_counter()
        times["embed"] += t1 - t0
        for li, layer in enumerate(self.layers):
            x_H += self._attention_step(li, _rms_norm(x_H, layer.attn_norm_H, cfg.rms_norm_eps))
            h_H = _rms_norm(x_H, layer.ffn_norm_H, cfg.rms_norm_eps)
            t2 = perf_counter()
            times["attention"] += t2 - t1
            idx_K = None
            if sparse:
                idx_K = np.ascontiguousarray(mask_provider(li, h_H), dtype=np.int64)
                n_active += idx_K.shape[0]
            t3 = perf_counter()
            times["mask"] += t3 - t2
            x_H += self._ffn(li, h_H, idx_K)
            t1 = perf_counter()
            times["ffn"] += t1 - t3
        logits_V = kernels.gemv(self.lm_head_VH, _rms_norm(x_H, self.final_norm_H, cfg.rms_norm_eps))
        times["lm_head"] += perf_counter() - t1
        self.pos += 1
        if profile is not None:
            for key, seconds in times.items():
                profile[key] = profile.get(key, 0.0) + seconds
            profile["tokens"] = profile.get("tokens", 0) + 1
            profile["ffn_calls"] = profile.get("ffn_calls", 0) + cfg.num_layers
            # mean active fraction = active_neurons / (ffn_calls * intermediate_size); dense counts N
            profile["active_neurons"] = profile.get("active_neurons", 0) + (
                n_active if sparse else cfg.num_layers * cfg.intermediate_size
            )
        return logits_V

    def generate(
        self,
        prompt_ids,
        max_new_tokens: int,
        sparse: bool = False,
        mask_provider: MaskProvider | None = None,
        profile: dict | None = None,
        eos_token_id: int | None = None,
        return_logits: bool = False,
    ):
        """Greedy decoding from a fresh cache; the new token ids (int64), prompt excluded.

        The prompt is prefilled densely and not profiled; each new token after the first is one
        ``step``. Stops early after ``eos_token_id`` if given. With ``return_logits`` also returns
        the (new tokens, V) logits each token was chosen from.
        """
        prompt_T = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
        self.reset(prompt_T.shape[0] + max_new_tokens)
        if sparse and mask_provider is None:
            mask_provider = ExactZeroOracle(self)
        tokens, all_logits = [], []
        logits_V = self.prefill(prompt_T)
        for i in range(max_new_tokens):
            if i > 0:
                logits_V = self.step(tokens[-1], sparse, mask_provider, profile)
            tokens.append(int(np.argmax(logits_V)))
            if return_logits:
                all_logits.append(logits_V)
            if tokens[-1] == eos_token_id:
                break
        tokens_T = np.array(tokens, dtype=np.int64)
        if not return_logits:
            return tokens_T
        return tokens_T, np.stack(all_logits) if all_logits else np.empty((0, self.config.vocab_size), np.float32)

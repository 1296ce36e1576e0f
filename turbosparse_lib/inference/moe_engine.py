"""Greedy CPU decoding of mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE), each expert dense or sparse.

Section 6.2 and table 7's Mixtral rows: a token is routed to the top-k of E experts of a layer, and inside each
routed expert only the neurons that fire need to be read. This engine decodes an MoE model that way:

- per layer: RMSNorm, attention (one fused QKV GEMV, the Numba decode-attention kernel with RoPE and the KV
  cache, o_proj GEMV), RMSNorm, then the router: ``softmax(W_router h)``, the top-k experts, their weights
  (renormalised to sum 1 where the model does: Mixtral always, Qwen when ``norm_topk_prob``);
- each routed expert is one gated MLP of width F in the dense engine's bundled-neuron layout
  (``inference.bundles``, float32), run by its kernel: dense (gate, up and down read whole) or over the neurons
  a mask provider returns (only their bundles read); the outputs are summed with the routing weights, in ascending
  expert order as transformers' eager loop adds them. Qwen2-MoE's shared expert (scaled by
  ``sigmoid(w_gate . h)``) and the dense MLP layers of Qwen's ``mlp_only_layers`` are the same kernels;
- Qwen3-MoE's per-head RMSNorm of q and k is applied to the fused QKV output before the attention kernel
  (which applies RoPE), as transformers applies it before RoPE.

What it shares with the dense engine (``inference.engine``) is only public kernels: ``bundles.ffn`` /
``bundles.combined``, ``kernels.variant_code`` and ``attention.decode_attention``; its other GEMVs are NumPy's. Its
KV cache, RoPE tables and decoding loop are its own, so either engine can change without the other. Prefill runs
the prompt one token at a time through ``step`` with dense experts
(prefill is never timed here, and one code path makes the prompt's cache exactly what decoding computes).

Mask providers take ``(layer_idx, expert_idx, x_normed_H)`` and return the active neuron indices (int64,
duplicate-free, any order); ``expert_idx`` is -1 for a layer's shared expert or dense MLP.
``ExpertExactZeroOracle`` reads the model's own exact zeros (lossless); ``RecordedExpertMasks`` replays another
provider's masks at no cost (the timing of an ideal predictor).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter

import numpy as np

from ..models.registration import family
from ..models.variants import get_variant
from . import bundles, generation, kernels
from .attention import decode_attention
from .hf_config import layer_windows, mlp_variant_of, rope_theta
from .reference import rms_norm

MOE_ENGINE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
SHARED = -1  # the expert index a mask provider gets for a layer's shared expert or dense MLP

# (layer_idx, expert_idx, x_normed_H) -> active neuron indices
ExpertMaskProvider = Callable[[int, int, np.ndarray], np.ndarray]


def _f32(t) -> np.ndarray:
    """A private float32, C-contiguous copy of a torch tensor (never a view of torch memory)."""
    import torch

    return np.array(t.detach().to("cpu", torch.float32).numpy(), dtype=np.float32, order="C", copy=True)


def _gemv(W_OI: np.ndarray, x_I: np.ndarray) -> np.ndarray:
    """Attention, router and lm_head GEMVs: NumPy's BLAS, the same for dense and sparse experts (only the
    experts' FFNs differ between the two, and they run in the bundled kernels)."""
    return (W_OI @ np.asarray(x_I, dtype=np.float32)).astype(np.float32, copy=False)


@dataclass
class FFNWeights:
    """One gated MLP (a routed expert, a shared expert or a dense MLP): float32 gate and up (for references
    and byte counts) and its bundled-neuron layout, which the kernels read."""

    w_gate_NH: np.ndarray
    w_up_NH: np.ndarray
    bundles: bundles.FFNBundles

    @classmethod
    def of(cls, gate_NH, up_NH, down_HN) -> FFNWeights:
        gate, up, down = (_f32(t) for t in (gate_NH, up_NH, down_HN))
        return cls(gate, up, bundles.FFNBundles.from_weights(gate, up, down, "f32"))

    @property
    def neurons(self) -> int:
        return self.w_gate_NH.shape[0]


@dataclass
class MoELayer:
    """One decoder layer. Q = (heads + 2 kv_heads) * head_dim, D = heads * head_dim, E = experts."""

    attn_norm_H: np.ndarray
    w_qkv_QH: np.ndarray
    w_o_HD: np.ndarray
    ffn_norm_H: np.ndarray
    router_EH: np.ndarray | None = None  # None: a dense layer (``dense`` holds its MLP)
    experts: list[FFNWeights] = field(default_factory=list)
    shared: FFNWeights | None = None  # Qwen2-MoE's shared expert, or a dense layer's MLP
    shared_gate_H: np.ndarray | None = None  # sigmoid(shared_gate . h) scales the shared expert (Qwen2-MoE)
    b_qkv_Q: np.ndarray | None = None
    b_o_H: np.ndarray | None = None
    q_norm_E: np.ndarray | None = None  # Qwen3: RMSNorm of each head of q and k, before RoPE
    k_norm_E: np.ndarray | None = None


@dataclass
class MoEEngineConfig:
    hidden_size: int
    intermediate_size: int  # one routed expert's width F
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    num_experts: int
    experts_per_token: int
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    mlp_variant: str = "swiglu"
    mlp_variant_kwargs: dict = field(default_factory=dict)
    sliding_window: int | None = None

    def __post_init__(self):
        self.act = kernels.variant_code(self.mlp_variant, **self.mlp_variant_kwargs)  # fails early
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if not 1 <= self.experts_per_token <= self.num_experts:
            raise ValueError(
                f"need 1 <= experts_per_token ({self.experts_per_token}) <= num_experts ({self.num_experts})"
            )

    @classmethod
    def from_hf_config(cls, config) -> MoEEngineConfig:
        from ..models.moe import moe_settings

        model_type = family(getattr(config, "model_type", None))
        if model_type not in MOE_ENGINE_TYPES:
            raise TypeError(
                f"MoEEngine supports model types {', '.join(MOE_ENGINE_TYPES)}; got {model_type!r} "
                "(dense Llama / Mistral models decode with inference.engine.Engine)"
            )
        if getattr(config, "mlp_bias", False):
            raise NotImplementedError("mlp_bias=True is not supported by the MoE engine")
        moe = moe_settings(config)
        return cls(
            hidden_size=config.hidden_size,
            intermediate_size=moe.expert_intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            vocab_size=config.vocab_size,
            num_experts=moe.num_experts,
            experts_per_token=moe.experts_per_token,
            norm_topk_prob=model_type == "mixtral" or bool(getattr(config, "norm_topk_prob", False)),
            rms_norm_eps=config.rms_norm_eps,
            rope_theta=rope_theta(config),
            mlp_variant=mlp_variant_of(config),
            mlp_variant_kwargs=dict(getattr(config, "mlp_variant_kwargs", None) or {}),
            sliding_window=_sliding_window(config),
        )


def _sliding_window(config) -> int | None:
    """The attention window every layer uses, or None; a mix of full and sliding layers raises."""
    windows = set(layer_windows(config))
    if len(windows) > 1:
        raise NotImplementedError(
            f"layer_types {sorted(set(config.layer_types))}: only all-full or all-sliding attention is supported"
        )
    return windows.pop() or None


class ExpertExactZeroOracle:
    """The neurons of expert ``e`` whose combined value is not exactly zero: lossless, read from the weights.

    As ``inference.masks.ExactZeroOracle`` per expert: a dense gate GEMV over the expert's rows (and up rows where
    the gate fired, for dReLU); a gate with no exact zeros (SwiGLU) computes the dense combined values.
    """

    def __init__(self, engine: MoEEngine):
        self.engine = engine
        self.spec = get_variant(engine.config.mlp_variant)

    def __call__(self, layer_idx: int, expert_idx: int, x_H: np.ndarray) -> np.ndarray:
        w, act = self.engine.ffn_weights(layer_idx, expert_idx), self.engine.config.act
        if not self.spec.exact_zeros:
            return np.flatnonzero(bundles.combined(w.bundles, x_H, act))
        fired_K = np.flatnonzero(
            kernels.combine_ref(w.w_gate_NH @ x_H, np.ones(w.neurons, np.float32), (act[0] & ~1, act[1]))
        )  # the gate activation alone
        if not self.spec.relu_up:
            return fired_K
        return fired_K[w.w_up_NH[fired_K] @ x_H > 0]


class RecordedExpertMasks:
    """Records another provider's masks on the first run and replays them afterwards (an ideal, free predictor)."""

    def __init__(self, provider: ExpertMaskProvider):
        self.provider = provider
        self.masks: list[tuple[int, int, np.ndarray]] = []
        self.recording, self.cursor = True, 0

    def rewind(self) -> None:
        self.recording, self.cursor = False, 0

    def __call__(self, layer_idx: int, expert_idx: int, x_H: np.ndarray) -> np.ndarray:
        if self.recording:
            idx = np.ascontiguousarray(self.provider(layer_idx, expert_idx, x_H), dtype=np.int64)
            self.masks.append((layer_idx, expert_idx, idx))
            return idx
        if self.cursor >= len(self.masks):
            raise IndexError(f"replay ran past the {len(self.masks)} recorded masks")
        li, e, idx = self.masks[self.cursor]
        if (li, e) != (layer_idx, expert_idx):
            raise RuntimeError(
                f"replayed mask {self.cursor} belongs to layer {li} expert {e}, but layer {layer_idx} "
                f"expert {expert_idx} asked: the routing differs from the recorded run"
            )
        self.cursor += 1
        return idx


class MoEEngine:
    """Greedy decoding of a Mixtral / Qwen2-MoE / Qwen3-MoE model, every expert's FFN dense or sparse."""

    def __init__(self, config: MoEEngineConfig, layers: list[MoELayer], embed_VH, final_norm_H, lm_head_VH):
        if len(layers) != config.num_layers:
            raise ValueError(f"{len(layers)} layers given, config says {config.num_layers}")
        self.config, self.layers = config, layers
        self.embed_VH, self.final_norm_H, self.lm_head_VH = embed_VH, final_norm_H, lm_head_VH
        self.ffn_dtype = "float32"  # the only one here (bench code reads it)
        self.capacity, self.pos = 0, 0
        self.reset(256)

    @classmethod
    def from_transformers(cls, model) -> MoEEngine:
        """Copy the weights of a transformers Mixtral / Qwen2-MoE / Qwen3-MoE causal LM (native or swapped experts)."""
        from ..models.moe import is_moe_block

        cfg = MoEEngineConfig.from_hf_config(getattr(model, "config", None))
        layers = []
        for block in model.model.layers:
            att, mlp = block.self_attn, block.mlp
            biases = [getattr(att, n).bias for n in ("q_proj", "k_proj", "v_proj")]
            layer = MoELayer(
                attn_norm_H=_f32(block.input_layernorm.weight),
                w_qkv_QH=np.concatenate([_f32(getattr(att, n).weight) for n in ("q_proj", "k_proj", "v_proj")]),
                w_o_HD=_f32(att.o_proj.weight),
                ffn_norm_H=_f32(block.post_attention_layernorm.weight),
                b_qkv_Q=None if biases[0] is None else np.concatenate([_f32(b) for b in biases]),
                b_o_H=None if att.o_proj.bias is None else _f32(att.o_proj.bias),
                q_norm_E=_f32(att.q_norm.weight) if hasattr(att, "q_norm") else None,
                k_norm_E=_f32(att.k_norm.weight) if hasattr(att, "k_norm") else None,
            )
            if is_moe_block(mlp):
                F_ = cfg.intermediate_size
                gu, down = mlp.experts.gate_up_proj, mlp.experts.down_proj  # (E, 2F, H), (E, H, F)
                layer.router_EH = _f32(mlp.gate.weight)
                layer.experts = [FFNWeights.of(gu[e, :F_], gu[e, F_:], down[e]) for e in range(cfg.num_experts)]
                if getattr(mlp, "shared_expert", None) is not None:
                    s = mlp.shared_expert
                    layer.shared = FFNWeights.of(s.gate_proj.weight, s.up_proj.weight, s.down_proj.weight)
                    layer.shared_gate_H = _f32(mlp.shared_expert_gate.weight).reshape(-1)
            else:
                layer.shared = FFNWeights.of(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
            layers.append(layer)
        embed = _f32(model.model.embed_tokens.weight)
        tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        return cls(cfg, layers, embed, _f32(model.model.norm.weight), embed if tied else _f32(model.lm_head.weight))

    def ffn_weights(self, layer_idx: int, expert_idx: int) -> FFNWeights:
        """Routed expert ``expert_idx`` of a layer, or (``SHARED``) its shared expert / dense MLP."""
        layer = self.layers[layer_idx]
        return layer.shared if expert_idx == SHARED else layer.experts[expert_idx]

    def reset(self, capacity: int | None = None) -> None:
        """Empty the KV cache; grow it (and the RoPE tables) to ``capacity`` positions if needed."""
        cfg = self.config
        if capacity is not None and capacity > self.capacity:
            shape = (cfg.num_layers, cfg.num_kv_heads, capacity, cfg.head_dim)
            self.k_cache, self.v_cache = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
            # transformers' default RoPE: float32 inv_freq and angles (rotate-half layout, applied by the kernel)
            inv_freq = 1.0 / (
                np.float32(cfg.rope_theta)
                ** (np.arange(0, cfg.head_dim, 2, dtype=np.float32) / np.float32(cfg.head_dim))
            )
            angles_PR = np.arange(capacity, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]
            self.cos_PR, self.sin_PR = np.cos(angles_PR), np.sin(angles_PR)
            self.capacity = capacity
        self.pos = 0

    def _attention(self, li: int, h_H: np.ndarray) -> np.ndarray:
        cfg, layer = self.config, self.layers[li]
        qkv_Q = _gemv(layer.w_qkv_QH, h_H)
        if layer.b_qkv_Q is not None:
            qkv_Q += layer.b_qkv_Q
        if layer.q_norm_E is not None:  # Qwen3: per-head RMSNorm of q and k (before RoPE, which the kernel applies)
            E, nq, nk = cfg.head_dim, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
            qkv_Q[:nq] = rms_norm(qkv_Q[:nq].reshape(-1, E), layer.q_norm_E, cfg.rms_norm_eps).reshape(-1)
            qkv_Q[nq : nq + nk] = rms_norm(
                qkv_Q[nq : nq + nk].reshape(-1, E), layer.k_norm_E, cfg.rms_norm_eps
            ).reshape(-1)
        lo = 0 if cfg.sliding_window is None else max(0, self.pos - cfg.sliding_window + 1)
        out_D = decode_attention(
            qkv_Q,
            self.k_cache[li],
            self.v_cache[li],
            self.cos_PR[self.pos],
            self.sin_PR[self.pos],
            self.pos,
            cfg.num_heads,
            lo,
            np.float32(1.0 / math.sqrt(cfg.head_dim)),
            np.float32(0.0),  # no soft-capping
        )
        y_H = _gemv(layer.w_o_HD, out_D)
        return y_H if layer.b_o_H is None else y_H + layer.b_o_H

    def route(self, li: int, h_H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The layer's routed experts for ``h_H`` (ascending) and their weights: softmax, top-k, renormalised."""
        cfg = self.config
        logits_E = _gemv(self.layers[li].router_EH, h_H)
        p_E = np.exp(logits_E - logits_E.max())
        p_E /= p_E.sum()
        top_k = np.argsort(-p_E, kind="stable")[: cfg.experts_per_token]  # ties: the lower index, as torch.topk
        w_k = p_E[top_k]
        if cfg.norm_topk_prob:
            w_k = w_k / w_k.sum()
        order = np.argsort(top_k)
        return top_k[order].astype(np.int64), w_k[order].astype(np.float32)

    def _ffn(self, w: FFNWeights, h_H: np.ndarray, idx_K: np.ndarray | None, rows_read: np.ndarray) -> np.ndarray:
        """One expert's FFN, dense (``idx_K`` None) or over the listed neurons; adds the gate, up and down rows
        it read to ``rows_read``."""
        return bundles.ffn(w.bundles, h_H, idx_K, self.config.act, rows_read=rows_read)

    def step(
        self,
        token_id: int,
        sparse: bool = False,
        mask_provider: ExpertMaskProvider | None = None,
        profile: dict | None = None,
    ) -> np.ndarray:
        """Decode one token at the next position; logits (V,).

        ``sparse=True`` runs every expert (and shared expert / dense MLP) over the neurons ``mask_provider``
        returns (default ``ExpertExactZeroOracle``). ``profile`` accumulates seconds per component (``embed``,
        ``attention`` with both norms, ``router``, ``mask``, ``ffn``, ``lm_head``), ``tokens``, and for the
        routed experts ``ffn_calls`` and ``active_neurons`` (dense calls count all F neurons).
        """
        cfg = self.config
        if self.pos >= self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; call reset() with more")
        if sparse and mask_provider is None:
            mask_provider = ExpertExactZeroOracle(self)
        t = {"embed": 0.0, "attention": 0.0, "router": 0.0, "mask": 0.0, "ffn": 0.0, "lm_head": 0.0}
        calls = active = 0
        rows = np.zeros(3, np.int64)  # gate, up, down rows the expert kernels read
        t0 = perf_counter()
        x_H = self.embed_VH[token_id].copy()
        t1 = perf_counter()
        t["embed"] += t1 - t0
        for li, layer in enumerate(self.layers):
            x_H += self._attention(li, rms_norm(x_H, layer.attn_norm_H, cfg.rms_norm_eps))
            h_H = rms_norm(x_H, layer.ffn_norm_H, cfg.rms_norm_eps)
            t2 = perf_counter()
            t["attention"] += t2 - t1
            units: list[tuple[int, float]] = []  # (expert or SHARED, output scale)
            if layer.router_EH is not None:
                experts_k, w_k = self.route(li, h_H)
                units += list(zip(experts_k.tolist(), w_k.tolist()))
            if layer.shared is not None:
                g = 1.0 if layer.shared_gate_H is None else 1.0 / (1.0 + math.exp(-float(layer.shared_gate_H @ h_H)))
                units.append((SHARED, g))
            t3 = perf_counter()
            t["router"] += t3 - t2
            y_H = np.zeros_like(x_H)
            for e, scale in units:
                t4 = perf_counter()
                idx_K = None
                if sparse:
                    idx_K = np.ascontiguousarray(mask_provider(li, e, h_H), dtype=np.int64)
                t5 = perf_counter()
                y_H += np.float32(scale) * self._ffn(self.ffn_weights(li, e), h_H, idx_K, rows)
                t6 = perf_counter()
                t["mask"] += t5 - t4
                t["ffn"] += t6 - t5
                if e != SHARED:
                    calls += 1
                    active += cfg.intermediate_size if idx_K is None else idx_K.shape[0]
            x_H += y_H
            t1 = perf_counter()
        logits_V = _gemv(self.lm_head_VH, rms_norm(x_H, self.final_norm_H, cfg.rms_norm_eps))
        t["lm_head"] += perf_counter() - t1
        self.pos += 1
        if profile is not None:
            for key, seconds in t.items():
                profile[key] = profile.get(key, 0.0) + seconds
            for key, n in (
                ("tokens", 1),
                ("ffn_calls", calls),
                ("active_neurons", active),
                ("rows_gate", int(rows[0])),
                ("rows_up", int(rows[1])),
                ("rows_down", int(rows[2])),
            ):
                profile[key] = profile.get(key, 0) + n
        return logits_V

    def prefill(self, token_ids) -> np.ndarray:
        """Run the prompt after the cached positions, one dense step per token; the last logits (V,)."""
        ids_T = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if ids_T.shape[0] == 0:
            raise ValueError("empty prompt")
        if self.pos + ids_T.shape[0] > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; call reset() with more")
        for tok in ids_T:
            logits_V = self.step(int(tok))
        return logits_V

    def generate(
        self,
        prompt_ids,
        max_new_tokens: int,
        sparse: bool = False,
        mask_provider: ExpertMaskProvider | None = None,
        profile: dict | None = None,
        eos_token_id: int | None = None,
        return_logits: bool = False,
    ):
        """Greedy decoding from a fresh cache; the new token ids (int64), prompt excluded (as ``Engine.generate``)."""
        vocab = self.config.vocab_size
        prompt_T = generation.prompt_tokens(prompt_ids, max_new_tokens, vocab)
        self.reset(prompt_T.shape[0] + max_new_tokens)
        if sparse and mask_provider is None:
            mask_provider = ExpertExactZeroOracle(self)

        def step(token_id):
            return self.step(token_id, sparse, mask_provider, profile)

        return generation.greedy(self.prefill, step, prompt_T, max_new_tokens, vocab, eos_token_id, return_logits)

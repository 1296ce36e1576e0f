"""What the engines read from a Hugging Face model beyond its sizes, in one place for both (dense and MoE): RoPE,
attention windows, the MLP variant, Gemma's settings, and the dense engine's weights."""

from __future__ import annotations

import numpy as np

from ..models.registration import family
from ..models.variants import get_variant
from .step import ModelWeights

GEMMA = ("gemma", "gemma2", "gemma3_text")  # model types whose norms scale by 1 + weight (and more: gemma_settings)

# the attention kinds of ``config.layer_types`` the dense engine decodes
LAYER_KINDS = ("full_attention", "sliding_attention")


def _default_theta(params: dict, where: str, fallback: float) -> float:
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type != "default":
        raise NotImplementedError(
            f"rope type {rope_type!r}{where} is not supported by the engine; only 'default' "
            "(inv_freq = theta ** (-2i / head_dim), no scaling) is implemented"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise NotImplementedError(f"partial_rotary_factor != 1{where} is not supported by the engine")
    return float(params.get("rope_theta", fallback))


def _per_layer_kind(params: dict) -> bool:
    """Whether ``rope_parameters`` holds one dict per layer kind (Gemma 3: local and global RoPE) instead of one."""
    return bool(params) and all(isinstance(v, dict) or v is None for v in params.values())


def rope_theta(config) -> float:
    """rope_theta for the default rope type; an error for any rope scaling we do not implement, or for RoPE
    parameters that differ by layer kind (``layer_rope_thetas`` reads those)."""
    params = dict(getattr(config, "rope_parameters", None) or {})  # transformers >= 5
    if _per_layer_kind(params):
        raise NotImplementedError(f"RoPE parameters per layer kind ({sorted(params)}) are not supported here")
    legacy = dict(getattr(config, "rope_scaling", None) or {})  # transformers 4.x
    return _default_theta({**legacy, **params}, "", getattr(config, "rope_theta", 10000.0))


def layer_rope_thetas(config) -> tuple[float, ...]:
    """Each decoder layer's RoPE theta: one for all, or (Gemma 3) one per layer kind, each of the default type."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    n_layers = config.num_hidden_layers
    if not _per_layer_kind(params):
        return (rope_theta(config),) * n_layers
    kinds = list(getattr(config, "layer_types", None) or ())
    if len(kinds) != n_layers or any(params.get(k) is None for k in kinds):
        raise ValueError(f"rope_parameters has kinds {sorted(params)} but layer_types is {kinds}")
    by_kind = {k: _default_theta(params[k], f" (layers of kind {k!r})", 10000.0) for k in set(kinds)}
    return tuple(by_kind[k] for k in kinds)


def layer_windows(config) -> tuple[int, ...]:
    """Each decoder layer's sliding window (0: full attention), from ``layer_types`` where the config has them
    (Gemma 2/3, Qwen2), else ``sliding_window`` for every layer (Mistral)."""
    window = getattr(config, "sliding_window", None) or 0  # Qwen2-MoE stores 0 for "none"
    kinds = list(getattr(config, "layer_types", None) or ())
    if not kinds:
        return (int(window),) * config.num_hidden_layers
    unknown = sorted(set(kinds) - set(LAYER_KINDS))
    if unknown:
        raise NotImplementedError(f"layer_types {unknown} are not supported by the engine (only {LAYER_KINDS})")
    if "sliding_attention" in kinds and not window:
        raise ValueError("layer_types has sliding_attention layers but the config has no sliding_window")
    return tuple(int(window) if k == "sliding_attention" else 0 for k in kinds)


def gemma_settings(config) -> dict:
    """What Gemma adds to a Llama-shaped decoder: the embedding scaled by sqrt(hidden), Gemma 2/3's attention scale
    from ``query_pre_attn_scalar``, Gemma 2's attention soft-capping (Gemma 3 keeps the field but never applies
    it) and the logits' soft-capping. Empty for other families."""
    model_type = family(getattr(config, "model_type", None))
    if model_type not in GEMMA:
        return {}
    settings = {"embed_scale": float(np.float32(config.hidden_size**0.5))}  # a float32 tensor in transformers
    if model_type != "gemma":
        settings["attention_scale"] = config.query_pre_attn_scalar**-0.5
        settings["final_softcap"] = float(getattr(config, "final_logit_softcapping", None) or 0.0)
    if model_type == "gemma2":
        settings["attn_softcap"] = float(getattr(config, "attn_logit_softcapping", None) or 0.0)
    return settings


def mlp_variant_of(config) -> str:
    """``config.mlp_variant`` (set by ``models.swap.apply_variant``) or the variant the family's own activation field
    implies (``hidden_act``; Gemma 2/3: ``hidden_activation``), both from the one registry of ``models.variants``."""
    from ..models.swap import native_variant  # torch only when a config is read

    variant = getattr(config, "mlp_variant", None)
    return get_variant(variant).name if variant is not None else native_variant(config)


def weights_from_transformers(model, fmt: str) -> ModelWeights:
    """A transformers decoder's weights as the dense engine's, in ``fmt``. Gemma's RMSNorms scale by
    ``1 + weight``: that sum is taken here once, in float32 as transformers does, so the kernels read a plain norm
    weight. Gemma 2/3's extra norms (after attention and after the FFN, ``pre_feedforward_layernorm`` being the FFN's
    input norm) are read where the layers have them."""
    import torch

    norm_offset = family(model.config.model_type) in GEMMA

    def f32(t: torch.Tensor) -> np.ndarray:  # a private float32 copy, never a view of torch memory
        return np.array(t.detach().to("cpu", torch.float32).numpy(), dtype=np.float32, order="C", copy=True)

    def norm(module) -> np.ndarray:
        return f32(module.weight) + np.float32(1.0) if norm_offset else f32(module.weight)

    layers, att = model.model.layers, lambda b: b.self_attn
    first = layers[0]

    def stack(get, present: bool = True) -> np.ndarray | None:
        return np.stack([get(block) for block in layers]) if present else None

    sandwich = hasattr(first, "pre_feedforward_layernorm")  # Gemma 2/3: norms before and after each block
    qkv_bias = lambda b: np.concatenate([f32(att(b).q_proj.bias), f32(att(b).k_proj.bias), f32(att(b).v_proj.bias)])
    qkv = lambda b: np.concatenate([f32(att(b).q_proj.weight), f32(att(b).k_proj.weight), f32(att(b).v_proj.weight)])
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return ModelWeights.quantize(
        fmt,
        attn_norm_LH=stack(lambda b: norm(b.input_layernorm)),
        ffn_norm_LH=stack(lambda b: norm(b.pre_feedforward_layernorm if sandwich else b.post_attention_layernorm)),
        w_qkv_LQH=stack(qkv),
        w_o_LHD=stack(lambda b: f32(att(b).o_proj.weight)),
        w_gate_LNH=stack(lambda b: f32(b.mlp.gate_proj.weight)),
        w_up_LNH=stack(lambda b: f32(b.mlp.up_proj.weight)),
        w_down_LHN=stack(lambda b: f32(b.mlp.down_proj.weight)),
        final_norm_H=norm(model.model.norm),
        lm_head_VH=f32(model.lm_head.weight),
        embed_VH=None if tied else f32(model.model.embed_tokens.weight),  # one matrix when the embedding is tied
        b_qkv_LQ=stack(qkv_bias, att(first).q_proj.bias is not None),
        b_o_LH=stack(lambda b: f32(att(b).o_proj.bias), att(first).o_proj.bias is not None),
        qk_norm_L2E=stack(
            lambda b: np.stack([norm(att(b).q_norm), norm(att(b).k_norm)]), hasattr(att(first), "q_norm")
        ),
        post_attn_norm_LH=stack(lambda b: norm(b.post_attention_layernorm), sandwich),
        post_ffn_norm_LH=stack(lambda b: norm(b.post_feedforward_layernorm), sandwich),
    )

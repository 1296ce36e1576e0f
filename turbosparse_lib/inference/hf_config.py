"""What the engines read from a Hugging Face config beyond its sizes, in one place for both (dense and MoE)."""

from __future__ import annotations

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

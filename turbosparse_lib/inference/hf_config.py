"""What the engines read from a Hugging Face config beyond its sizes, in one place for both (dense and MoE)."""

from __future__ import annotations


def rope_theta(config) -> float:
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

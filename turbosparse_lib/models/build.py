"""A fresh model of our architecture (``models.architecture``), sized by a preset and/or explicit fields.

It lives apart from ``architecture`` because it reads ``presets``, which itself holds ``ModelConfig``s: the
dependencies run one way, ``architecture`` <- ``presets`` <- ``build``.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict

import torch
from transformers import LlamaForCausalLM, MixtralForCausalLM

from ..presets import Preset, as_preset
from .architecture import ModelConfig, moe_config
from .swap import apply_variant
from .variants import get_variant


def build_model(
    variant: str = "drelu", preset: Preset | str | None = None, seed: int | None = None, moe=None, **fields
):
    """A fresh ``LlamaForCausalLM`` whose MLPs are ``variant``, sized by ``preset`` and/or ``fields``.

    ``fields`` are ``ModelConfig`` fields (``hidden_size=32, num_layers=2, ...``) overriding the
    preset's model section; variant arguments go in ``variant_kwargs={"b": 0.5}``. ``seed`` makes
    the initialisation reproducible without touching the global RNG. With ``moe`` (a ``MoEConfig``
    or a dict of its fields) a ``MixtralForCausalLM`` whose routed experts are ``variant``.
    """
    variant_kwargs = fields.pop("variant_kwargs", None) or {}
    get_variant(variant).kwargs(**variant_kwargs)  # fail before building anything
    base = asdict(as_preset(preset).model) if preset is not None else {}
    unknown = set(fields) - set(ModelConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown model fields {sorted(unknown)}; valid: {', '.join(ModelConfig.__dataclass_fields__)}")
    cfg = ModelConfig(**{**base, **fields})
    moe = moe_config(moe)
    rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        # transformers' own initialisation (normal, std=initializer_range) for every weight; the
        # swap below reuses these Linear modules, so the MLP keeps it too.
        model = LlamaForCausalLM(cfg.to_hf()) if moe is None else MixtralForCausalLM(cfg.to_hf(moe))
    return apply_variant(model, variant, **variant_kwargs)

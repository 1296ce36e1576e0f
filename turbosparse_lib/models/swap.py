"""Gated-MLP variants inside transformers models: swap in, save and load.

Design:

- ``apply_variant`` swaps each decoder layer's MLP for a ``GatedMLP`` that *shares* the old
  ``gate_proj``/``up_proj``/``down_proj`` modules: weights, dtype and device are kept, nothing is
  copied. With the model's native activation (``native_variant``) the logits are unchanged bit
  for bit; with ``drelu`` this is the first step of ReLUfication (section 5).
- The variant is recorded in the config (``mlp_variant``, ``mlp_variant_kwargs``), which
  ``save_pretrained`` writes into config.json; ``load_model`` re-applies it. The state-dict keys
  are those of the native MLP, so checkpoints stay ordinary transformers checkpoints.
- ``hidden_act`` is left as the source model had it: a plain ``from_pretrained`` of a saved
  dReLU or shifted-ReLU model therefore builds the *native* MLP. Load such checkpoints with
  ``load_model``.
- Supported families are those whose decoder layers hold a dense Llama-style MLP:
  Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2, Gemma3 (text). Anything else (GPT-2's
  ``c_fc``/``c_proj``, MoE blocks) raises with the supported list.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .variants import GatedMLP, get_variant, variant_of_hf_act

# model_type -> the config attribute that names its native MLP activation (an ACT2FN key)
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "hidden_act",
    "mistral": "hidden_act",
    "qwen2": "hidden_act",
    "qwen3": "hidden_act",
    "gemma": "hidden_act",
    "gemma2": "hidden_activation",
    "gemma3_text": "hidden_activation",
}


def _check_supported(model) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"{type(model).__name__} (model_type {model_type!r}) is not supported: its MLP is not a dense gated "
            f"gate_proj/up_proj/down_proj block. Supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return model_type


def _decoder_layers(model) -> nn.ModuleList:
    """The decoder layers of a causal LM or of its base model."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise NotImplementedError(
            f"{type(model).__name__} has no decoder `layers`; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return layers


def mlp_modules(model) -> list[nn.Module]:
    """Each decoder layer's MLP, native transformers or ``GatedMLP``, in layer order.

    Every module returned has ``gate_proj``, ``up_proj``, ``down_proj`` (nn.Linear) and ``act_fn``.
    """
    _check_supported(model)
    mlps = [layer.mlp for layer in _decoder_layers(model)]
    for i, mlp in enumerate(mlps):
        if not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
            raise NotImplementedError(
                f"layer {i}: {type(mlp).__name__} is not a dense gated MLP with gate_proj/up_proj/down_proj"
            )
    return mlps


def native_variant(config) -> str:
    """The variant a supported model's own MLP computes, from its config (Llama: swiglu, Gemma: geglu)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(f"model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return variant_of_hf_act(getattr(config, SUPPORTED_MODEL_TYPES[model_type]))


def apply_variant(model, variant: str, **variant_kwargs):
    """Make every decoder layer's MLP a ``GatedMLP`` of ``variant``, keeping its weights; returns ``model``.

    Native MLPs are replaced by a GatedMLP sharing their projections; GatedMLPs are switched in
    place. The variant is recorded as ``config.mlp_variant`` / ``config.mlp_variant_kwargs``.
    """
    spec = get_variant(variant)
    kwargs = spec.kwargs(**variant_kwargs)
    mlps = mlp_modules(model)  # checks the architecture first
    for layer, mlp in zip(_decoder_layers(model), mlps):
        if isinstance(mlp, GatedMLP):
            mlp.set_variant(spec.name, **kwargs)
        else:
            new = GatedMLP.from_linears(mlp.gate_proj, mlp.up_proj, mlp.down_proj, spec.name, **kwargs)
            new.train(mlp.training)
            layer.mlp = new
    model.config.mlp_variant = spec.name
    model.config.mlp_variant_kwargs = kwargs
    return model


def load_model(path_or_dir: str | Path, **from_pretrained_kwargs):
    """``AutoModelForCausalLM.from_pretrained`` plus the recorded MLP variant, in eval mode.

    A config without ``mlp_variant`` (any ordinary checkpoint) loads as transformers builds it.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path_or_dir), **from_pretrained_kwargs)
    variant = getattr(model.config, "mlp_variant", None)
    if variant is not None:
        apply_variant(model, variant, **(getattr(model.config, "mlp_variant_kwargs", None) or {}))
    return model.eval()


def count_parameters(model, exclude_embeddings: bool = False) -> int:
    """Distinct parameters (tied weights counted once); optionally without input/output embeddings."""
    params = {id(p): p for p in model.parameters()}
    if exclude_embeddings:
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            for p in emb.parameters() if emb is not None else ():
                params.pop(id(p), None)
    return sum(p.numel() for p in params.values())

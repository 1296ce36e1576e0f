"""Gated-MLP variants inside transformers models: swap in, save and load.

Design:

- ``apply_variant`` swaps each decoder layer's MLP for a ``GatedMLP`` that *shares* the old
  ``gate_proj``/``up_proj``/``down_proj`` modules: weights, dtype and device are kept, nothing is
  copied. With the model's native activation (``native_variant``) the logits are unchanged bit
  for bit; with ``drelu`` this is the first step of ReLUfication (section 5).
- The variant is recorded in the config (``mlp_variant``, ``mlp_variant_kwargs``), which
  ``save_pretrained`` writes into config.json; ``load_model`` re-applies it. The state-dict keys
  are those of the native MLP, so checkpoints stay ordinary transformers checkpoints.
- ``hidden_act`` is left as the source model had it; a model whose variant is not its family's own
  saves ``model_type: "turbosparse_<family>"`` (``registration``), which this module registers with
  transformers on import: a plain ``AutoModelForCausalLM.from_pretrained`` of a saved dReLU model
  then builds dReLU, and without the library it fails loudly instead of building SwiGLU.
- Supported families are those whose decoder layers hold a dense Llama-style MLP
  (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2, Gemma3 text) and the MoE families Mixtral,
  Qwen2-MoE and Qwen3-MoE, whose fused routed experts become a ``models.moe.GatedExperts``
  sharing their parameters (and Qwen2-MoE's shared expert a ``GatedMLP``). Anything else
  (GPT-2's ``c_fc``/``c_proj``, other MoE layouts) raises with the supported list.
- ``mlp_units`` lists every gated MLP a token can pass through, labelled by layer and expert:
  one per layer in a dense model; in an MoE layer one per routed expert (``models.moe.ExpertMLP``),
  then the shared expert if there is one. ``mlp_modules`` is the same list without labels; the
  instruments of ``sparsity`` hook each of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from torch import nn

from .moe import MOE_MODEL_TYPES, ExpertProjection, GatedExperts, is_moe_block
from .registration import family, mark_variant, register_families
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
    **dict.fromkeys(MOE_MODEL_TYPES, "hidden_act"),  # mixtral, qwen2_moe, qwen3_moe: experts and shared expert alike
}


def _check_supported(model) -> str:
    model_type = family(getattr(getattr(model, "config", None), "model_type", None))
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"{type(model).__name__} (model_type {model_type!r}) is not supported: its MLP is neither a dense gated "
            f"gate_proj/up_proj/down_proj block nor a supported MoE block. Supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return model_type


def decoder_layers(model) -> nn.ModuleList:
    """The decoder layers of a causal LM or of its base model."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise NotImplementedError(
            f"{type(model).__name__} has no decoder `layers`; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return layers


Role = Literal["dense", "routed", "shared"]


@dataclass(frozen=True)
class MLPUnit:
    """One gated MLP of a model: a dense layer's MLP, a routed expert, or an MoE layer's shared expert."""

    layer: int
    expert: int | None  # the routed expert's index; None for a dense MLP or a shared expert
    role: Role
    mlp: nn.Module  # has gate_proj, up_proj, down_proj (nn.Linear or ExpertProjection) and act_fn


_PROJECTIONS = (nn.Linear, ExpertProjection)
_NATIVE_EXPERTS_HINT = (
    "its routed experts are transformers' fused experts, which have no per-expert module to hook: "
    "call models.swap.apply_variant(model, native_variant(model.config)) first (the same weights, "
    "shared, and the same function)"
)


def _check_gated(i: int, mlp: nn.Module, what: str) -> None:
    if not all(isinstance(getattr(mlp, n, None), _PROJECTIONS) for n in ("gate_proj", "up_proj", "down_proj")):
        raise NotImplementedError(
            f"layer {i}: {what} {type(mlp).__name__} is not a gated MLP with gate_proj/up_proj/down_proj"
        )


def mlp_units(model) -> list[MLPUnit]:
    """Every gated MLP of the model, labelled, in layer order (in an MoE layer: experts 0..E-1, then the shared one)."""
    _check_supported(model)
    units = []
    for i, layer in enumerate(decoder_layers(model)):
        block = layer.mlp
        if not is_moe_block(block):
            _check_gated(i, block, "MLP")
            units.append(MLPUnit(i, None, "dense", block))
            continue
        if not isinstance(block.experts, GatedExperts):
            raise NotImplementedError(f"layer {i}: {_NATIVE_EXPERTS_HINT}")
        units += [MLPUnit(i, e, "routed", m) for e, m in enumerate(block.experts.mlps)]
        shared = getattr(block, "shared_expert", None)
        if shared is not None:
            _check_gated(i, shared, "shared expert")
            units.append(MLPUnit(i, None, "shared", shared))
    return units


def mlp_modules(model) -> list[nn.Module]:
    """Every gated MLP of the model (``mlp_units`` without the labels): one per layer in a dense model.

    Every module returned has ``gate_proj``, ``up_proj``, ``down_proj`` (``nn.Linear``, or for a routed expert an
    ``ExpertProjection`` that acts as one) and ``act_fn``.
    """
    return [u.mlp for u in mlp_units(model)]


def set_up_slope(model, slope: float) -> None:
    """Set the negative slope of every dReLU MLP's up branch (``GatedMLP.set_up_slope``): 0 is dReLU itself."""
    for mlp in mlp_modules(model):
        if not hasattr(mlp, "set_up_slope"):
            raise TypeError(f"{type(mlp).__name__} is not a swapped gated MLP: apply_variant(model, 'drelu') first")
        mlp.set_up_slope(slope)


def is_moe(model) -> bool:
    """Whether any decoder layer of a supported model is a routed MoE block."""
    _check_supported(model)
    return any(is_moe_block(layer.mlp) for layer in decoder_layers(model))


def native_variant(config) -> str:
    """The variant a supported model's own MLP computes, from its config (Llama: swiglu, Gemma: geglu)."""
    model_type = family(getattr(config, "model_type", None))
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(f"model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return variant_of_hf_act(getattr(config, SUPPORTED_MODEL_TYPES[model_type]))


def _gated(mlp: nn.Module, spec, kwargs) -> GatedMLP:
    """``mlp`` switched to the variant (a GatedMLP), or a new GatedMLP sharing a native MLP's projections."""
    if isinstance(mlp, GatedMLP):
        mlp.set_variant(spec.name, **kwargs)
        return mlp
    new = GatedMLP.from_linears(mlp.gate_proj, mlp.up_proj, mlp.down_proj, spec.name, **kwargs)
    new.train(mlp.training)
    return new


def apply_variant(model, variant: str, **variant_kwargs):
    """Make every gated MLP of the model ``variant``, keeping its weights; returns ``model``.

    Dense MLPs (and Qwen2-MoE's shared experts) become a ``GatedMLP`` sharing their projections; fused routed
    experts become a ``GatedExperts`` sharing their two parameters; modules already ours are switched in place.
    The variant is recorded as ``config.mlp_variant`` / ``config.mlp_variant_kwargs``.
    """
    spec = get_variant(variant)
    kwargs = spec.kwargs(**variant_kwargs)
    _check_supported(model)
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):  # check every layer before changing any
        block = layer.mlp
        if is_moe_block(block):
            shared = getattr(block, "shared_expert", None)
            if shared is not None:
                _check_gated(i, shared, "shared expert")
        else:
            _check_gated(i, block, "MLP")
    for layer in layers:
        block = layer.mlp
        if not is_moe_block(block):
            layer.mlp = _gated(block, spec, kwargs)
            continue
        if isinstance(block.experts, GatedExperts):
            block.experts.set_variant(spec.name, **kwargs)
        else:
            block.experts = GatedExperts.from_native(block.experts, spec.name, **kwargs)
        if getattr(block, "shared_expert", None) is not None:
            block.shared_expert = _gated(block.shared_expert, spec, kwargs)
    model.config.mlp_variant = spec.name
    model.config.mlp_variant_kwargs = kwargs
    mark_variant(model.config, spec.name, native_variant(model.config))  # saves as turbosparse_<family> if not native
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


def mark_saved_variant(folder: str | Path) -> bool:
    """Give a folder saved before ``registration`` existed (``model_type`` of the family, with a non-native
    ``mlp_variant``) the ``turbosparse_<family>`` type, so a plain ``AutoModelForCausalLM`` builds its variant.
    Returns whether config.json changed (rewritten atomically)."""
    import json

    from ..atomic import write_json
    from .registration import PREFIX

    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    variant, model_type = config.get("mlp_variant"), config.get("model_type")
    act = config.get(SUPPORTED_MODEL_TYPES.get(model_type, ""))
    if variant is None or act is None or variant_of_hf_act(act) == variant:
        return False
    write_json(path, {**config, "model_type": PREFIX + model_type})
    return True


def count_parameters(model, exclude_embeddings: bool = False) -> int:
    """Distinct parameters (tied weights counted once); optionally without input/output embeddings."""
    params = {id(p): p for p in model.parameters()}
    if exclude_embeddings:
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            for p in emb.parameters() if emb is not None else ():
                params.pop(id(p), None)
    return sum(p.numel() for p in params.values())


# AutoModelForCausalLM builds saved variants (registration). Dense families only: transformers converts Mixtral's
# fused experts to its per-expert checkpoint layout by model_type, which a renamed MoE type would lose; an MoE keeps
# its family's type and loads with load_model.
register_families([t for t in SUPPORTED_MODEL_TYPES if t not in MOE_MODEL_TYPES], apply_variant)

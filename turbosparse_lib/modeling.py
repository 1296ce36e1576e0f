"""Gated-MLP variants inside transformers models: build from scratch, swap in, save and load.

Design:

- No model code of our own: a model is transformers' ``LlamaForCausalLM`` (the paper's 300M
  models are "similar to Llama 2", appendix A.1) whose per-layer MLPs are ``GatedMLP`` modules.
  Attention, RoPE, RMSNorm, caching and ``generate`` stay transformers'.
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

import contextlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .variants import VARIANT_OF_HF_ACT, GatedMLP, get_variant

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


@dataclass
class ModelConfig:
    """A Llama-2-style decoder (RMSNorm pre-norm, RoPE, gated MLP), sized by a few numbers."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None  # None: as many as num_heads (plain multi-head attention)
    intermediate_size: int = 176  # the gated MLP's width F (the number of "neurons")
    vocab_size: int = 8192  # our byte-level BPE (data/built/tokenizer)
    context_length: int = 256  # max_position_embeddings
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False  # Llama 2 does not tie

    def __post_init__(self):
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must divide by num_heads ({self.num_heads}), "
                f"and num_heads by num_kv_heads ({self.num_kv_heads})"
            )

    def to_hf(self):
        """The equivalent ``transformers.LlamaConfig``."""
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            intermediate_size=self.intermediate_size,
            vocab_size=self.vocab_size,
            max_position_embeddings=self.context_length,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act="silu",  # the native MLP; replaced by the chosen variant in build_model
            bos_token_id=None,  # our tokenizer's special ids are not Llama's 1 and 2
            eos_token_id=None,
        )


# Sizes keyed by the preset names of ``presets.py``. "paper" is table 11 (the 300M models);
# the paper gives no intermediate size, so it is Llama's 8/3 * hidden rounded up to 256.
MODEL_PRESETS: dict[str, ModelConfig] = {
    "smoke": ModelConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=176, context_length=256),
    "cpu": ModelConfig(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=704, context_length=512),
    "paper": ModelConfig(
        hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=2816, vocab_size=32000, context_length=2048
    ),
}


def build_model(variant: str = "drelu", preset: str | None = None, seed: int | None = None, **fields):
    """A fresh ``LlamaForCausalLM`` whose MLPs are ``variant``, sized by ``preset`` and/or ``fields``.

    ``fields`` are ``ModelConfig`` fields (``hidden_size=32, num_layers=2, ...``) overriding the
    preset's; variant arguments go in ``variant_kwargs={"b": 0.5}``. ``seed`` makes the
    initialisation reproducible without touching the global RNG.
    """
    from transformers import LlamaForCausalLM

    variant_kwargs = fields.pop("variant_kwargs", None) or {}
    get_variant(variant).kwargs(**variant_kwargs)  # fail before building anything
    if preset is not None:
        if preset not in MODEL_PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(MODEL_PRESETS)}")
        base = asdict(MODEL_PRESETS[preset])
    else:
        base = {}
    unknown = set(fields) - set(ModelConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown model fields {sorted(unknown)}; valid: {', '.join(ModelConfig.__dataclass_fields__)}")
    cfg = ModelConfig(**{**base, **fields})
    rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        # transformers' own initialisation (normal, std=initializer_range) for every weight; the
        # swap below reuses these Linear modules, so the MLP keeps it too.
        model = LlamaForCausalLM(cfg.to_hf())
    return apply_variant(model, variant, **variant_kwargs)


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
    act = getattr(config, SUPPORTED_MODEL_TYPES[model_type])
    if act not in VARIANT_OF_HF_ACT:
        raise NotImplementedError(f"no gated-MLP variant for activation {act!r}; known: {', '.join(VARIANT_OF_HF_ACT)}")
    return VARIANT_OF_HF_ACT[act]


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

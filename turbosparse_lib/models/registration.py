"""Saved models with a swapped MLP load as what they are, with plain ``AutoModelForCausalLM``.

Why: a dReLU Llama saved as ``model_type: "llama"`` builds a *SwiGLU* Llama under a plain
``AutoModelForCausalLM.from_pretrained``: same weight names, no error, wrong model. So a model whose MLP differs
from its family's own saves ``model_type: "turbosparse_<family>"`` (``turbosparse_llama``) instead:

- Importing ``turbosparse_lib.models.swap`` (the library's loaders all do) registers each such type with
  ``AutoConfig`` and ``AutoModelForCausalLM``: the config class is the family's, renamed; the model class is the
  family's causal LM, which swaps its MLPs to ``config.mlp_variant`` as it is built. ``from_pretrained`` then
  gives the saved model, dReLU and all.
- Without the library, transformers refuses the unknown model type, loudly, instead of building the native MLP.
- In memory the same config object changes class when ``swap.apply_variant`` changes the MLP (``mark_variant``):
  back to the family's own class when the variant is the native one, so an ordinary model saves as ordinary.
- ``family`` strips the prefix: every check of supported architectures goes through it.

Folders written before this (``model_type: "llama"`` with ``mlp_variant``) still load with ``swap.load_model``.
"""

from __future__ import annotations

PREFIX = "turbosparse_"
_REGISTERED: dict[str, tuple[type, type]] = {}  # family -> (its config class, our config class)


def family(model_type: str | None) -> str | None:
    """The transformers family of a ``model_type``: ``turbosparse_llama`` -> ``llama``; any other unchanged."""
    if model_type and model_type.startswith(PREFIX):
        return model_type[len(PREFIX) :]
    return model_type


def _builds_variant(base_model: type, apply_variant):
    def __init__(self, config, *args, **kwargs):
        base_model.__init__(self, config, *args, **kwargs)
        apply_variant(self, config.mlp_variant, **(getattr(config, "mlp_variant_kwargs", None) or {}))

    return __init__


def register_families(families, apply_variant) -> None:
    """Register ``turbosparse_<family>`` with transformers' auto classes for each family (idempotent); its model
    class calls ``apply_variant(model, config.mlp_variant, **config.mlp_variant_kwargs)`` once built."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    for fam in families:
        if fam in _REGISTERED:
            continue
        base_config = CONFIG_MAPPING[fam]
        base_model = MODEL_FOR_CAUSAL_LM_MAPPING[base_config]
        config_cls = type(
            f"TurboSparse{base_config.__name__}",
            (base_config,),
            {
                "model_type": PREFIX + fam,
                "__module__": __name__,
                "__doc__": f"{base_config.__name__} of a model whose MLPs are ``mlp_variant``, not the family's own.",
            },
        )
        model_cls = type(
            f"TurboSparse{base_model.__name__}",
            (base_model,),
            {
                "config_class": config_cls,
                "__init__": _builds_variant(base_model, apply_variant),
                "__module__": __name__,
                "__doc__": f"{base_model.__name__} built with the MLP variant its config names.",
            },
        )
        globals()[config_cls.__name__] = config_cls  # importable by name (pickling, copies)
        globals()[model_cls.__name__] = model_cls
        AutoConfig.register(PREFIX + fam, config_cls)
        AutoModelForCausalLM.register(config_cls, model_cls)
        _REGISTERED[fam] = (base_config, config_cls)


def mark_variant(config, variant: str, native: str) -> None:
    """Give ``config`` the class that says what the model's MLPs are: ours when ``variant`` is not the family's
    ``native`` one, the family's own otherwise. A config of any other class (a custom subclass) is left alone."""
    fam = family(getattr(config, "model_type", None))
    if fam not in _REGISTERED:
        return
    base_config, ours = _REGISTERED[fam]
    if type(config) in (base_config, ours):
        config.__class__ = base_config if variant == native else ours

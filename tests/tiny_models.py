"""The tiny models the tests build, in one place (not a test module): ``hf_llama``, a plain transformers model of
any Llama-like family, and ``ours``, our architecture with any MLP variant. Each test module passes only the sizes
its checks depend on."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

HF_DEFAULTS = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=64,
    max_position_embeddings=128,
)
OURS_DEFAULTS = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, vocab_size=64)


def hf_llama(seed: int = 0, model_cls=LlamaForCausalLM, config_cls=LlamaConfig, **config):
    """``model_cls(config_cls(...))`` in eval mode, its weights drawn after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return model_cls(config_cls(**{**HF_DEFAULTS, **config})).eval()


def ours(variant: str = "drelu", seed: int = 0, **sizes):
    """``models.build.build_model`` (our architecture, ``variant`` MLPs) in eval mode, seeded without touching the
    global RNG."""
    from turbosparse_lib.models.build import build_model

    return build_model(variant, seed=seed, **{**OURS_DEFAULTS, **sizes}).eval()

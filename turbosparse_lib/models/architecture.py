"""The from-scratch architecture: a Llama-2-style decoder sized by a few numbers, built with any MLP variant.

Design:

- No model code of our own: a model is transformers' ``LlamaForCausalLM`` (the paper's 300M
  models are "similar to Llama 2", appendix A.1) whose per-layer MLPs are ``GatedMLP`` modules
  (``swap.apply_variant``). Attention, RoPE, RMSNorm, caching and ``generate`` stay transformers'.
- ``ModelConfig`` is plain data (no torch at import), so ``presets`` can hold one per preset;
  ``models.build.build_model`` turns a preset's config (or fields) into a model.
- A mixture-of-experts model (section 4) is the same decoder with every MLP split into routed
  experts: transformers' ``MixtralForCausalLM`` (Mistral's attention is Llama's, with no sliding
  window here), sized by ``ModelConfig`` plus ``MoEConfig``, its experts swapped for
  ``models.moe.GatedExperts`` of the chosen variant. Its router is trained with the
  load-balancing loss (``output_router_logits``), which transformers adds to ``loss``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
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
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must divide by num_heads ({self.num_heads}), "
                f"and num_heads by num_kv_heads ({self.num_kv_heads})"
            )

    def to_hf(self, moe: MoEConfig | None = None):
        """The equivalent ``transformers.LlamaConfig``, or with ``moe`` a ``MixtralConfig``."""
        from transformers import LlamaConfig

        if moe is not None:
            return moe.to_hf(self)

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


@dataclass(frozen=True)
class MoEConfig:
    """The routed experts of a from-scratch MoE: every layer's MLP becomes ``num_experts`` experts of width
    ``expert_intermediate_size``, ``experts_per_token`` of them per token (Mixtral: top-2 of 8)."""

    num_experts: int = 8
    experts_per_token: int = 2
    expert_intermediate_size: int = 352
    router_aux_loss_coef: float = 0.01  # Switch Transformer's alpha; transformers adds coef * aux to the loss

    def __post_init__(self):
        if not 1 <= self.experts_per_token <= self.num_experts or self.expert_intermediate_size < 1:
            raise ValueError(
                f"need 1 <= experts_per_token ({self.experts_per_token}) <= num_experts "
                f"({self.num_experts}) and expert_intermediate_size >= 1"
            )
        if self.router_aux_loss_coef < 0:
            raise ValueError(f"router_aux_loss_coef must be >= 0; got {self.router_aux_loss_coef}")

    def active_intermediate(self) -> int:
        """Neurons a token reaches per layer: compare with a dense model's intermediate_size."""
        return self.experts_per_token * self.expert_intermediate_size

    def to_hf(self, model: ModelConfig):
        """The ``transformers.MixtralConfig`` of ``model``'s decoder with these experts."""
        from transformers import MixtralConfig

        return MixtralConfig(
            hidden_size=model.hidden_size,
            num_hidden_layers=model.num_layers,
            num_attention_heads=model.num_heads,
            num_key_value_heads=model.num_kv_heads,
            head_dim=model.hidden_size // model.num_heads,
            intermediate_size=self.expert_intermediate_size,  # Mixtral's name for one expert's width
            num_local_experts=self.num_experts,
            num_experts_per_tok=self.experts_per_token,
            output_router_logits=True,  # so that the loss includes the load-balancing term
            router_aux_loss_coef=self.router_aux_loss_coef,
            vocab_size=model.vocab_size,
            max_position_embeddings=model.context_length,
            rms_norm_eps=model.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": model.rope_theta},
            tie_word_embeddings=model.tie_word_embeddings,
            sliding_window=None,
            hidden_act="silu",
            bos_token_id=None,
            eos_token_id=None,
        )


def moe_config(moe) -> MoEConfig | None:
    """``moe`` as a ``MoEConfig``: one already, a dict of its fields (as a run's JSON config stores it), or None."""
    if moe is None or isinstance(moe, MoEConfig):
        return moe
    if isinstance(moe, dict):
        unknown = set(moe) - set(MoEConfig.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown MoE fields {sorted(unknown)}; valid: {', '.join(MoEConfig.__dataclass_fields__)}")
        return MoEConfig(**moe)
    raise TypeError(f"moe must be a MoEConfig, a dict of its fields or None; got {type(moe).__name__}")

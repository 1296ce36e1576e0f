"""What decides a training run's result: ``TrainConfig``, built from a preset's train section.

The same config serves training from scratch (``model_preset`` names the architecture) and
continued pretraining of a given model (``model_preset=None``, ``base_model`` names it), such as
ReLUfication, whose ``objective`` may be distillation from the original model. With ``moe`` set the
from-scratch model is a mixture of experts (``models.architecture.MoEConfig``, notebook 04), trained
exactly as the dense one; the field is recorded, so a dense run folder refuses an MoE config and back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from ..models.architecture import MoEConfig, moe_config
from ..presets import Preset, as_preset, get_preset

PRECISIONS = ("fp32", "bf16", "auto")
OBJECTIVES = ("lm", "kd", "kd+lm")  # next-token loss; KL to a teacher's distribution; their mean
TRAINABLE = ("all", "no-embeddings", "mlp")  # which parameters a run trains (the rest stay frozen)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run's result."""

    model_preset: str | None  # the architecture of a from-scratch model (a preset name); None: a given model
    variant: str  # gated-MLP variant (models.variants.VARIANTS)
    seed: int  # model initialisation and data order
    total_tokens: int  # training tokens; steps = total_tokens // (batch_size * context_length)
    batch_size: int  # sequences per optimiser step, over all processes
    micro_batch_size: int  # sequences per forward pass; the rest is gradient accumulation
    context_length: int
    lr: float
    warmup_steps: int
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.01  # table 12
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = "auto"
    mixture: str = "table4"
    tokenizer: str = "ours"  # "ours" (the project's BPE) or the base model's name, whose tokenizer encodes the data
    base_model: str | None = None  # continued pretraining: the model trained from (recorded, for the config guard)
    objective: str = "lm"  # one of OBJECTIVES; kd needs a teacher passed to train()
    l1_coef: float = 0.0  # weight of an L1 penalty on the MLPs' combined activations (sparsity regularisation)
    l1_warmup_fraction: float = 0.0  # the L1 weight rises linearly from 0 over this share of the steps (ProSparse)
    hidden_coef: float = 0.0  # weight of the teacher's hidden states after every layer (normalised MSE), with kd
    up_anneal_fraction: float = 0.0  # dReLU's up ReLU comes in over this share of the steps (up_slope_at); 0: at once
    trainable: str = "all"  # one of TRAINABLE: "no-embeddings" freezes the (tied) embeddings, "mlp" all but the MLPs
    eval_every: int = 0  # steps between validation losses (0: only at the end)
    eval_sequences: int = 16  # validation sequences per evaluation (fixed set)
    checkpoint_every: int = 100
    log_every: int = 10
    moe: MoEConfig | None = None  # from scratch: split every MLP into routed experts (None: the dense model)

    def __post_init__(self):
        from ..models.variants import get_variant

        if self.model_preset is None and self.base_model is None:
            raise ValueError("a TrainConfig needs model_preset (from scratch) or base_model (continued pretraining)")
        if self.model_preset is not None:
            get_preset(self.model_preset)  # unknown names raise with the valid ones
        get_variant(self.variant)
        object.__setattr__(self, "moe", moe_config(self.moe))  # a dict (a run's stored JSON) becomes a MoEConfig
        if self.moe is not None and self.model_preset is None:
            raise ValueError("moe builds a from-scratch model: it needs model_preset")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if self.l1_coef < 0 or self.hidden_coef < 0:
            raise ValueError(f"l1_coef and hidden_coef must be >= 0; got {self.l1_coef}, {self.hidden_coef}")
        if not 0 <= self.l1_warmup_fraction <= 1:
            raise ValueError(f"l1_warmup_fraction must be in [0, 1]; got {self.l1_warmup_fraction}")
        if not 0 <= self.up_anneal_fraction <= 1:
            raise ValueError(f"up_anneal_fraction must be in [0, 1]; got {self.up_anneal_fraction}")
        if self.up_anneal_fraction > 0 and not get_variant(self.variant).relu_up:
            raise ValueError(
                f"up_anneal_fraction > 0 brings in a ReLU on the up branch; variant {self.variant!r} has none "
                "(only dReLU does)"
            )
        if self.hidden_coef > 0 and self.objective == "lm":
            raise ValueError("hidden_coef > 0 matches a teacher's hidden states: it needs objective kd or kd+lm")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"unknown trainable {self.trainable!r}; choose one of {', '.join(TRAINABLE)}")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})"
            )
        if self.steps < 1:
            raise ValueError(
                f"total_tokens (--total-tokens) {self.total_tokens} is less than one batch "
                f"({self.tokens_per_step} tokens)"
            )
        if not (self.lr > 0 and 0 <= self.min_lr_ratio <= 1 and self.warmup_steps >= 0):
            raise ValueError(
                f"need lr > 0, 0 <= min_lr_ratio <= 1, warmup_steps >= 0; got {self.lr}, "
                f"{self.min_lr_ratio}, {self.warmup_steps}"
            )

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.context_length

    @property
    def steps(self) -> int:
        return self.total_tokens // self.tokens_per_step


def train_config(preset: Preset | str, variant: str, seed: int = 0, moe: bool = False, **overrides) -> TrainConfig:
    """The from-scratch ``TrainConfig`` of a preset's train section for ``variant`` at ``seed``, with overrides;
    ``moe=True``: the mixture of experts of the preset's ``moe`` section, on the same tokens and schedule."""
    from dataclasses import asdict

    P = as_preset(preset)
    section = asdict(P.train)
    for extra in ("seeds", "variants"):  # what notebook 02 loops over, not part of one run
        section.pop(extra)
    valid = {f.name for f in fields(TrainConfig)}
    unknown = set(overrides) - valid
    if unknown:
        raise TypeError(f"unknown TrainConfig fields {sorted(unknown)}; valid: {', '.join(sorted(valid))}")
    if moe:
        overrides = {"moe": P.moe, **overrides}
    return TrainConfig(**{"model_preset": P.name, **section, "variant": variant, "seed": seed, **overrides})


def l1_at(step: int, cfg: TrainConfig) -> float:
    """The L1 weight at ``step``: ``l1_coef``, reached linearly over the first ``l1_warmup_fraction`` of the steps
    (ProSparse raises its penalty progressively, so the model recovers before it is pushed to zeros)."""
    ramp = cfg.l1_warmup_fraction * cfg.steps
    return cfg.l1_coef * (min(1.0, (step + 1) / ramp) if ramp >= 1 else 1.0)


def up_slope_at(step: int, cfg: TrainConfig) -> float:
    """The negative slope of dReLU's up branch during optimiser step ``step``: it falls linearly from 1 (a linear up,
    ReGLU's function) to 0 (dReLU) over the first ``up_anneal_fraction`` of the steps, then stays 0, so the model
    trains as dReLU for the rest of the run and is saved as one. Before the first step (the warm start) it is 1."""
    ramp = cfg.up_anneal_fraction * cfg.steps
    if step < 0:
        return 1.0 if ramp >= 1 else 0.0
    return max(0.0, 1.0 - (step + 1) / ramp) if ramp >= 1 else 0.0


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine down to ``lr * min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - 1 - cfg.warmup_steps)  # the last step sits on the floor
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))

"""What a training step minimises: next-token loss, distillation from a teacher's logits (KL) and hidden states
(normalised MSE after every layer), and the L1 penalty on combined activations, as ``TrainConfig`` asks for."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from .precision import autocast


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions, averaged over positions (nats per token)."""
    s = F.log_softmax(student_logits.float(), dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher_logits.float(), dim=-1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


class CombinedL1:
    """Sums mean |combined| over the MLPs of one forward pass (pre-hooks on every ``down_proj``)."""

    def __init__(self, model: nn.Module):
        from ..models.swap import mlp_modules

        self.total: torch.Tensor | None = None
        self.handles = [m.down_proj.register_forward_pre_hook(self._add) for m in mlp_modules(model)]
        self.n = len(self.handles)

    def _add(self, mod, args):
        if not torch.is_grad_enabled():  # evaluations run without autograd: they are not part of the loss
            return
        term = args[0].abs().mean()
        self.total = term if self.total is None else self.total + term

    def take(self) -> torch.Tensor:
        t, self.total = self.total, None
        return t / self.n

    def remove(self):
        for h in self.handles:
            h.remove()


def hidden_state_loss(student_hidden, teacher_hidden) -> torch.Tensor:
    """Mean over layers of ||h_student - h_teacher||^2 / ||h_teacher||^2 after every decoder layer (the
    embeddings, shared by both, are skipped): a dense signal at every depth, so a layer whose new MLP drifts is
    corrected where it drifts instead of only through the last layer's logits."""
    terms = [
        ((s.float() - t.float()) ** 2).sum() / (t.float() ** 2).sum().clamp_min(1e-12)
        for s, t in zip(student_hidden[1:], teacher_hidden[1:])
    ]
    return torch.stack(terms).mean()


def training_loss(
    model,
    teacher,
    x: torch.Tensor,
    cfg: TrainConfig,
    precision: str,
    l1: CombinedL1 | None = None,
    l1_coef: float = 0.0,
) -> torch.Tensor:
    objective, hidden = cfg.objective, cfg.hidden_coef > 0
    with autocast(precision):
        out = model(input_ids=x, labels=x if objective != "kd" else None, use_cache=False, output_hidden_states=hidden)
    penalty = l1_coef * l1.take() if l1 is not None else 0.0
    if objective == "lm":
        return out.loss + penalty
    with torch.inference_mode():
        t_out = teacher(input_ids=x, use_cache=False, output_hidden_states=hidden)
    kd = distillation_loss(out.logits, t_out.logits.clone())  # a clone leaves inference mode, for autograd
    loss = kd if objective == "kd" else 0.5 * (kd + out.loss)
    if hidden:
        loss = loss + cfg.hidden_coef * hidden_state_loss(out.hidden_states, [h.clone() for h in t_out.hidden_states])
    return loss + penalty

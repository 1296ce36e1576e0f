"""Neurons inside experts: per-expert load and sparsity, and the parameters a token activates (section 6.2).

Section 6.2: Mixtral routes each token to 2 of 8 experts (25% of the expert parameters), and after ReLUfication
each routed expert fires about 15% of its neurons, so about 3% of the MoE parameters take part per token.
``expert_activity`` measures both numbers on a token stream, for any model the instruments support (dense
models too: there the routing fraction is 1).

Counting, exactly (no sampling):

- a gated MLP's neuron is *active* for a token when its combined value, the input of ``down_proj``, is not
  exactly zero; an active neuron uses its gate row, its up row and its down column (``3 H`` parameters, plus
  the gate and up biases where there are any); an inactive one uses none of them (a predictor, section 7,
  would skip all three). A unit's down bias is used by every token that reaches the unit;
- a routed expert counts only on the tokens routed to it; a dense MLP and a shared expert on every token;
- every other parameter (attention, norms, router, embeddings, lm_head) counts as active for every token, as
  the paper counts them (Mixtral: 12.9B active of 46.7B = 2 of 8 experts plus everything outside the experts).

Masks compose: an ``ActivityCounter`` entered *inside* a ``sparsity.masks`` top-k mask counts the masked
combined values, so it measures the parameters a top-k mask leaves active.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..models.swap import count_parameters
from .instruments import MLPInstrument, run_over_stream


def _neuron_params(mlp: nn.Module) -> int:
    """Parameters one active neuron of ``mlp`` uses: its gate row, up row and down column (and gate / up biases)."""
    p = mlp.gate_proj.in_features + mlp.up_proj.in_features + mlp.down_proj.out_features
    return p + sum(getattr(mlp, n).bias is not None for n in ("gate_proj", "up_proj"))


def _unit_params(mlp: nn.Module) -> int:
    """All parameters of a gated MLP (for a routed expert: its rows of the fused tensors)."""
    n = mlp.gate_proj.out_features
    down_bias = mlp.down_proj.bias.numel() if mlp.down_proj.bias is not None else 0
    return n * _neuron_params(mlp) + down_bias


class ActivityCounter(MLPInstrument):
    """Per unit (dense MLP, routed expert or shared expert): tokens that reached it, and per neuron the tokens on
    which its combined value was non-zero. Counts are exact integers."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.tokens = np.zeros(len(self.mlps), dtype=np.int64)
        self.neuron_counts = [np.zeros(m.gate_proj.out_features, dtype=np.int64) for m in self.mlps]

    def _register(self) -> None:
        for i, mlp in enumerate(self.mlps):

            def on_down(mod, args, i=i, mlp=mlp):
                with torch.no_grad():
                    live_TN = self._tokens(args[0], mlp) != 0
                    self.neuron_counts[i] += live_TN.sum(0).cpu().numpy().astype(np.int64)
                    self.tokens[i] += live_TN.shape[0]

            self._handles.append(mlp.down_proj.register_forward_pre_hook(on_down))

    def unit_frame(self) -> pd.DataFrame:
        """One row per unit: layer, expert (-1: dense MLP or shared expert), role, tokens, load (a routed expert's
        share of its layer's routed token slots), neurons, active_per_token (mean active neurons per token it saw),
        zero_frac (exact zeros of combined over its tokens; NaN if it saw none)."""
        rows = []
        for u, tok, cnt in zip(self.units, self.tokens, self.neuron_counts):
            rows.append(
                {
                    "layer": u.layer,
                    "expert": -1 if u.expert is None else u.expert,
                    "role": u.role,
                    "tokens": int(tok),
                    "neurons": len(cnt),
                    "active_per_token": cnt.sum() / tok if tok else np.nan,
                    "zero_frac": 1 - cnt.sum() / (tok * len(cnt)) if tok else np.nan,
                }
            )
        df = pd.DataFrame(rows)
        routed = df.role == "routed"
        slots = df[routed].groupby("layer").tokens.transform("sum")
        df["load"] = np.nan
        df.loc[routed, "load"] = df.tokens[routed] / slots.where(slots > 0)
        return df

    def neuron_frequencies(self, role: str = "routed") -> np.ndarray:
        """(layers, experts, N) for ``role="routed"`` (NaN for an expert that saw no token), else (units, N) of that
        role: per neuron, the fraction of the unit's tokens on which it fired."""
        idx = [i for i, u in enumerate(self.units) if u.role == role]
        if not idx:
            raise ValueError(f"no {role!r} units in this model (roles: {sorted({u.role for u in self.units})})")
        with np.errstate(invalid="ignore", divide="ignore"):
            freq = [self.neuron_counts[i] / self.tokens[i] for i in idx]
        if role != "routed":
            return np.stack(freq)
        layers = sorted({self.units[i].layer for i in idx})
        return np.stack([np.stack([f for i, f in zip(idx, freq) if self.units[i].layer == L]) for L in layers])


@dataclass(frozen=True)
class ParameterBudget:
    """The parameters of a model, split by what a token uses (``count_parameters``: tied weights once)."""

    total: int
    ffn: int  # every gated MLP: routed experts, shared experts, dense MLPs
    routed: int  # routed experts only (the "MoE parameters" of section 6.2; 0 in a dense model)
    always: int  # everything outside the gated MLPs: counted as active for every token

    @classmethod
    def of(cls, model: nn.Module, units) -> ParameterBudget:
        total = count_parameters(model)
        ffn = sum(_unit_params(u.mlp) for u in units)
        routed = sum(_unit_params(u.mlp) for u in units if u.role == "routed")
        return cls(total, ffn, routed, total - ffn)


def active_parameters(counter: ActivityCounter, n_tokens: int, budget: ParameterBudget | None = None) -> dict:
    """Mean parameters active per token from a filled ``ActivityCounter`` that saw ``n_tokens`` tokens.

    ``active`` = ``always`` + the active neurons' parameters; ``active_fraction`` of all parameters; of the routed
    experts' parameters ``routed_active_fraction`` (neurons' sparsity and routing together: the paper's 3%) and
    ``routing_fraction`` (every neuron of a routed expert counted: the paper's 25% for top-2 of 8).
    """
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1; got {n_tokens}")
    budget = budget or ParameterBudget.of(counter.model, counter.units)
    ffn_active = routed_active = routed_reached = 0
    for u, tok, cnt in zip(counter.units, counter.tokens, counter.neuron_counts):
        down_bias = u.mlp.down_proj.bias.numel() if u.mlp.down_proj.bias is not None else 0
        used = int(cnt.sum()) * _neuron_params(u.mlp) + int(tok) * down_bias
        ffn_active += used
        if u.role == "routed":
            routed_active += used
            routed_reached += int(tok) * _unit_params(u.mlp)
    active = budget.always + ffn_active / n_tokens
    nan = float("nan")
    return {
        "tokens": n_tokens,
        "total_params": budget.total,
        "always_active_params": budget.always,
        "ffn_params": budget.ffn,
        "routed_params": budget.routed,
        "active_params": active,
        "active_fraction": active / budget.total,
        "ffn_active_fraction": ffn_active / n_tokens / budget.ffn,
        "routed_active_fraction": routed_active / n_tokens / budget.routed if budget.routed else nan,
        "routing_fraction": routed_reached / n_tokens / budget.routed if budget.routed else nan,
    }


def expert_activity(
    model: nn.Module, token_ids, context_length: int = 512, batch_size: int = 4, mask=None
) -> tuple[pd.DataFrame, dict, ActivityCounter]:
    """Run ``model`` over ``token_ids`` (non-overlapping windows) and count, per unit and in total, what fires.

    ``mask``: an optional ``sparsity.masks.ActivationMask`` of the same model, entered around the run, so that the
    counts are those of the masked model. Returns ``ActivityCounter.unit_frame()``, ``active_parameters`` and
    the counter itself (for ``neuron_frequencies``).
    """
    n_rows = len(token_ids) // context_length
    counter = ActivityCounter(model)
    if mask is None:
        run_over_stream(counter, token_ids, context_length, batch_size)
    else:
        if mask.model is not model:
            raise ValueError("the mask belongs to another model")
        with mask:  # entered first, so the counter's hooks (registered after) see masked values
            run_over_stream(counter, token_ids, context_length, batch_size)
    return counter.unit_frame(), active_parameters(counter, n_rows * context_length), counter

"""How good a predictor is: recall, precision and predicted sparsity per layer, the threshold trade-off, held-out
perplexity with predicted masks, and what it costs per token against what it saves.

- ``layer_metrics``: on each layer's held-out captured tokens (the tail ``predictors.train`` never trained on).
  Recall is the share of truly active neurons the predictor keeps (a miss drops a live neuron: quality);
  precision the share of kept neurons that are truly active (a false positive reads one row for nothing:
  speed); predicted sparsity the share it leaves out; missed mass the share of the token's contribution to the
  residual stream that the dropped live neurons carried (``predictors.data``), closer to what quality follows:
  recall counts a neuron that moves the output by a hair like one that carries the token.
- ``operating_point``: the rule that picks where to run the predictors, by a perplexity budget. Candidates: each
  layer at the highest threshold whose missed mass stays under a bound (``layer_thresholds_for``), the bound
  raised step by step; and one threshold for every layer, raised step by step. The point is the sparsest candidate
  whose perplexity on calibration tokens (training split, never captured) stays within the budget over the exact
  masks. Notebook 07, the claims report and the README all read the point it picks.
- ``PredictedMask``: a PyTorch instrument that multiplies each FFN's combined activation by the predicted
  mask, so ``eval.perplexity`` gives the model's quality when only predicted neurons are computed. With
  exact-zero labels, a false positive changes nothing (that neuron is zero anyway) and a false negative
  zeroes a live neuron.
- ``cost_per_token``: the predictors' bytes and FLOPs per token against the FFN bytes they let the engine skip.
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from ..models.swap import decoder_layers
from ..sparsity.instruments import MLPInstrument
from .data import load_layer
from .model import PredictorSet
from .train import split


@torch.no_grad()
def layer_metrics(ps: PredictorSet, capture_dir, thresholds=(0.5,), val_fraction: float | None = None) -> pd.DataFrame:
    """One row per (layer, threshold) on the held-out captured tokens: recall, precision, predicted and true
    sparsity, the share of tokens whose every active neuron was kept, and the missed mass."""
    vf = val_fraction if val_fraction is not None else ps.meta.get("training", {}).get("val_fraction", 0.1)
    rows = []
    for i in range(len(ps.layers)):
        x, y, rel = load_layer(capture_dir, i, contributions=True)
        start = split(len(x), vf)
        x, y = x[start:], y[start:]
        live_mass = rel[start:] * y
        token_mass = live_mass.sum(1).clamp_min(torch.finfo(torch.float32).tiny)
        logits = ps.layers[i](x)
        for t in thresholds:
            pred = logits >= ps.logit_threshold(t)
            tp = (pred & y).sum().item()
            missed = (live_mass * ~pred).sum(1) / token_mass
            rows.append(
                {
                    "layer": i,
                    "threshold": t,
                    "recall": tp / max(1, y.sum().item()),
                    "precision": tp / max(1, pred.sum().item()),
                    "predicted_sparsity": 1 - pred.float().mean().item(),
                    "true_sparsity": 1 - y.float().mean().item(),
                    "tokens_all_kept": ((y & ~pred).sum(1) == 0).float().mean().item(),
                    "missed_mass": missed.mean().item(),
                    "tokens": len(x),
                }
            )
    return pd.DataFrame(rows)


class PredictedMask(MLPInstrument):
    """Keeps only the predicted-active neurons of combined (the input of every ``down_proj``), counting what it does."""

    def __init__(self, model: nn.Module, ps: PredictorSet, threshold: float | None = None):
        super().__init__(model)
        if len(ps.layers) != len(self.mlps):
            raise ValueError(f"{len(ps.layers)} predictors for a model of {len(self.mlps)} layers")
        self.ps, self.threshold = ps, threshold
        self.layers = decoder_layers(model)
        self._x: dict[int, torch.Tensor] = {}
        self.kept = [0] * len(self.mlps)  # neurons the mask kept
        self.live = [0] * len(self.mlps)  # neurons non-zero before masking
        self.live_kept = [0] * len(self.mlps)
        self.entries = [0] * len(self.mlps)

    def _register(self) -> None:
        for i, (layer, mlp) in enumerate(zip(self.layers, self.mlps)):
            point = layer.post_attention_layernorm if self.ps.source == "residual" else mlp

            def keep_x(mod, args, i=i):
                self._x[i] = args[0]

            def mask(mod, args, i=i):
                c = args[0]
                keep = self.ps.predict(i, self._x[i], self.threshold).to(c.dtype)
                with torch.no_grad():
                    live = c != 0
                    self.kept[i] += int(keep.sum())
                    self.live[i] += int(live.sum())
                    self.live_kept[i] += int((live & (keep > 0)).sum())
                    self.entries[i] += c.numel()
                return (c * keep, *args[1:])

            self._handles.append(point.register_forward_pre_hook(keep_x))
            self._handles.append(mlp.down_proj.register_forward_pre_hook(mask))

    def summary(self) -> dict:
        """Over all layers and tokens: the predicted sparsity, the true (exact-zero) sparsity, and recall."""
        n = sum(self.entries) or 1
        return {
            "predicted_sparsity": 1 - sum(self.kept) / n,
            "true_sparsity": 1 - sum(self.live) / n,
            "recall": sum(self.live_kept) / max(1, sum(self.live)),
        }


def cost_per_token(ps: PredictorSet, ffn_active: float, bytes_per_weight: float = 4.0) -> dict:
    """Bytes and FLOPs of running every predictor for one token, and the FFN bytes the predicted mask saves
    (gate, up and down rows of the inactive neurons: ``3 H N (1 - active)`` weights per layer)."""
    params = ps.n_params()
    ffn_saved = len(ps.layers) * 3 * ps.hidden * ps.intermediate * (1 - ffn_active) * bytes_per_weight
    return {
        "predictor_params": params,
        "predictor_bytes": params * bytes_per_weight,
        "predictor_flops": 2 * params,
        "ffn_bytes_saved": ffn_saved,
        "predictor_over_saved": params * bytes_per_weight / max(1.0, ffn_saved),
    }


# bounds on the missed mass per layer that ``operating_point`` tries, from the most careful up; about sqrt(2) apart
# where the points of notebook 07 fall (a step of 2 there moved calibration perplexity from +1.3% to +2.6%)
MISSED_MASS_BOUNDS = (
    0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.007, 0.01, 0.014, 0.02, 0.028, 0.04, 0.05, 0.07, 0.1, 0.2, 0.3,
)  # fmt: skip
# one threshold for every layer, the other family of candidates ``operating_point`` tries
UNIFORM_THRESHOLDS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7)
# probability thresholds ``layer_thresholds_for`` chooses from: fine enough to give each layer its own
THRESHOLD_GRID = tuple(round(0.02 * i, 2) for i in range(1, 50))


def layer_thresholds_for(table: pd.DataFrame, max_missed: float) -> list[float]:
    """Per layer, the highest threshold (the most sparsity) whose ``missed_mass`` is at most ``max_missed``; a layer
    where none is gets its lowest threshold. ``table``: ``layer_metrics`` over a grid of thresholds."""
    out = []
    for _, g in table.groupby("layer", sort=True):
        ok = g[g.missed_mass <= max_missed]
        out.append(float(ok.threshold.max() if len(ok) else g.threshold.min()))
    return out


def _candidates(table: pd.DataFrame, bounds, uniform) -> list[list[dict]]:
    """The two families of per-layer thresholds, each from the most careful up: the rule, its bound on the missed
    mass or its one threshold (NaN for the other), and the thresholds of every layer."""
    n_layers, nan = table.layer.nunique(), float("nan")
    per_layer = [
        {"rule": f"per layer, missed mass <= {b:g}", "max_missed_mass": b, "threshold": nan,
         "thresholds": layer_thresholds_for(table, b)}
        for b in sorted(bounds)
    ]  # fmt: skip
    one = [
        {"rule": f"threshold {t:g} in every layer", "max_missed_mass": nan, "threshold": t,
         "thresholds": [float(t)] * n_layers}
        for t in sorted(uniform)
    ]  # fmt: skip
    return [per_layer, one]


def operating_point(
    model: nn.Module,
    ps: PredictorSet,
    table: pd.DataFrame,
    calibration_ids: torch.Tensor,
    context_length: int,
    budget: float,
    bounds=MISSED_MASS_BOUNDS,
    uniform=UNIFORM_THRESHOLDS,
) -> tuple[dict | None, pd.DataFrame]:
    """The predictors' operating point for a perplexity budget (``budget`` = 0.02: at most 2% over the exact masks).

    Two families of candidates, each scored on ``calibration_ids`` with its predicted masks: per bound on the missed
    mass, every layer takes ``layer_thresholds_for(table, bound)`` (a layer whose misses carry little gets a higher
    threshold); and one threshold for every layer (``uniform``; empty: none). The point is the sparsest candidate
    whose perplexity stays within ``1 + budget`` of the model's own (exact masks) on the same tokens; None if none
    does. Each family stops after two candidates in a row over the budget. Returns (point: rule, bound or threshold,
    per-layer thresholds, calibration ratio, predicted sparsity, recall; the sweep). ``ps`` keeps its thresholds.
    """
    from ..eval.perplexity import perplexity

    if budget < 0:
        raise ValueError(f"budget is a relative perplexity increase >= 0; got {budget}")
    if "missed_mass" not in table:
        raise ValueError("the table has no missed mass: capture with contributions (predictors.data.capture)")
    exact = perplexity(model, calibration_ids, context_length=context_length)
    before, rows = ps.layer_thresholds, []
    try:
        for family in _candidates(table, bounds, uniform):
            over = 0
            for candidate in family:
                ts = candidate.pop("thresholds")  # the row's last column, as the notebooks' tables have it
                ps.set_layer_thresholds(ts)
                with PredictedMask(model, ps) as pm:
                    r = perplexity(model, calibration_ids, context_length=context_length)
                rows.append({**candidate, "calibration_ratio": r.ppl / exact.ppl, **pm.summary(), "thresholds": ts})
                over = over + 1 if rows[-1]["calibration_ratio"] > 1 + budget else 0
                if over == 2:
                    break  # two in a row over the budget: looser ones only lose more
    finally:
        ps.set_layer_thresholds(before)
    sweep = pd.DataFrame(rows)
    ok = sweep[sweep.calibration_ratio <= 1 + budget]
    if ok.empty:
        return None, sweep
    return ok.loc[ok.predicted_sparsity.idxmax()].to_dict(), sweep


def best_points(points: pd.DataFrame) -> pd.Series:
    """Which operating point each model runs at: per ``model``, the row with the highest predicted sparsity among
    those that found a point within the budget (on calibration tokens, so the held-out set does not choose).
    ``points``: one row per (model, predictor) with ``predicted_sparsity`` (NaN where no point was found)."""
    chosen = pd.Series(False, index=points.index)
    if "predicted_sparsity" not in points:  # no model found a point
        return chosen
    for _, g in points[points.predicted_sparsity.notna()].groupby("model"):
        chosen[g.predicted_sparsity.idxmax()] = True
    return chosen

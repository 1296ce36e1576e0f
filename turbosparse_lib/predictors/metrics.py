"""How good a predictor is: recall, precision and predicted sparsity per layer, the threshold trade-off, held-out
perplexity with predicted masks, and what it costs per token against what it saves.

- ``layer_metrics``: on each layer's held-out captured tokens (the tail ``predictors.train`` never trained on).
  Recall is the share of truly active neurons the predictor keeps (a miss drops a live neuron: quality);
  precision the share of kept neurons that are truly active (a false positive reads one row for nothing:
  speed); predicted sparsity the share it leaves out.
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
    sparsity, and the share of tokens whose every active neuron was kept."""
    vf = val_fraction if val_fraction is not None else ps.meta.get("training", {}).get("val_fraction", 0.1)
    rows = []
    for i in range(len(ps.layers)):
        x, y = load_layer(capture_dir, i)
        start = split(len(x), vf)
        x, y = x[start:], y[start:]
        logits = ps.layers[i](x)
        for t in thresholds:
            pred = logits >= ps.logit_threshold(t)
            tp = (pred & y).sum().item()
            rows.append(
                {
                    "layer": i,
                    "threshold": t,
                    "recall": tp / max(1, y.sum().item()),
                    "precision": tp / max(1, pred.sum().item()),
                    "predicted_sparsity": 1 - pred.float().mean().item(),
                    "true_sparsity": 1 - y.float().mean().item(),
                    "tokens_all_kept": ((y & ~pred).sum(1) == 0).float().mean().item(),
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


def choose_threshold(by_threshold: pd.DataFrame, max_sparsity_gap: float = 0.05) -> dict | None:
    """Among thresholds (index) whose mean predicted sparsity is within ``max_sparsity_gap`` of the true sparsity,
    the one with the best recall (None if none qualifies). ``by_threshold``: mean recall, predicted_sparsity and
    true_sparsity per threshold, as ``layer_metrics(...).groupby('threshold').mean()`` gives."""
    ok = by_threshold[(by_threshold.true_sparsity - by_threshold.predicted_sparsity).abs() <= max_sparsity_gap]
    if ok.empty:
        return None
    t = ok.recall.idxmax()
    return {"threshold": float(t), **{k: float(v) for k, v in ok.loc[t].items()}}

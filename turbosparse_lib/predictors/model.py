"""Activation predictors: one small low-rank MLP per FFN that guesses which neurons will fire.

Two kinds, each giving every neuron's logit of firing:

- ``"mlp"``, as in the paper (section 7, after PowerInfer / Deja Vu): ``logits = W2 relu(W1 x) + b``, with ``W1`` of
  shape (rank, hidden) and ``W2`` of shape (intermediate, rank), learnt from labels;
- ``"preview"`` (ours, for dReLU): a low-rank preview of the gate and up pre-activations fitted from the FFN's own
  weights, then tuned (``predictors.preview``).

A neuron is predicted active when its probability
``sigmoid(logit)`` is at least the threshold: one for every layer, or one per layer (``layer_thresholds``, set by
``predictors.metrics.operating_point`` from a perplexity budget). The rank is chosen per layer (``ranks``), so a
layer that is hard to predict can get more capacity.

A ``PredictorSet`` saves beside the model it serves (``predictors.safetensors`` and ``predictors.json`` in
the model's folder, both written atomically) and loads from there; the JSON records the model's sizes and
the capture configuration (input source, labels), and loading refuses predictors made for another model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_path, write_json
from .preview import PreactivationPreview

WEIGHTS_FILE = "predictors.safetensors"
CONFIG_FILE = "predictors.json"


def _logit(p: float) -> float:
    if not 0.0 < p < 1.0:
        raise ValueError(f"threshold must be a probability in (0, 1); got {p}")
    return math.log(p / (1 - p))


class LowRankPredictor(nn.Module):
    """``hidden -> rank -> intermediate`` with a ReLU between: the logits of each neuron firing."""

    def __init__(self, hidden: int, intermediate: int, rank: int):
        super().__init__()
        if not 1 <= rank <= hidden:
            raise ValueError(f"rank must be in [1, hidden={hidden}]; got {rank}")
        self.down = nn.Linear(hidden, rank, bias=False)  # W1 (rank, hidden)
        self.up = nn.Linear(rank, intermediate, bias=True)  # W2 (intermediate, rank), b (intermediate,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., H) -> (..., N)
        return self.up(torch.relu(self.down(x)))

    def log_probs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log P(fires), log P(silent)), each (..., N): what the training loss reads, for either kind."""
        logits = self(x)
        return nn.functional.logsigmoid(logits), nn.functional.logsigmoid(-logits)


KINDS = {"mlp": LowRankPredictor, "preview": PreactivationPreview}


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown predictor kind {kind!r}; choose one of {', '.join(KINDS)}")


class PredictorSet(nn.Module):
    """One predictor per layer (``kind``: a ``LowRankPredictor`` or a ``PreactivationPreview``), with what they
    were trained for."""

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        ranks: list[int],
        source: str = "residual",
        label: str = "nonzero",
        threshold: float = 0.5,
        meta: dict | None = None,
        layer_thresholds: list[float] | None = None,
        kind: str = "mlp",
    ):
        super().__init__()
        check_kind(kind)
        self.kind = kind
        self.hidden, self.intermediate, self.ranks = hidden, intermediate, list(ranks)
        self.source, self.label, self.threshold = source, label, float(threshold)
        self.meta = dict(meta or {})
        self.layers = nn.ModuleList(KINDS[kind](hidden, intermediate, r) for r in ranks)
        self.layer_thresholds: list[float] | None = None
        if layer_thresholds is not None:
            self.set_layer_thresholds(layer_thresholds)

    def set_layer_thresholds(self, thresholds: list[float] | None) -> PredictorSet:
        """One probability threshold per layer (None: ``threshold`` for every layer); returns self."""
        if thresholds is not None:
            if len(thresholds) != len(self.layers):
                raise ValueError(f"{len(thresholds)} thresholds for {len(self.layers)} layers")
            for t in thresholds:
                _logit(t)
            thresholds = [float(t) for t in thresholds]
        self.layer_thresholds = thresholds
        return self

    def logit_threshold(self, threshold: float | None = None, layer: int | None = None) -> float:
        """The logit a neuron's must reach: of ``threshold`` if given, else of ``layer``'s own threshold (when the set
        has per-layer ones), else of the set's."""
        if threshold is None:
            own = self.layer_thresholds is not None and layer is not None
            threshold = self.layer_thresholds[layer] if own else self.threshold
        return _logit(threshold)

    @torch.no_grad()
    def predict(self, layer: int, x: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
        """(..., H) -> (..., N) bool: the neurons predicted active (``threshold``, else the layer's own)."""
        return self.layers[layer](x.float()) >= self.logit_threshold(threshold, layer)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def config(self) -> dict:
        return {
            "kind": self.kind,
            "hidden": self.hidden,
            "intermediate": self.intermediate,
            "ranks": self.ranks,
            "source": self.source,
            "label": self.label,
            "threshold": self.threshold,
            "layer_thresholds": self.layer_thresholds,
            "meta": self.meta,
        }

    def save(self, model_dir: str | Path) -> Path:
        """Write the predictors into ``model_dir`` beside the model (weights first, then the JSON)."""
        from safetensors.torch import save_file

        model_dir = Path(model_dir)
        with atomic_path(model_dir / WEIGHTS_FILE) as tmp:
            save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(tmp))
        write_json(model_dir / CONFIG_FILE, self.config())
        return model_dir

    @classmethod
    def load(cls, model_dir: str | Path, model=None) -> PredictorSet:
        """The predictors saved in ``model_dir``; with ``model`` given, its sizes must match theirs."""
        from safetensors.torch import load_file

        model_dir = Path(model_dir)
        if not (model_dir / CONFIG_FILE).exists():
            raise FileNotFoundError(
                f"no predictors in {model_dir}: train them first (predictors.train.train_predictors)"
            )
        cfg = json.loads((model_dir / CONFIG_FILE).read_text())
        if model is not None:
            from ..models.swap import mlp_modules

            mlps = mlp_modules(model)
            want = (model.config.hidden_size, mlps[0].down_proj.in_features, len(mlps))
            got = (cfg["hidden"], cfg["intermediate"], len(cfg["ranks"]))
            if want != got:
                raise ValueError(
                    f"predictors in {model_dir} are for (hidden, intermediate, layers) = {got}; this model is {want}"
                )
        ps = cls(
            cfg["hidden"],
            cfg["intermediate"],
            cfg["ranks"],
            cfg["source"],
            cfg["label"],
            cfg["threshold"],
            cfg.get("meta"),
            cfg.get("layer_thresholds"),
            cfg.get("kind", "mlp"),  # predictors saved before the preview existed are all MLPs
        )
        ps.load_state_dict(load_file(str(model_dir / WEIGHTS_FILE)))
        return ps.eval()

"""Training activation predictors on captured data, one layer at a time, resumably.

- Kind ``"mlp"`` (``predictors.model.LowRankPredictor``) starts from random weights; kind ``"preview"``
  (``predictors.preview``) starts from its fit to the layer's own gate and up weights, so training needs the model
  and a capture of the normalised FFN inputs (``source="normed"``). Both are then trained with the loss below.

- Loss ``"bce"``: class-weighted binary cross-entropy. Active neurons are the minority (10-20% for a dReLU model),
  and a missed active neuron (a false negative) costs quality while a false positive only costs one row read,
  so the positives are weighted by ``neg / pos`` of the layer (capped at ``max_pos_weight``).
- Loss ``"contribution"``: the same, but each positive weighs in proportion to its contribution to the residual
  stream (``predictors.data``), relative to the mean live contribution of its token (capped at
  ``max_contribution_weight``): the binary loss treats a neuron that moves the output by a hair like one that
  carries the token, and quality depends on the latter. The positives' total weight is unchanged.
- The last ``val_fraction`` of each layer's tokens is held out for the metrics (``predictors.metrics``).
- Each finished layer is stored in ``<work_dir>/layer-XX.safetensors``; a rerun skips finished layers, so a
  killed training resumes at the layer it was in. ``train_predictors`` returns the whole ``PredictorSet``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..atomic import atomic_path, write_json
from .data import CAPTURE_FILE, load_layer
from .model import KINDS, PredictorSet, check_kind
from .preview import PreactivationPreview


@dataclass(frozen=True)
class PredictorTraining:
    rank: int | list[int] = 128  # one rank for every layer, or one per layer
    epochs: int = 8
    batch_size: int = 1024
    lr: float = 2e-3
    weight_decay: float = 0.0
    val_fraction: float = 0.1
    max_pos_weight: float = 20.0
    loss: str = "bce"  # "bce" or "contribution" (positives weighted by their contribution)
    kind: str = "mlp"  # "mlp" (low-rank MLP, from random weights) or "preview" (fitted from the FFN's weights)
    max_contribution_weight: float = 50.0  # "contribution": a positive weighs at most this many mean positives
    seed: int = 0

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"unknown predictor loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        check_kind(self.kind)


LOSSES = ("bce", "contribution")
KIND_NAMES = {"mlp": "low-rank MLP", "preview": "pre-activation preview"}


def predictor_label(kind: str, loss: str) -> str:
    """How notebook 07, the claims report and the README name a set of predictors: ``low-rank MLP, bce loss``."""
    check_kind(kind)
    return f"{KIND_NAMES[kind]}, {loss} loss"


def _ranks(cfg: PredictorTraining, n_layers: int) -> list[int]:
    if isinstance(cfg.rank, int):
        return [cfg.rank] * n_layers
    if len(cfg.rank) != n_layers:
        raise ValueError(f"{len(cfg.rank)} ranks for {n_layers} layers")
    return list(cfg.rank)


def split(n: int, val_fraction: float) -> int:
    """Index where the held-out tail of a layer's tokens begins."""
    return max(1, int(round(n * (1 - val_fraction))))


def contribution_weights(y: torch.Tensor, rel: torch.Tensor, pos_weight, cap: float) -> torch.Tensor:
    """Per-entry loss weights: 1 for a negative; for a positive ``pos_weight`` times its contribution over the mean
    contribution of its token's positives, at most ``cap`` times, so a token's positives weigh ``pos_weight`` each
    on average (up to the cap) but the large ones most."""
    live = y.float()
    mean = (rel * live).sum(-1, keepdim=True) / live.sum(-1, keepdim=True).clamp_min(1)
    share = (rel / mean.clamp_min(torch.finfo(torch.float32).tiny)).clamp(max=cap)
    return torch.where(y.bool(), pos_weight * share, torch.ones_like(rel))


def weighted_bce(net, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of ``net``'s firing probabilities against labels ``y``, entry ``i`` weighted ``w[i]``
    (mean over entries); from the net's log-probabilities, which the preview computes without a logit."""
    log_p, log_q = net.log_probs(x)
    return -(w * torch.where(y, log_p, log_q)).mean()


def train_layer(
    x: torch.Tensor,
    y: torch.Tensor,
    rank: int,
    cfg: PredictorTraining,
    rel: torch.Tensor | None = None,
    net: torch.nn.Module | None = None,
) -> tuple[torch.nn.Module, dict]:
    """One layer's predictor from inputs ``x`` (T, H) and labels ``y`` (T, N) (the held-out tail is not used);
    loss ``"contribution"`` needs ``rel``, each neuron's contribution relative to its token's largest (T, N).
    ``net``: where training starts (a fitted preview); None: a ``cfg.kind`` predictor of ``rank`` from ``cfg.seed``."""
    if cfg.loss == "contribution" and rel is None:
        raise ValueError("loss 'contribution' needs the captured contributions (load_layer(..., contributions=True))")
    g = torch.Generator().manual_seed(cfg.seed)
    n_train = split(len(x), cfg.val_fraction)
    xt, yt = x[:n_train], y[:n_train].bool()
    pos = yt.float().mean().clamp(1e-6, 1 - 1e-6)
    pos_weight = torch.clamp((1 - pos) / pos, max=cfg.max_pos_weight)
    torch.manual_seed(cfg.seed)
    net = net if net is not None else KINDS[cfg.kind](x.shape[1], y.shape[1], rank)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * max(1, n_train // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    t0, last = time.perf_counter(), float("nan")
    for _ in range(cfg.epochs):
        order = torch.randperm(n_train, generator=g)
        for b in range(0, max(1, n_train - cfg.batch_size + 1), cfg.batch_size):
            idx = order[b : b + cfg.batch_size]
            if cfg.loss == "contribution":
                w = contribution_weights(yt[idx], rel[idx], pos_weight, cfg.max_contribution_weight)
            else:
                w = torch.where(yt[idx], pos_weight, torch.ones(()))
            loss = weighted_bce(net, xt[idx], yt[idx], w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            last = float(loss.detach())
    return net.eval(), {
        "train_tokens": n_train,
        "pos_fraction": float(pos),
        "pos_weight": float(pos_weight),
        "final_loss": last,
        "seconds": time.perf_counter() - t0,
    }


def _preview_start(model, layer: int, x: torch.Tensor, rank: int, cfg: PredictorTraining):
    """The preview fitted to ``layer``'s gate and up weights on the training split of its captured inputs."""
    from ..models.swap import mlp_modules

    mlp = mlp_modules(model)[layer]
    n_train = split(len(x), cfg.val_fraction)
    return PreactivationPreview.fit(x[:n_train], mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(), rank)


def check_preview_inputs(model, info: dict) -> None:
    """A preview needs the captured model, a dReLU one, captured on its normalised FFN inputs."""
    from ..inference.hf_config import mlp_variant_of

    if model is None:
        raise ValueError("kind 'preview' starts from the FFN's weights: pass the captured model (model=...)")
    if info["source"] != "normed":
        raise ValueError(
            f"kind 'preview' reads the normalised FFN input, but this capture holds {info['source']!r} inputs: "
            "capture again with CaptureConfig(source='normed') into another folder"
        )
    variant = mlp_variant_of(model.config)
    if variant != "drelu" or info["label"] != "nonzero":
        raise ValueError(
            f"kind 'preview' predicts dReLU's exact zeros (both branches > 0); this is a {variant!r} model with "
            f"{info['label']!r} labels: use kind 'mlp'"
        )


def train_predictors(
    capture_dir: str | Path,
    work_dir: str | Path,
    cfg: PredictorTraining = PredictorTraining(),
    progress: bool | None = None,
    model=None,
) -> PredictorSet:
    """A ``PredictorSet`` for the captured model, trained layer by layer (resuming at the first missing layer).
    Kind ``"preview"`` needs the captured ``model`` itself: its gate and up weights are where training starts."""
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    from ..eval.perplexity import progress_enabled

    capture_dir, work_dir = Path(capture_dir), Path(work_dir)
    info = json.loads((capture_dir / CAPTURE_FILE).read_text())
    ranks = _ranks(cfg, info["layers"])
    if cfg.kind == "preview":
        check_preview_inputs(model, info)
    work_dir.mkdir(parents=True, exist_ok=True)
    guard = work_dir / "training.json"
    ours = {"training": asdict(cfg), "capture": info}
    stored = json.loads(guard.read_text()) if guard.exists() else None
    if stored is not None:
        stored["training"].setdefault("kind", "mlp")  # written before there were two kinds
    if stored is not None and stored != json.loads(json.dumps(ours)):
        raise ValueError(f"{work_dir} holds predictors trained with another configuration; use another folder")
    write_json(guard, ours)
    ps = PredictorSet(
        info["hidden"],
        info["intermediate"],
        ranks,
        info["source"],
        info["label"],
        meta={"training": asdict(cfg), "capture_tokens": info["tokens"], "layers": {}},
        kind=cfg.kind,
    )
    for i in tqdm(range(info["layers"]), desc="predictors", disable=not progress_enabled(progress)):
        path = work_dir / f"layer-{i:02d}.safetensors"
        if path.exists():
            ps.layers[i].load_state_dict(load_file(str(path)))
            ps.meta["layers"][str(i)] = json.loads((work_dir / f"layer-{i:02d}.json").read_text())
            continue
        if cfg.loss == "contribution":
            x, y, rel = load_layer(capture_dir, i, contributions=True)
        else:
            (x, y), rel = load_layer(capture_dir, i), None
        start = _preview_start(model, i, x, ranks[i], cfg) if cfg.kind == "preview" else None
        net, stats = train_layer(x, y, ranks[i], cfg, rel, start)
        ps.layers[i].load_state_dict(net.state_dict())
        ps.meta["layers"][str(i)] = stats
        write_json(work_dir / f"layer-{i:02d}.json", stats)
        with atomic_path(path) as tmp:  # last: its presence marks the layer finished
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    return ps.eval()

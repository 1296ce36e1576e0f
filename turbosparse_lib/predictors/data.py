"""Training data for activation predictors: each FFN's input and which of its neurons fire, captured in shards.

For every layer and token we keep the FFN's input and a label per neuron:

- input ``source="residual"``: the residual stream entering the FFN's RMSNorm, as PowerInfer's predictors
  read it; ``"normed"``: the normalised input the MLP itself sees (what the decode engine hands a mask provider);
- label ``"nonzero"``: the neuron's combined value is not exactly zero (dReLU, ReGLU: the exact mask);
  ``"topk"``: the neuron is among the ``kept_count(topk_sparsity, N)`` largest |combined| (SwiGLU has no zeros);
- and, per neuron, how much it contributes: ``|combined_i| * ||W_down[:, i]||``, the size of what the neuron adds
  to the residual stream, relative to the token's largest in that layer. Quality depends on a few large
  contributions (notebook 07: predictors that keep 98% of the live neurons can still cost far more perplexity than
  ones that keep fewer but the right ones). Training (``predictors.train``, loss ``"contribution"``) and the
  missed mass of ``predictors.metrics.layer_metrics``, on which the operating points rest, weigh neurons by it.

Storage is bounded and resumable: shard ``i`` holds tokens ``[i*S, (i+1)*S)`` of the stream, inputs in float16 and
labels bit-packed along the neuron axis (``np.packbits``), contributions as one byte each on a log scale
(``contribution_codes``: 1/16 octave steps over 16 octaves below the token's largest), one safetensors file per
shard written under a temporary name; a rerun skips the shards already on disk, and ``capture.json`` (written
last) records the configuration, so a folder made with another configuration is refused rather than mixed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_path, write_json
from ..models.swap import decoder_layers, mlp_modules
from ..sparsity.masks import kept_count, topk_keep

CAPTURE_FILE = "capture.json"
CODE_STEPS_PER_OCTAVE = 16  # contribution codes: 255 is the token's largest, each step down 2^(-1/16) of it


def contribution_codes(contribution: torch.Tensor) -> torch.Tensor:
    """(..., N) contributions (>= 0) -> uint8 codes: 0 for an exact zero, else ``255 + 16 log2(c / max_c)`` over
    the last axis, rounded, at least 1 (a live neuron 16 octaves below the largest still reads as live)."""
    top = contribution.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    rel = (contribution.float() / top).clamp_min(torch.finfo(torch.float32).tiny)
    code = (255 + CODE_STEPS_PER_OCTAVE * torch.log2(rel)).round().clamp(1, 255)
    return torch.where(contribution > 0, code, torch.zeros_like(code)).to(torch.uint8)


def relative_contributions(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes -> float32 contributions relative to the token's largest (0 for code 0); ``contribution_codes``
    inverted to within 2^(1/32), 2.2%."""
    rel = torch.exp2((codes.float() - 255) / CODE_STEPS_PER_OCTAVE)
    return torch.where(codes > 0, rel, torch.zeros_like(rel))


@dataclass(frozen=True)
class CaptureConfig:
    source: Literal["residual", "normed"] = "residual"
    label: Literal["nonzero", "topk"] = "nonzero"
    topk_sparsity: float = 0.9  # for label="topk"
    tokens_per_shard: int = 4096
    context_length: int = 256

    def __post_init__(self):
        if self.source not in ("residual", "normed"):
            raise ValueError(f"unknown predictor input source {self.source!r}; choose 'residual' or 'normed'")
        if self.label not in ("nonzero", "topk"):
            raise ValueError(f"unknown label {self.label!r}; choose 'nonzero' (exact zeros) or 'topk'")
        kept_count(self.topk_sparsity, 1)  # validates the sparsity
        if self.tokens_per_shard % self.context_length:
            raise ValueError(
                f"tokens_per_shard ({self.tokens_per_shard}) must be a multiple of context_length "
                f"({self.context_length})"
            )


def labels_of(combined: torch.Tensor, cfg: CaptureConfig) -> torch.Tensor:
    """(..., N) combined -> (..., N) bool: the neurons a predictor should call active."""
    if cfg.label == "nonzero":
        return combined != 0
    return topk_keep(combined, kept_count(cfg.topk_sparsity, combined.shape[-1])) != 0


class _Capture:
    """Hooks that collect, for one forward pass, every layer's FFN input and neuron labels."""

    def __init__(self, model: nn.Module, cfg: CaptureConfig):
        self.cfg, self.handles = cfg, []
        self.x: dict[int, torch.Tensor] = {}
        self.y: dict[int, torch.Tensor] = {}
        self.m: dict[int, torch.Tensor] = {}
        self.down_norms = [mlp.down_proj.weight.detach().float().norm(dim=0) for mlp in mlp_modules(model)]  # (N,)
        for i, (layer, mlp) in enumerate(zip(decoder_layers(model), mlp_modules(model))):
            if cfg.source == "residual":
                self.handles.append(layer.post_attention_layernorm.register_forward_pre_hook(self._keep_x(i)))
            else:
                self.handles.append(mlp.register_forward_pre_hook(self._keep_x(i)))
            self.handles.append(mlp.down_proj.register_forward_pre_hook(self._keep_y(i)))

    def _keep_x(self, i):
        def hook(mod, args):
            self.x[i] = args[0].detach().reshape(-1, args[0].shape[-1])

        return hook

    def _keep_y(self, i):
        def hook(mod, args):
            c = args[0].detach()
            self.y[i] = labels_of(c, self.cfg).reshape(-1, c.shape[-1])
            self.m[i] = contribution_codes(c.float().abs() * self.down_norms[i]).reshape(-1, c.shape[-1])

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _check_folder(out_dir: Path, cfg: CaptureConfig, n_tokens: int) -> None:
    path = out_dir / CAPTURE_FILE
    if path.exists():
        stored = json.loads(path.read_text())
        ours = {**asdict(cfg), "tokens": n_tokens}  # a capture from before contributions has its shards redone
        diff = {k: (stored.get(k), v) for k, v in ours.items() if stored.get(k) != v}
        if diff:
            raise ValueError(
                f"{out_dir} holds a capture with another configuration ({diff}); use another folder or delete this one"
            )


def _has_contributions(shard: Path) -> bool:
    from safetensors import safe_open

    if not shard.exists():
        return False
    with safe_open(str(shard), framework="pt") as f:
        return "m.0" in f.keys()


@torch.inference_mode()
def capture(
    model: nn.Module,
    token_ids,
    out_dir: str | Path,
    cfg: CaptureConfig = CaptureConfig(),
    batch_size: int = 4,
    progress: bool | None = None,
) -> dict:
    """Capture inputs and labels of every FFN of ``model`` over ``token_ids`` (1-D) into ``out_dir``; resumable.

    The stream is cut into windows of ``cfg.context_length`` (the tail that does not fill a shard is dropped).
    Returns the capture's description (also ``out_dir/capture.json``).
    """
    from tqdm.auto import tqdm

    from ..eval.perplexity import progress_enabled

    ids = torch.as_tensor(np.asarray(token_ids)).long().reshape(-1)
    S = cfg.tokens_per_shard
    n_shards = len(ids) // S
    if n_shards == 0:
        raise ValueError(f"need at least {S} tokens for one shard; got {len(ids)}")
    out_dir = Path(out_dir)
    _check_folder(out_dir, cfg, n_shards * S)
    out_dir.mkdir(parents=True, exist_ok=True)
    mlps = mlp_modules(model)
    was = model.training
    model.eval()
    hooks = _Capture(model, cfg)
    try:
        for s in tqdm(range(n_shards), desc="capture", disable=not progress_enabled(progress)):
            path = out_dir / f"shard-{s:05d}.safetensors"
            if _has_contributions(path):  # done (a shard of a capture from before contributions is redone)
                continue
            rows = ids[s * S : (s + 1) * S].view(-1, cfg.context_length)
            xs: dict[int, list] = {i: [] for i in range(len(mlps))}
            ys: dict[int, list] = {i: [] for i in range(len(mlps))}
            ms: dict[int, list] = {i: [] for i in range(len(mlps))}
            for b in range(0, len(rows), batch_size):
                model(input_ids=rows[b : b + batch_size], use_cache=False)
                for i in range(len(mlps)):
                    xs[i].append(hooks.x[i].to(torch.float16))
                    ys[i].append(hooks.y[i])
                    ms[i].append(hooks.m[i])
            tensors = {}
            for i in range(len(mlps)):
                tensors[f"x.{i}"] = torch.cat(xs[i]).contiguous()
                tensors[f"y.{i}"] = torch.from_numpy(np.packbits(torch.cat(ys[i]).numpy(), axis=1))
                tensors[f"m.{i}"] = torch.cat(ms[i]).contiguous()
            from safetensors.torch import save_file

            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp))
    finally:
        hooks.remove()
        model.train(was)
    info = {
        **asdict(cfg),
        "tokens": n_shards * S,
        "shards": n_shards,
        "layers": len(mlps),
        "hidden": int(model.config.hidden_size),
        "intermediate": int(mlps[0].down_proj.in_features),
        "contributions": True,  # m.<layer>: contribution codes (older captures have none)
    }
    write_json(out_dir / CAPTURE_FILE, info)
    return info


def load_layer(out_dir: str | Path, layer: int, contributions: bool = False):
    """One layer's captured (inputs float32 (T, H), labels bool (T, N)) over all shards; with ``contributions``,
    also each neuron's contribution relative to the token's largest, float32 (T, N)."""
    from safetensors import safe_open

    out_dir = Path(out_dir)
    info_path = out_dir / CAPTURE_FILE
    if not info_path.exists():
        raise FileNotFoundError(f"no finished capture in {out_dir}: run predictors.data.capture first")
    info = json.loads(info_path.read_text())
    if contributions and not info.get("contributions"):
        raise ValueError(
            f"{out_dir} was captured without contributions: run predictors.data.capture on it again (it redoes the "
            "shards that lack them)"
        )
    xs, ys, ms = [], [], []
    for s in range(info["shards"]):
        with safe_open(str(out_dir / f"shard-{s:05d}.safetensors"), framework="pt") as f:
            xs.append(f.get_tensor(f"x.{layer}").float())
            ys.append(np.unpackbits(f.get_tensor(f"y.{layer}").numpy(), axis=1, count=info["intermediate"]))
            if contributions:
                ms.append(f.get_tensor(f"m.{layer}"))
    x, y = torch.cat(xs), torch.from_numpy(np.concatenate(ys).astype(bool))
    return (x, y, relative_contributions(torch.cat(ms))) if contributions else (x, y)

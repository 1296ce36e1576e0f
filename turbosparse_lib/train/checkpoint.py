"""A run folder on disk: its config guard, resumable checkpoints (safetensors), metrics and completion marker.

- ``train_config.json``: the run's ``TrainConfig``; a rerun into the same folder with another
  config is refused, naming the fields that differ.
- ``checkpoint/``: model and optimiser tensors (safetensors, never pickles), RNG, step and tokens
  seen, written to a temporary folder and renamed into place, so a kill never leaves half of one.
- ``metrics.jsonl``: one line per logged step or evaluation.
- ``train_summary.json``: written last, after the final weights; its presence marks the run complete.
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, fields
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_path, write_json
from .config import TrainConfig

CHECKPOINT = "checkpoint"  # sub-folder of a run holding the latest resumable state
CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "train_summary.json"  # written last: its presence means the run is complete


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimiser state dict into tensors (for safetensors) and the JSON-able rest."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: Path, model: nn.Module, opt: torch.optim.Optimizer, step: int, tokens_seen: int,
                    precision: str, train_seconds: float = 0.0) -> None:
    """Everything a resume needs, written atomically to ``run_dir/checkpoint``."""
    from safetensors.torch import save_file, save_model

    with atomic_path(run_dir / CHECKPOINT, is_dir=True) as tmp:
        save_model(model, str(tmp / "model.safetensors"))  # handles tied weights
        opt_tensors, opt_meta = _optimizer_tensors(opt)
        opt_tensors["rng.torch"] = torch.get_rng_state()
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        write_json(tmp / "state.json", {"step": step, "tokens_seen": tokens_seen, "precision": precision,
                                        "train_seconds": train_seconds, "optimizer": opt_meta})


def load_checkpoint(run_dir: Path, model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Restore model, optimiser and RNG from ``run_dir/checkpoint``; returns its state.json."""
    from safetensors.torch import load_file, load_model

    ck = run_dir / CHECKPOINT
    try:
        state = json.loads((ck / "state.json").read_text())
        load_model(model, str(ck / "model.safetensors"))
        tensors = load_file(str(ck / "optimizer.safetensors"))
    except Exception as e:  # truncated or foreign files
        raise RuntimeError(f"the checkpoint in {ck} cannot be read ({e}); delete that folder to restart the run "
                           "from scratch") from e
    torch.set_rng_state(tensors.pop("rng.torch"))
    opt.load_state_dict(_optimizer_state(tensors, state["optimizer"]))
    return state


def check_config(run_dir: Path, cfg: TrainConfig) -> None:
    """Refuse to mix a run folder with a different config."""
    path = run_dir / CONFIG_FILE
    if not path.exists():
        return
    stored = json.loads(path.read_text())
    ours = asdict(cfg)
    # A field added to TrainConfig after the run was written is absent from its file: the run used the
    # field's default then, so compare against that default rather than refuse the folder.
    defaults = {f.name: f.default for f in fields(cfg) if f.default is not MISSING}
    stored = {k: stored.get(k, defaults.get(k)) for k in ours}
    diff = {k: (stored[k], ours[k]) for k in ours if stored[k] != ours[k]}
    if diff:
        detail = ", ".join(f"{k}: stored {a!r} vs requested {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"{run_dir} holds a run with another config ({detail}); use another output folder "
                         "or delete this one to start over")


def rewrite_metrics(path: Path, upto_step: int) -> None:
    """Keep the metric lines up to the checkpoint we resume from (later ones will be recomputed)."""
    if not path.exists():
        return
    kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= upto_step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(ln + "\n" for ln in kept))


def read_metrics(run_dir: str | os.PathLike):
    """The run's metrics as a pandas DataFrame (one row per logged step or evaluation)."""
    import pandas as pd

    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no metrics at {path}: has this run started?")
    return pd.DataFrame([json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()])


def is_complete(run_dir: str | os.PathLike) -> bool:
    return (Path(run_dir) / SUMMARY_FILE).exists() and (Path(run_dir) / "config.json").exists()



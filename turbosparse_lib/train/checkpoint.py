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
LOCK_FILE = ".lock"  # the PID of the process training in the folder


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


def save_checkpoint(
    run_dir: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    step: int,
    tokens_seen: int,
    precision: str,
    train_seconds: float = 0.0,
) -> None:
    """Everything a resume needs, written atomically to ``run_dir/checkpoint``."""
    from safetensors.torch import save_file, save_model

    with atomic_path(run_dir / CHECKPOINT, is_dir=True) as tmp:
        save_model(model, str(tmp / "model.safetensors"))  # handles tied weights
        opt_tensors, opt_meta = _optimizer_tensors(opt)
        opt_tensors["rng.torch"] = torch.get_rng_state()
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        write_json(
            tmp / "state.json",
            {
                "step": step,
                "tokens_seen": tokens_seen,
                "precision": precision,
                "train_seconds": train_seconds,
                "optimizer": opt_meta,
            },
        )


def load_checkpoint(run_dir: Path, model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Restore model, optimiser and RNG from ``run_dir/checkpoint``; returns its state.json."""
    from safetensors.torch import load_file, load_model

    ck = run_dir / CHECKPOINT
    try:
        state = json.loads((ck / "state.json").read_text())
        load_model(model, str(ck / "model.safetensors"))
        tensors = load_file(str(ck / "optimizer.safetensors"))
    except Exception as e:  # truncated or foreign files
        raise RuntimeError(
            f"the checkpoint in {ck} cannot be read ({e}); delete that folder to restart the run from scratch"
        ) from e
    check_finite(model, f"the checkpoint in {ck} (delete that folder to restart the run from scratch)")
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
        raise ValueError(
            f"{run_dir} holds a run with another config ({detail}); use another output folder "
            "or delete this one to start over"
        )


def _metric_rows(path: Path) -> list[dict]:
    """The JSON lines of a metrics file. A last line cut short by a kill mid-write is dropped (the step it logged is
    recomputed by the resumed run); a bad line anywhere else is corruption, refused with the file and line named."""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    rows = []
    for i, ln in enumerate(lines):
        try:
            rows.append(json.loads(ln))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(
                f"{path}, line {i + 1}, is not JSON ({e}): the metrics file is corrupt; delete the run "
                "folder to start the run over"
            ) from None
    return rows


def rewrite_metrics(path: Path, upto_step: int) -> None:
    """Keep the metric lines up to the checkpoint we resume from (later ones will be recomputed)."""
    if not path.exists():
        return
    kept = [json.dumps(r) for r in _metric_rows(path) if r["step"] <= upto_step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(ln + "\n" for ln in kept))


def read_metrics(run_dir: str | os.PathLike):
    """The run's metrics as a pandas DataFrame (one row per logged step or evaluation)."""
    import pandas as pd

    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no metrics at {path}: has this run started?")
    return pd.DataFrame(_metric_rows(path))


def remove_stale_temporaries(run_dir: Path) -> list[str]:
    """Delete what a kill during an atomic write leaves in a run folder (``.checkpoint.tmp-*``, ``.checkpoint.old-*``,
    ``.final``, temporary metrics or JSON files): never read, and at SmolLM2's size over a GB each. Only the process
    holding the run's lock calls this. Returns the names removed."""
    import shutil

    removed = []
    for p in Path(run_dir).glob(".*"):
        if p.name == LOCK_FILE or not (".tmp-" in p.name or ".old-" in p.name or p.name == ".final"):
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        removed.append(p.name)
    return removed


class RunLock:
    """One process at a time in a run folder: ``<run>/.lock`` holds the owner's PID (created exclusively). A lock
    whose process is gone (killed) is taken over; a live one is refused with its PID."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or "0")
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _alive(pid):
                    raise RuntimeError(
                        f"{self.path.parent} is in use by another process (PID {pid}); wait for it "
                        f"to finish, or stop it, before starting this run"
                    ) from None
                self.path.unlink(missing_ok=True)  # its owner is gone: take over
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self
        raise RuntimeError(f"could not take the lock {self.path}")

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_finite(model: nn.Module, where: str) -> None:
    """Refuse weights that are not finite (a corrupted checkpoint, or training that diverged)."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise FloatingPointError(
            f"{where}: non-finite weights in {len(bad)} tensors ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})"
        )


def is_complete(run_dir: str | os.PathLike) -> bool:
    return (Path(run_dir) / SUMMARY_FILE).exists() and (Path(run_dir) / "config.json").exists()

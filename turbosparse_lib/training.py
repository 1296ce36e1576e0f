"""Training from scratch and continued pretraining, resumable, on one process or under torchrun.

Why a loop of our own and not ``transformers.Trainer``: the paper's recipe is one optimiser and
one schedule (AdamW, betas (0.9, 0.95), weight decay 0.01, cosine with warm-up, clipping), and
what this project needs around it is exact: checkpoints in safetensors (``Trainer`` pickles the
optimiser with ``torch.save``), a data position that is just the step number so that a run
killed at any point resumes to the *same* final loss, and one JSONL line per logged step. That
is about 200 lines here, readable in one sitting, in the spirit of nanoGPT; ``Trainer`` would
hide the same loop behind its callbacks.

A run, in order:

1. ``TrainConfig`` names everything that decides the result (model preset and variant, seed,
   tokens, batch, schedule, precision, data). It is written to ``<run>/train_config.json``; a
   rerun into the same folder with a different config is refused, naming the fields that differ.
2. Data: ``total_tokens`` drawn by the mixture sampler (paper's Table 4 ratios mapped onto our
   categories) with ``seed`` as the data seed, cut into disjoint sequences of ``context_length``
   tokens and shuffled once. Step ``s`` reads sequences ``[s*B, (s+1)*B)``: the data position
   *is* the step, so a resumed run reads exactly what the uninterrupted one would have read.
   Both variants at one seed therefore see identical tokens in identical order, and (because
   ``build_model`` reuses the same Linear modules) start from identical weights.
3. Each optimiser step is ``batch_size`` sequences, split over processes and then into micro
   batches (gradient accumulation). Under ``torchrun`` the model is wrapped in DDP (gloo on CPU,
   nccl on GPU); each rank reads its own slice of the step's sequences, so the global batch and
   the loss are the same as on one process.
4. Every ``checkpoint_every`` steps: model and optimiser tensors (safetensors), scheduler, RNG,
   step and tokens seen (JSON), written to a temporary folder and renamed into place. The final
   weights go out with ``save_pretrained`` (loadable with ``modeling.load_model``).

Precision: ``fp32``, ``bf16`` (``torch.autocast``; master weights and optimiser stay fp32), or
``auto``, which times a few steps of each on this machine (``measure_precision``) and keeps the
faster; the choice is stored with the run so a resume uses the same one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import paths
from .atomic import atomic_path, write_json
from .modeling import MODEL_PRESETS, build_model, load_model
from .perplexity import _progress_enabled

PRECISIONS = ("fp32", "bf16", "auto")
CHECKPOINT = "checkpoint"  # sub-folder of a run holding the latest resumable state
CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "train_summary.json"  # written last: its presence means the run is complete


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run's result."""

    model_preset: str  # a key of modeling.MODEL_PRESETS (the architecture)
    variant: str  # gated-MLP variant (variants.VARIANTS)
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
    eval_every: int = 0  # steps between validation losses (0: only at the end)
    eval_sequences: int = 16  # validation sequences per evaluation (fixed set)
    checkpoint_every: int = 100
    log_every: int = 10

    def __post_init__(self):
        if self.model_preset not in MODEL_PRESETS:
            raise ValueError(f"unknown model preset {self.model_preset!r}; choose one of {', '.join(MODEL_PRESETS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})")
        if self.steps < 1:
            raise ValueError(f"total_tokens ({self.total_tokens}) is less than one batch ({self.tokens_per_step} tokens)")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.context_length

    @property
    def steps(self) -> int:
        return self.total_tokens // self.tokens_per_step


# Keyed by the preset names of presets.py. "paper" is table 12 (batch 128 x 2048 tokens, lr 1e-4,
# 2000 warm-up steps, 5B tokens). The small presets use a 10x higher peak learning rate: models of a
# few million parameters trained for a few hundred steps need it (the usual scaling of lr with
# 1/width); both variants get the same, so the comparison stays fair.
TRAIN_PRESETS: dict[str, dict] = {
    "smoke": dict(model_preset="smoke", total_tokens=32 * 4 * 128, batch_size=4, micro_batch_size=2,
                  context_length=128, lr=3e-3, warmup_steps=4, precision="fp32", eval_every=16,
                  eval_sequences=4, checkpoint_every=8, log_every=2),
    "cpu": dict(model_preset="cpu", total_tokens=1_500_000, batch_size=8, micro_batch_size=8,
                context_length=512, lr=1e-3, warmup_steps=30, precision="auto", eval_every=100,
                eval_sequences=16, checkpoint_every=100, log_every=10),
    "paper": dict(model_preset="paper", total_tokens=5_000_000_000, batch_size=128, micro_batch_size=8,
                  context_length=2048, lr=1e-4, warmup_steps=2000, precision="bf16", eval_every=1000,
                  eval_sequences=64, checkpoint_every=500, log_every=10),
}


def train_config(preset: str, variant: str, seed: int = 0, **overrides) -> TrainConfig:
    """The ``TrainConfig`` of a named preset for ``variant`` at ``seed``, with optional overrides."""
    if preset not in TRAIN_PRESETS:
        raise ValueError(f"unknown training preset {preset!r}; choose one of {', '.join(TRAIN_PRESETS)}")
    unknown = set(overrides) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise TypeError(f"unknown TrainConfig fields {sorted(unknown)}")
    return TrainConfig(**{**TRAIN_PRESETS[preset], "variant": variant, "seed": seed, **overrides})


# ----------------------------------------------------------------------------------------------
# schedule, data


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine down to ``lr * min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - 1 - cfg.warmup_steps)  # the last step sits on the floor
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_sequences(tokens: np.ndarray, context_length: int, n_sequences: int, seed: int) -> torch.Tensor:
    """Disjoint ``context_length`` windows of ``tokens`` in a seeded random order, ``n_sequences`` of them."""
    n_avail = len(tokens) // context_length
    if n_avail < n_sequences:
        raise ValueError(f"{len(tokens)} tokens make {n_avail} sequences of {context_length}; {n_sequences} needed")
    seqs = torch.from_numpy(np.asarray(tokens[: n_avail * context_length], dtype=np.int64)).view(n_avail, context_length)
    order = np.random.default_rng(seed).permutation(n_avail)[:n_sequences]
    return seqs[torch.from_numpy(order)]


def training_sequences(cfg: TrainConfig) -> torch.Tensor:
    """The run's training data, (steps * batch_size, context_length), from the mixture sampler."""
    from .data.build import training_stream

    needed = cfg.steps * cfg.batch_size
    # a little headroom: the sampler draws whole documents, so it lands near, not on, the target
    sample = training_stream(int(needed * cfg.context_length * 1.02) + cfg.context_length, cfg.mixture, seed=cfg.seed)
    return make_sequences(sample.tokens, cfg.context_length, needed, cfg.seed)


def validation_sequences(cfg: TrainConfig) -> torch.Tensor:
    """A fixed validation set (the same for every run of a given context length)."""
    from .data.build import load_token_stream

    return make_sequences(load_token_stream("validation"), cfg.context_length, cfg.eval_sequences, seed=1234)


# ----------------------------------------------------------------------------------------------
# precision


def _autocast(precision: str):
    return torch.autocast("cpu" if not torch.cuda.is_available() else "cuda", dtype=torch.bfloat16) \
        if precision == "bf16" else nullcontext()


def measure_precision(cfg: TrainConfig, steps: int = 3) -> dict:
    """Seconds per training step in fp32 and bf16 autocast on this machine (median of ``steps``, after one
    warm-up step), on the run's model at the run's micro batch. Weights are thrown away."""
    times = {}
    x = torch.randint(0, MODEL_PRESETS[cfg.model_preset].vocab_size, (cfg.micro_batch_size, cfg.context_length),
                      generator=torch.Generator().manual_seed(0))
    for precision in ("fp32", "bf16"):
        model = build_model(cfg.variant, preset=cfg.model_preset, seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ts = []
        for i in range(steps + 1):
            t0 = time.perf_counter()
            with _autocast(precision):
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            ts.append(time.perf_counter() - t0)
        times[precision] = float(np.median(ts[1:]))
    faster = min(times, key=times.get)
    return {"fp32_s_per_step": times["fp32"], "bf16_s_per_step": times["bf16"],
            "bf16_speedup": times["fp32"] / times["bf16"], "chosen": faster,
            "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------------------------
# distributed


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    initialised_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed() -> _Dist:
    """DDP under torchrun (WORLD_SIZE set), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return _Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return _Dist(dist.get_rank(), dist.get_world_size(), True)
    return _Dist(dist.get_rank(), dist.get_world_size(), False)


def _all_mean(x: float, d: _Dist) -> float:
    if d.world == 1:
        return x
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / d.world


def _barrier(d: _Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


# ----------------------------------------------------------------------------------------------
# checkpoints


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
                    precision: str) -> None:
    """Everything a resume needs, written atomically to ``run_dir/checkpoint``."""
    from safetensors.torch import save_file, save_model

    with atomic_path(run_dir / CHECKPOINT, is_dir=True) as tmp:
        save_model(model, str(tmp / "model.safetensors"))  # handles tied weights
        opt_tensors, opt_meta = _optimizer_tensors(opt)
        opt_tensors["rng.torch"] = torch.get_rng_state()
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        write_json(tmp / "state.json", {"step": step, "tokens_seen": tokens_seen, "precision": precision,
                                        "optimizer": opt_meta})


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


def _check_config(run_dir: Path, cfg: TrainConfig) -> None:
    """Refuse to mix a run folder with a different config."""
    path = run_dir / CONFIG_FILE
    if not path.exists():
        return
    stored = json.loads(path.read_text())
    ours = asdict(cfg)
    diff = {k: (stored.get(k), ours[k]) for k in ours if stored.get(k) != ours[k]}
    if diff:
        detail = ", ".join(f"{k}: stored {a!r} vs requested {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"{run_dir} holds a run with another config ({detail}); use another output folder "
                         "or delete this one to start over")


def _rewrite_metrics(path: Path, upto_step: int) -> None:
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


# ----------------------------------------------------------------------------------------------
# the loop


@torch.no_grad()
def evaluate_loss(model: nn.Module, seqs: torch.Tensor, micro_batch_size: int, precision: str = "fp32") -> float:
    """Mean next-token loss over ``seqs`` (every sequence has the same length, so a mean of means is exact)."""
    was_training = model.training
    model.eval()
    losses = []
    for i in range(0, len(seqs), micro_batch_size):
        x = seqs[i: i + micro_batch_size]
        with _autocast(precision):
            losses.append(float(model(input_ids=x, labels=x).loss) * len(x))
    model.train(was_training)
    return sum(losses) / len(seqs)


def train(cfg: TrainConfig, run_dir: str | os.PathLike, model: nn.Module | None = None,
          sequences: torch.Tensor | None = None, progress: bool | None = None, threads: int | None = None) -> dict:
    """Train (or resume training) ``cfg`` into ``run_dir``; returns the summary.

    ``model``: start from this model instead of a fresh ``build_model`` (continued pretraining, e.g. a
    pretrained model after ``apply_variant(model, "drelu")``). ``sequences``: train on these
    ``(steps * batch_size, context_length)`` token ids instead of the mixture sampler's. A finished run
    is not trained again: its summary is returned.
    """
    run_dir = Path(run_dir)
    d = _init_distributed()
    if threads:
        torch.set_num_threads(threads)
    try:
        _check_config(run_dir, cfg)
        if is_complete(run_dir):
            return json.loads((run_dir / SUMMARY_FILE).read_text())
        if cfg.batch_size % (cfg.micro_batch_size * d.world):
            raise ValueError(f"batch_size ({cfg.batch_size}) must divide by micro_batch_size x processes "
                             f"({cfg.micro_batch_size} x {d.world})")
        accum = cfg.batch_size // (cfg.micro_batch_size * d.world)
        if d.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json(run_dir / CONFIG_FILE, asdict(cfg))
        _barrier(d)

        data = sequences if sequences is not None else training_sequences(cfg)
        if data.shape != (cfg.steps * cfg.batch_size, cfg.context_length):
            raise ValueError(f"sequences have shape {tuple(data.shape)}; this config needs "
                             f"{(cfg.steps * cfg.batch_size, cfg.context_length)}")
        val = validation_sequences(cfg)

        torch.manual_seed(cfg.seed)
        if model is None:
            model = build_model(cfg.variant, preset=cfg.model_preset, seed=cfg.seed)
        model.train()
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]  # no decay on norms (as nanoGPT)
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=True)

        start_step, tokens_seen, precision = 0, 0, cfg.precision
        precision_measurement = None
        if (run_dir / CHECKPOINT / "state.json").exists():
            state = load_checkpoint(run_dir, model, opt)
            start_step, tokens_seen, precision = state["step"], state["tokens_seen"], state["precision"]
            if d.main:
                _rewrite_metrics(run_dir / METRICS_FILE, start_step)
        elif precision == "auto":
            precision_measurement = measure_precision(cfg)
            # every rank must use the same precision: a majority of the ranks' measurements decides
            precision = "bf16" if _all_mean(float(precision_measurement["chosen"] == "bf16"), d) >= 0.5 else "fp32"
        _barrier(d)

        ddp = model
        if d.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ddp = DistributedDataParallel(model)

        kill_at = int(os.environ.get("TURBOSPARSE_KILL_AT_STEP", "-1"))  # for the resume test: a real SIGKILL
        metrics_f = open(run_dir / METRICS_FILE, "a") if d.main else None
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start_step, desc=f"train {cfg.variant} seed {cfg.seed}",
                   disable=not (d.main and _progress_enabled(progress)))
        t_last, tok_last = time.perf_counter(), tokens_seen
        t_start = time.perf_counter()
        try:
            for step in range(start_step, cfg.steps):
                if step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                lr = lr_at(step, cfg)
                for g in opt.param_groups:
                    g["lr"] = lr
                batch = data[step * cfg.batch_size: (step + 1) * cfg.batch_size]
                mine = batch[d.rank * accum * cfg.micro_batch_size: (d.rank + 1) * accum * cfg.micro_batch_size]
                loss_sum = 0.0
                for m in range(accum):
                    x = mine[m * cfg.micro_batch_size: (m + 1) * cfg.micro_batch_size]
                    sync = ddp.no_sync() if (d.world > 1 and m < accum - 1) else nullcontext()
                    with sync, _autocast(precision):
                        loss = ddp(input_ids=x, labels=x).loss
                    (loss / accum).backward()
                    loss_sum += float(loss.detach())
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
                opt.step()
                opt.zero_grad(set_to_none=True)
                tokens_seen += cfg.tokens_per_step
                train_loss = _all_mean(loss_sum / accum, d)
                bar.update(1)
                done = step + 1
                row = None
                if done % cfg.log_every == 0 or done == cfg.steps:
                    now = time.perf_counter()
                    row = {"step": done, "tokens_seen": tokens_seen, "loss": train_loss, "lr": lr,
                           "grad_norm": grad_norm, "tokens_per_s": (tokens_seen - tok_last) / (now - t_last),
                           "precision": precision}
                    t_last, tok_last = now, tokens_seen
                    bar.set_postfix(loss=f"{train_loss:.3f}")
                if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
                    row = row or {"step": done, "tokens_seen": tokens_seen, "lr": lr, "precision": precision}
                    row["val_loss"] = evaluate_loss(model, val, cfg.micro_batch_size, precision)
                if row is not None and metrics_f is not None:
                    metrics_f.write(json.dumps(row) + "\n")
                    metrics_f.flush()
                if done % cfg.checkpoint_every == 0 and done < cfg.steps:
                    if d.main:
                        save_checkpoint(run_dir, model, opt, done, tokens_seen, precision)
                    _barrier(d)
        finally:
            bar.close()
            if metrics_f is not None:
                metrics_f.close()

        summary = {"steps": cfg.steps, "tokens_seen": tokens_seen, "final_train_loss": train_loss,
                   "final_val_loss": row["val_loss"], "precision": precision, "processes": d.world,
                   "threads": torch.get_num_threads(), "seconds_this_session": time.perf_counter() - t_start,
                   "resumed_from_step": start_step, "parameters": sum(p.numel() for p in model.parameters())}
        if precision_measurement is not None:
            summary["precision_measurement"] = precision_measurement
        if d.main:
            # final weights in transformers' format, then the summary that marks the run complete
            with atomic_path(run_dir / ".final", is_dir=True) as tmp:
                model.save_pretrained(tmp)
            for f in (run_dir / ".final").iterdir():
                os.replace(f, run_dir / f.name)
            (run_dir / ".final").rmdir()
            write_json(run_dir / SUMMARY_FILE, summary)
            shutil.rmtree(run_dir / CHECKPOINT, ignore_errors=True)  # the final weights supersede it
        _barrier(d)
        return summary
    finally:
        if d.initialised_here:
            import torch.distributed as dist

            dist.destroy_process_group()


def train_scratch(preset: str, variant: str, seed: int = 0, progress: bool | None = None, **overrides) -> tuple[Path, dict]:
    """Train (or load the finished run of) the from-scratch model of ``preset``/``variant``/``seed`` into
    ``paths.scratch_model_dir``; returns the folder and the run's summary."""
    cfg = train_config(preset, variant, seed, **overrides)
    run_dir = paths.scratch_model_dir(preset, variant, seed)
    return run_dir, train(cfg, run_dir, progress=progress)


def load_trained(run_dir: str | os.PathLike):
    """The finished model of a run folder (variant re-applied from its config)."""
    if not is_complete(run_dir):
        raise FileNotFoundError(f"{run_dir} holds no finished run; train it first (turbosparse-train)")
    return load_model(run_dir)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="turbosparse-train",
        description="Train a gated-MLP Llama-style model from scratch (resumable; runs under torchrun for DDP).",
        epilog="Example, 8 GPUs at the paper's sizes: torchrun --nproc_per_node 8 -m turbosparse_lib.training "
               "--preset paper --variant drelu --seed 0",
    )
    p.add_argument("--preset", default="cpu", help=f"one of {', '.join(TRAIN_PRESETS)} (default cpu)")
    p.add_argument("--variant", default="drelu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="run folder (default: data/models/<preset>/scratch-<variant>-seed<seed>)")
    p.add_argument("--total-tokens", type=int, default=None)
    p.add_argument("--precision", choices=PRECISIONS, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads per process")
    a = p.parse_args(argv)
    overrides = {k: v for k, v in (("total_tokens", a.total_tokens), ("precision", a.precision)) if v is not None}
    try:
        cfg = train_config(a.preset, a.variant, a.seed, **overrides)
    except (ValueError, TypeError) as e:
        print(f"turbosparse-train: {e}", file=sys.stderr)
        return 2
    run_dir = Path(a.out) if a.out else paths.scratch_model_dir(a.preset, a.variant, a.seed)
    summary = train(cfg, run_dir, threads=a.threads)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"run_dir": str(run_dir), **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

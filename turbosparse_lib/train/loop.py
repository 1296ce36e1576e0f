"""Training from scratch and continued pretraining, resumable, on one process or under torchrun.

Why a loop of our own and not ``transformers.Trainer``: the paper's recipe is one optimiser and
one schedule (AdamW, betas (0.9, 0.95), weight decay 0.01, cosine with warm-up, clipping), and
what this project needs around it is exact: checkpoints in safetensors (``Trainer`` pickles the
optimiser with ``torch.save``), a data position that is just the step number so that a run
killed at any point resumes to the *same* final loss, and one JSONL line per logged step. That
is about 200 lines here, readable in one sitting, in the spirit of nanoGPT; ``Trainer`` would
hide the same loop behind its callbacks.

A run, in order:

1. ``TrainConfig`` (``train.config``) names everything that decides the result. It is written to
   ``<run>/train_config.json``; a rerun into the same folder with another config is refused.
2. Data (``train.data``): ``total_tokens`` drawn by the mixture sampler with ``seed`` as the data
   seed, cut into disjoint sequences and shuffled once. Step ``s`` reads sequences
   ``[s*B, (s+1)*B)``: the data position *is* the step, so a resumed run reads exactly what the
   uninterrupted one would have read.
3. Each optimiser step is ``batch_size`` sequences, split over processes and then into micro
   batches (gradient accumulation). Under ``torchrun`` the model is wrapped in DDP.
4. The loss (``train.objectives``) is the config's ``objective``: next-token cross-entropy (``lm``), the KL divergence
   from a teacher's next-token distribution to the model's (``kd``, distillation), or their mean;
   plus, with ``hidden_coef > 0``, the teacher's residual stream after every layer (normalised mean
   squared error, ``hidden_state_loss``); plus, with ``l1_coef > 0``, an L1 penalty on every MLP's
   combined activation (the mean |combined| over layers), which pushes activations to exact zero
   (ProSparse-style sparsity regularisation), raised linearly over ``l1_warmup_fraction`` of the run.
   ``trainable`` freezes what a run leaves alone (``select_trainable``: the embeddings, or all but the MLPs).
5. Every ``checkpoint_every`` steps a resumable checkpoint (``train.checkpoint``); at the end the
   final weights with ``save_pretrained`` (loadable with ``models.swap.load_model``), then the
   summary that marks the run complete.

A mixture of experts (``cfg.moe``, notebook 04) trains the same way; its training loss includes the router's
load-balancing term (transformers adds ``router_aux_loss_coef`` x aux), its validation loss does not.

Precision: ``fp32``, ``bf16`` (autocast; master weights and optimiser stay fp32), or ``auto``,
which times both on the model being trained (``train.precision``) and keeps the faster; the
choice is stored with the run so a resume uses the same one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .. import cli, paths
from ..atomic import atomic_path, write_json
from ..eval.perplexity import progress_enabled
from ..models.build import build_model
from ..models.swap import load_model, set_up_slope
from .checkpoint import (
    CHECKPOINT,
    CONFIG_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    RunLock,
    check_config,
    check_finite,
    is_complete,
    load_checkpoint,
    read_metrics,
    remove_stale_temporaries,
    rewrite_metrics,
    save_checkpoint,
)
from .config import PRECISIONS, TrainConfig, l1_at, lr_at, train_config, up_slope_at
from .data import training_sequences, validation_sequences
from .distributed import all_mean, barrier, init_distributed
from .objectives import CombinedL1, training_loss
from .precision import autocast, measure_precision

__all__ = [
    "train",
    "evaluate_loss",
    "select_trainable",
    "train_scratch",
    "load_trained",
    "read_metrics",
    "is_complete",
    "main",
]

# called every eval_every steps on the main process: (model, step, tokens_seen) -> extra metrics
EvalHook = Callable[[nn.Module, int, int], dict]


@torch.no_grad()
def evaluate_loss(model: nn.Module, seqs: torch.Tensor, micro_batch_size: int, precision: str = "fp32") -> float:
    """Mean next-token loss over ``seqs`` (every sequence has the same length, so a mean of means is exact).

    An MoE model's load-balancing term, part of its training loss, is left out: this is the language-model loss
    alone, comparable with a dense model's."""
    was_training = model.training
    model.eval()
    losses = []
    device = next(model.parameters()).device
    lm_only = {"output_router_logits": False} if getattr(model.config, "output_router_logits", False) else {}
    for i in range(0, len(seqs), micro_batch_size):
        x = seqs[i : i + micro_batch_size].to(device)
        with autocast(precision):
            losses.append(float(model(input_ids=x, labels=x, **lm_only).loss) * len(x))
    model.train(was_training)
    return sum(losses) / len(seqs)


def select_trainable(model: nn.Module, trainable: str) -> None:
    """Freeze what ``trainable`` leaves out (``train.config.TRAINABLE``): ``no-embeddings`` freezes the input
    embeddings and the output layer (tied in SmolLM2: 49,152 x 576, a fifth of the model, and a swapped MLP does
    not change what a token means); ``mlp`` trains only the MLPs' projections."""
    if trainable == "all":
        return
    frozen = {
        id(p)
        for m in (model.get_input_embeddings(), model.get_output_embeddings())
        if m is not None
        for p in m.parameters()
    }
    if trainable == "mlp":
        from ..models.swap import mlp_modules

        keep = {id(p) for m in mlp_modules(model) for p in m.parameters()}
        frozen = {id(p) for p in model.parameters()} - keep
    for p in model.parameters():
        if id(p) in frozen:
            p.requires_grad_(False)


def _model_and_optimizer(cfg: TrainConfig, model: nn.Module | None):
    """(model in training mode, its trainable (name, parameter) pairs, the optimiser): a fresh ``build_model`` when
    no model is given (seeded), with what ``cfg.trainable`` leaves out frozen."""
    torch.manual_seed(cfg.seed)
    if model is None:
        model = build_model(cfg.variant, preset=cfg.model_preset, seed=cfg.seed, moe=cfg.moe)
    model.train()
    select_trainable(model, cfg.trainable)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return model, trainable, _optimizer(trainable, cfg)


def _optimizer(trainable: list, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, with no weight decay on norms (as nanoGPT)."""
    decay = [p for n, p in trainable if p.ndim >= 2]
    no_decay = [p for n, p in trainable if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        foreach=True,
    )


def _resume_or_start(run_dir: Path, cfg: TrainConfig, model: nn.Module, opt, d) -> tuple:
    """(start step, tokens seen, precision, train seconds before, precision measurement or None): restored from the
    run's checkpoint, or a fresh start (metrics of an attempt killed before its first checkpoint dropped, precision
    measured if ``auto``)."""
    if (run_dir / CHECKPOINT / "state.json").exists():
        state = load_checkpoint(run_dir, model, opt)
        if d.main:
            rewrite_metrics(run_dir / METRICS_FILE, state["step"])
        return state["step"], state["tokens_seen"], state["precision"], state.get("train_seconds", 0.0), None
    if d.main:
        rewrite_metrics(run_dir / METRICS_FILE, -1)
    precision, measurement = cfg.precision, None
    if precision == "auto":
        measurement = measure_precision(model, cfg.micro_batch_size, cfg.context_length)
        # every rank must use the same precision: a majority of the ranks' measurements decides
        precision = "bf16" if all_mean(float(measurement["chosen"] == "bf16"), d) >= 0.5 else "fp32"
    return 0, 0, precision, 0.0, measurement


def _save_final(run_dir: Path, model: nn.Module, summary: dict) -> None:
    """Final weights in transformers' format, then the summary that marks the run complete; the checkpoint goes."""
    check_finite(model, f"training {run_dir}")  # nothing non-finite is ever marked complete
    with atomic_path(run_dir / ".final", is_dir=True) as tmp:
        model.save_pretrained(tmp)
    for f in (run_dir / ".final").iterdir():
        os.replace(f, run_dir / f.name)
    (run_dir / ".final").rmdir()
    write_json(run_dir / SUMMARY_FILE, summary)
    shutil.rmtree(run_dir / CHECKPOINT, ignore_errors=True)  # the final weights supersede it


def _accumulate_step(
    ddp,
    teacher,
    mine: torch.Tensor,
    cfg: TrainConfig,
    precision: str,
    l1,
    step: int,
    trainable: list,
    d,
    device,
    run_dir: Path,
) -> tuple[float, float]:
    """Forward and backward over this rank's micro batches, then the clipped gradient norm; returns (sum of the
    micro-batch losses, gradient norm). A non-finite loss or gradient raises before the optimiser changes anything."""
    accum = len(mine) // cfg.micro_batch_size
    loss_sum = 0.0
    for m in range(accum):
        x = mine[m * cfg.micro_batch_size : (m + 1) * cfg.micro_batch_size].to(device)
        sync = ddp.no_sync() if (d.world > 1 and m < accum - 1) else nullcontext()
        with sync:
            loss = training_loss(ddp, teacher, x, cfg, precision, l1, l1_at(step, cfg))
            (loss / accum).backward()
        loss_sum += float(loss.detach())
    grad_norm = float(torch.nn.utils.clip_grad_norm_([p for _, p in trainable], cfg.grad_clip))
    if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
        raise FloatingPointError(
            f"training {run_dir}: the loss ({loss_sum / accum}) or the gradient norm "
            f"({grad_norm}) is not finite at step {step + 1}; the run is not marked "
            "complete. Lower the learning rate, or check the model and data"
        )
    return loss_sum, grad_norm


def _check_arguments(cfg: TrainConfig, model, teacher) -> None:
    if cfg.objective != "lm" and teacher is None:
        raise ValueError(f"objective {cfg.objective!r} distils from a teacher: pass teacher=")
    if model is None and cfg.model_preset is None:
        raise ValueError("cfg.model_preset is None (continued pretraining): pass the model to train")


def _inputs(cfg: TrainConfig, sequences, d) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(gradient-accumulation steps, training sequences, validation sequences), checked against the config."""
    if cfg.batch_size % (cfg.micro_batch_size * d.world):
        raise ValueError(
            f"batch_size ({cfg.batch_size}) must divide by micro_batch_size x processes "
            f"({cfg.micro_batch_size} x {d.world})"
        )
    data = sequences if sequences is not None else training_sequences(cfg)
    if data.shape != (cfg.steps * cfg.batch_size, cfg.context_length):
        raise ValueError(
            f"sequences have shape {tuple(data.shape)}; this config needs "
            f"{(cfg.steps * cfg.batch_size, cfg.context_length)}"
        )
    return cfg.batch_size // (cfg.micro_batch_size * d.world), data, validation_sequences(cfg)


def _claim_run_dir(run_dir: Path, cfg: TrainConfig, stack: ExitStack) -> None:
    """Create the folder, hold its lock for the rest of the run (``stack``), clear what a killed write left, and
    record the config (checked again under the lock: another process may have just written its own)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    stack.enter_context(RunLock(run_dir))
    remove_stale_temporaries(run_dir)
    check_config(run_dir, cfg)
    write_json(run_dir / CONFIG_FILE, asdict(cfg))


def _evaluate_row(
    row: dict | None,
    model,
    val,
    cfg: TrainConfig,
    precision: str,
    eval_hook,
    done: int,
    tokens_seen: int,
    lr: float,
    train_seconds: float,
) -> dict:
    """The metrics row of an evaluation step: the validation loss, and the hook's metrics (main process only)."""
    row = row or {
        "step": done,
        "tokens_seen": tokens_seen,
        "lr": lr,
        "precision": precision,
        "train_seconds": train_seconds,
    }
    row["val_loss"] = evaluate_loss(model, val, cfg.micro_batch_size, precision)
    if eval_hook is not None:
        row.update(eval_hook(model, done, tokens_seen))
    return row


def _wrap_ddp(model: nn.Module, d):
    """The model under DistributedDataParallel when there are several processes; the model itself otherwise."""
    if d.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model)


def _open_progress(run_dir: Path, cfg: TrainConfig, d, start_step: int, progress):
    """(metrics file opened for appending on the main process, else None; the progress bar)."""
    from tqdm.auto import tqdm

    metrics_f = open(run_dir / METRICS_FILE, "a") if d.main else None
    bar = tqdm(
        total=cfg.steps,
        initial=start_step,
        desc=f"train {cfg.variant} seed {cfg.seed}",
        disable=not (d.main and progress_enabled(progress)),
    )
    return metrics_f, bar


def _write_row(metrics_f, row: dict) -> None:
    metrics_f.write(json.dumps(row) + "\n")  # one write per line: a kill leaves at most a cut-short last line
    metrics_f.flush()


def _close(bar, l1, metrics_f) -> None:
    bar.close()
    if l1 is not None:
        l1.remove()
    if metrics_f is not None:
        metrics_f.close()


def _parameter_counts(model: nn.Module, trainable: list) -> dict:
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for _, p in trainable),
    }


@dataclass
class _Clock:
    """When and at how many tokens the last throughput was logged (evaluations restart it)."""

    t_last: float
    tok_last: int


def _record_step(
    stats: dict, cfg: TrainConfig, d, clock: _Clock, model, opt, val, eval_hook, metrics_f, bar, run_dir: Path
) -> dict | None:
    """After optimiser step ``stats["step"]``: the metrics row (logged every ``log_every`` steps, with the
    throughput since the last one; evaluated every ``eval_every``), written on the main process, and the checkpoint
    every ``checkpoint_every`` steps. Returns the row, or None on a step that logs nothing."""
    done, tokens_seen = stats["step"], stats["tokens_seen"]
    row = None
    if done % cfg.log_every == 0 or done == cfg.steps:
        now = time.perf_counter()
        row = {**stats, "tokens_per_s": (tokens_seen - clock.tok_last) / (now - clock.t_last)}
        clock.t_last, clock.tok_last = now, tokens_seen
        bar.set_postfix(loss=f"{stats['loss']:.3f}")
    if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
        row = _evaluate_row(
            row,
            model,
            val,
            cfg,
            stats["precision"],
            eval_hook if d.main else None,
            done,
            tokens_seen,
            stats["lr"],
            stats["train_seconds"],
        )
        clock.t_last = time.perf_counter()  # evaluation time is not training throughput
    if row is not None and metrics_f is not None:
        _write_row(metrics_f, row)
    if done % cfg.checkpoint_every == 0 and done < cfg.steps:
        if d.main:
            save_checkpoint(run_dir, model, opt, done, tokens_seen, stats["precision"], stats["train_seconds"])
        barrier(d)
    return row


def _record_before(step: int, tokens_seen: int, precision: str, train_seconds: float) -> dict:
    """The run's record before optimiser step ``step``; ``train_seconds`` counts optimiser steps only, not
    evaluations or checkpoints (a recovery curve's x axis)."""
    nan = float("nan")
    return dict(
        step=step,
        tokens_seen=tokens_seen,
        loss=nan,
        lr=nan,
        grad_norm=nan,
        precision=precision,
        train_seconds=train_seconds,
    )


def _optimizer_step(stats, cfg, opt, data, accum, ddp, teacher, l1, trainable, d, device, run_dir) -> dict:
    """Optimiser step ``stats["step"]``: its learning rate, the gradients of this rank's share of the batch, the
    update. Returns the record after it (the loss is the mean over all ranks)."""
    t0, step = time.perf_counter(), stats["step"]
    lr = lr_at(step, cfg)
    for g in opt.param_groups:
        g["lr"] = lr
    if cfg.up_anneal_fraction > 0:  # a function of the step, so a resumed run continues the same schedule
        set_up_slope(getattr(ddp, "module", ddp), up_slope_at(step, cfg))
    batch = data[step * cfg.batch_size : (step + 1) * cfg.batch_size]
    mine = batch[d.rank * accum * cfg.micro_batch_size : (d.rank + 1) * accum * cfg.micro_batch_size]
    precision = stats["precision"]
    loss_sum, grad_norm = _accumulate_step(ddp, teacher, mine, cfg, precision, l1, step, trainable, d, device, run_dir)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {
        **stats,
        "step": step + 1,
        "tokens_seen": stats["tokens_seen"] + cfg.tokens_per_step,
        "loss": all_mean(loss_sum / accum, d),
        "lr": lr,
        "grad_norm": grad_norm,
        "train_seconds": stats["train_seconds"] + time.perf_counter() - t0,
    }


def _summary(cfg, d, model, trainable, stats, row, start_step, precision_measurement, t_start) -> dict:
    """What ``train_summary.json`` records of a finished run; ``stats`` is the last step's record."""
    summary = {
        "steps": cfg.steps,
        "tokens_seen": stats["tokens_seen"],
        "final_train_loss": stats["loss"],
        "final_val_loss": row["val_loss"] if row else None,
        "precision": stats["precision"],
        "processes": d.world,
        "threads": torch.get_num_threads(),
        "seconds_this_session": time.perf_counter() - t_start,
        "train_seconds": stats["train_seconds"],
        "resumed_from_step": start_step,
        **_parameter_counts(model, trainable),
    }
    if precision_measurement:
        summary["precision_measurement"] = precision_measurement
    return summary


def train(
    cfg: TrainConfig,
    run_dir: str | os.PathLike,
    model: nn.Module | None = None,
    sequences: torch.Tensor | None = None,
    progress: bool | None = None,
    threads: int | None = None,
    teacher: nn.Module | None = None,
    eval_hook: EvalHook | None = None,
) -> dict:
    """Train (or resume training) ``cfg`` into ``run_dir``; returns the summary (a finished run's, untrained).

    ``model``: start from it, not a fresh ``build_model`` (continued pretraining); frozen parameters stay frozen.
    ``sequences``: ``(steps * batch_size, context_length)`` token ids instead of the mixture sampler's. ``teacher``:
    the model distilled from (``kd``, ``kd+lm``). ``eval_hook``: extra metrics at every evaluation (a recovery curve).
    """
    run_dir = Path(run_dir)
    _check_arguments(cfg, model, teacher)
    d = init_distributed()
    if threads:
        torch.set_num_threads(threads)
    stack = ExitStack()
    try:
        check_config(run_dir, cfg)
        if is_complete(run_dir):
            return json.loads((run_dir / SUMMARY_FILE).read_text())
        accum, data, val = _inputs(cfg, sequences, d)
        if d.main:  # only once the inputs are known to be good: bad arguments create nothing
            _claim_run_dir(run_dir, cfg, stack)
        barrier(d)

        model, trainable, opt = _model_and_optimizer(cfg, model)
        start_step, tokens_seen, precision, seconds_before, precision_measurement = _resume_or_start(
            run_dir, cfg, model, opt, d
        )
        barrier(d)

        device = next(model.parameters()).device  # the caller places the model (and the teacher) on a device
        ddp = _wrap_ddp(model, d)
        metrics_f, bar = _open_progress(run_dir, cfg, d, start_step, progress)
        if d.main and start_step == 0 and eval_hook is not None:  # the curve's first point: before any step
            _write_row(metrics_f, _evaluate_row(None, model, val, cfg, precision, eval_hook, 0, 0, None, 0.0))
        l1 = CombinedL1(model) if cfg.l1_coef > 0 else None
        clock = _Clock(time.perf_counter(), tokens_seen)
        t_start = time.perf_counter()
        stats, row = _record_before(start_step, tokens_seen, precision, seconds_before), None
        try:
            for _ in range(start_step, cfg.steps):
                stats = _optimizer_step(stats, cfg, opt, data, accum, ddp, teacher, l1, trainable, d, device, run_dir)
                bar.update(1)
                row = _record_step(stats, cfg, d, clock, model, opt, val, eval_hook, metrics_f, bar, run_dir)
        finally:
            _close(bar, l1, metrics_f)

        summary = _summary(cfg, d, model, trainable, stats, row, start_step, precision_measurement, t_start)
        if d.main:
            _save_final(run_dir, model, summary)
        barrier(d)
        return summary
    finally:
        stack.close()  # releases the run's lock
        if d.initialised_here:
            import torch.distributed as dist

            dist.destroy_process_group()


def train_scratch(
    preset: str, variant: str, seed: int = 0, progress: bool | None = None, moe: bool = False, **overrides
) -> tuple[Path, dict]:
    """Train (or load the finished run of) the from-scratch model of ``preset``/``variant``/``seed`` into
    ``paths.scratch_model_dir`` (``moe=True``: the preset's mixture of experts, into ``paths.scratch_moe_dir``);
    returns the folder and the run's summary."""
    cfg = train_config(preset, variant, seed, moe=moe, **overrides)
    run_dir = (paths.scratch_moe_dir if moe else paths.scratch_model_dir)(preset, variant, seed)
    return run_dir, train(cfg, run_dir, progress=progress)


def load_trained(run_dir: str | os.PathLike):
    """The finished model of a run folder (variant re-applied from its config)."""
    if not is_complete(run_dir):
        raise FileNotFoundError(f"{run_dir} holds no finished run; train it first (turbosparse-train)")
    return load_model(run_dir)


def main(argv: list[str] | None = None) -> int:

    p = cli.parser(
        "turbosparse-train",
        "Train a gated-MLP Llama-style model from scratch (resumable; runs under torchrun for DDP).",
        "Example, 8 GPUs at the paper's sizes: torchrun --nproc_per_node 8 -m turbosparse_lib.train.loop "
        "--preset paper --variant drelu --seed 0",
    )
    cli.add_preset(p)
    p.add_argument("--variant", default="drelu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", default=None, help="run folder (default: data/models/<preset>/scratch-<variant>-seed<seed>)"
    )
    p.add_argument("--total-tokens", type=int, default=None)
    p.add_argument("--precision", choices=PRECISIONS, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads per process")
    p.add_argument("--moe", action="store_true", help="the preset's mixture of experts instead of the dense model")
    a = p.parse_args(argv)
    overrides = {k: v for k, v in (("total_tokens", a.total_tokens), ("precision", a.precision)) if v is not None}
    try:  # every argument is checked here, before anything is created on disk
        cfg = train_config(a.preset, a.variant, a.seed, moe=a.moe, **overrides)
        if a.threads is not None and a.threads < 1:
            raise ValueError(f"--threads must be >= 1; got {a.threads}")
        if a.seed < 0:
            raise ValueError(f"--seed must be >= 0; got {a.seed}")
        if a.out is not None and Path(a.out).exists() and not Path(a.out).is_dir():
            raise ValueError(f"--out {a.out} is a file; give a folder for the run")
    except (ValueError, TypeError) as e:
        return cli.refuse("turbosparse-train", e)
    run_dir = (
        Path(a.out)
        if a.out
        else (paths.scratch_moe_dir if a.moe else paths.scratch_model_dir)(a.preset, a.variant, a.seed)
    )
    try:
        summary = train(cfg, run_dir, threads=a.threads)
    except (ValueError, FileNotFoundError) as e:
        return cli.refuse("turbosparse-train", e)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"run_dir": str(run_dir), **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

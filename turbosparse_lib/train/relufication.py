"""ReLUfication (paper section 5): swap a pretrained model's MLP activation, then continue training until it recovers.

The paper swaps Mistral-7B's SwiGLU for dReLU and continues pretraining on 150B tokens of a diverse
mixture (table 4) with a plain next-token loss. On a laptop we have about a millionth of that, so
this module offers the paper's recipe and two cheaper ways to spend the same CPU time:

- ``warm="lstsq"``, a layer-wise warm start before any training. Each layer's new MLP is fitted, in
  closed form, to reproduce what the original MLP computed, on a few thousand captured tokens:
  1. the variant's ReLU on the up branch (dReLU) keeps only ``up > 0``. SwiGLU is symmetric under
     flipping the sign of a neuron's up row and down column, dReLU is not, so each neuron keeps the
     sign whose rectified half carries more of ``act(gate) * up``'s energy (free: no other weight moves);
  2. ``down_proj`` becomes the ridge least-squares solution mapping the new combined activations to
     the original MLP's outputs (one 1536 x 1536 solve per layer for SmolLM2).
  The layers are fitted in order inside one forward pass (``target="function"``: each layer sees the
  inputs that the already-fitted layers below it produce, and matches the original MLP applied to
  them), or so that each layer's output restores the original model's residual stream
  (``target="residual"``), which also absorbs the errors of the layers below.
- ``objective="kd"``, distillation: the KL divergence from the original model's next-token
  distribution to the swapped model's, which carries far more signal per token than the one-hot
  next-token loss; ``"kd+lm"`` averages the two; ``"lm"`` is the paper's.
- ``lstsq+kd+l1`` adds an L1 penalty on the combined activations (ProSparse-style sparsity
  regularisation, which the paper mentions as a route to more zeros at a risk to quality): with a budget
  this small, training alone does not raise the exact-zero fraction the way 150B tokens do.
- ``lstsq+hidden``: the warm start, then distillation of the logits *and* of the residual
  stream after every layer (``train.objectives.hidden_state_loss``), training the MLPs only, as many small
  optimiser steps: a dense signal at every depth where the swap changed something, and a step about 20%
  cheaper than training every weight. ``lstsq+hidden+l1`` adds the L1 penalty raised progressively over
  the first half of the run (ProSparse's schedule), the preset's recipe for more exact zeros.
- ``lstsq-split+hidden``, the default: ``lstsq+hidden`` with a warm start that keeps the layer's best halves of
  neurons (both halves of the strongest, none of the weakest; ``warm_start._split_halves``) instead of each neuron's
  better half. Variants with a linear up (ReGLU, shifted ReLU) have nothing to split: for them it is ``lstsq+hidden``
  (``variant_recipe``), and they share its run folder.

``relufy`` runs one (variant, recipe) into ``data/models/<preset>/relufied-<base>-<variant>-<recipe>/``
with the trainer of ``train.loop`` (checkpoints, resume after a kill, progress bars, metrics), and records a
recovery curve: held-out perplexity and the exact-zero fraction of combined at every evaluation, against
tokens and against CPU seconds. The command line is ``turbosparse-relufy``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # pandas is imported where it is used: a training run never needs it
    import pandas as pd

from .. import cli, paths
from ..atomic import write_json
from ..presets import Preset, as_preset
from .warm_start import WarmStart, warm_start


@dataclass(frozen=True)
class Recipe:
    """How a ReLUfication spends its budget: a warm start, then continued training with this loss on these weights."""

    warm: str  # "lstsq": the layer-wise warm start below; "none": train the swapped model as it is
    objective: str  # lm (the paper's next-token loss), kd (distillation), kd+lm
    l1_coef: float = 0.0  # L1 penalty on combined (mean |combined| over layers), for more exact zeros
    l1_warmup_fraction: float = (
        0.0  # ... reached linearly over this share of the steps (ProSparse's progressive schedule)
    )
    hidden_coef: float = 0.0  # weight of the teacher's hidden states after every layer (normalised MSE)
    trainable: str = "all"  # all, no-embeddings or mlp (train.config.TRAINABLE)
    up_anneal_fraction: float = 0.0  # dReLU only: its up ReLU comes in gradually over this share of the steps
    split_halves: bool = False  # the warm start keeps the layer's best halves of neurons (``WarmStart.split``)
    about: str = ""


RECIPES: dict[str, Recipe] = {
    "paper": Recipe("none", "lm", about="the paper's: swap, then next-token loss"),
    "kd": Recipe("none", "kd", about="distillation from the original model"),
    "lstsq+lm": Recipe("lstsq", "lm", about="warm start, then next-token loss"),
    "lstsq+kd": Recipe("lstsq", "kd", about="warm start, then distillation of the logits"),
    "lstsq+kd+l1": Recipe("lstsq", "kd", l1_coef=0.02, about="... and a constant L1 penalty on combined"),
    # many small steps of distillation that also match the original's residual stream after every
    # layer, on the MLPs alone (the swap changed only them; frozen attention and embeddings make a step ~20% cheaper)
    "lstsq+hidden": Recipe(
        "lstsq",
        "kd",
        hidden_coef=1.0,
        trainable="mlp",
        about="warm start, then logits and hidden states of every layer distilled, MLPs trained",
    ),
    # ProSparse-style: the same, with an L1 penalty on combined raised linearly over the first half of the run. At
    # l1_coef 2 (the penalty ~15% of the loss at the start) 123k tokens on SmolLM2 moved exact zeros by half a point
    # (78.2% -> 78.7% at 61k tokens) for ~1% of perplexity, so the weight is 10x that
    "lstsq+hidden+l1": Recipe(
        "lstsq",
        "kd",
        l1_coef=20.0,
        l1_warmup_fraction=0.5,
        hidden_coef=1.0,
        trainable="mlp",
        about="... and a progressive L1 penalty on combined, for more exact zeros",
    ),
    # ReGLU (a linear up) recovers far better than dReLU on the same recipe (x1.54 against x2.48 of the original's
    # perplexity after 41k tokens at the cpu preset), so the up ReLU is the hard part: start from the warm start of a
    # linear up and bring its ReLU in gradually (a leaky ReLU whose negative slope falls 1 -> 0 over half the run)
    "lstsq+hidden+anneal": Recipe(
        "lstsq",
        "kd",
        hidden_coef=1.0,
        trainable="mlp",
        up_anneal_fraction=0.5,
        about="... with dReLU's up ReLU brought in gradually over the first half of the run",
    ),
    # the up ReLU drops half of every neuron (u < 0); the sign flip keeps each neuron's better half. Splitting
    # instead keeps the best F of all 2F halves at the same width: both halves of the strongest neurons, none of the
    # weakest (``warm_start._split_halves``), so the warm start loses less of the original before any step
    "lstsq-split+hidden": Recipe(
        "lstsq",
        "kd",
        hidden_coef=1.0,
        trainable="mlp",
        split_halves=True,
        about="warm start that keeps the best halves of neurons (both halves of the strongest), then as lstsq+hidden",
    ),
}
# the split warm start ended x2.06 [1.96, 2.16] of the original's perplexity against x2.25 [2.14, 2.37] for the sign
# flip, on the same 122,880 tokens at the cpu preset (notebook 05, 05_table1_analogue.csv)
DEFAULT_RECIPE = "lstsq-split+hidden"
BASE_MODELS = ("smollm2-135m", "scratch-swiglu")  # or the folder of any supported Hugging Face model
WARM_FILE = "warm_start.json"
RECORD_FILE = "relufication.json"  # what a finished run folder was made from and what it reached


# ----------------------------------------------------------------------------------------------
# a run


@dataclass(frozen=True)
class Base:
    """A model to ReLUfy: its short name (for folders), where it comes from, and the tokenizer of its data."""

    name: str
    source: str  # "smollm2-135m" or a folder
    tokenizer: str  # a name or folder for ``data.build.load_tokenizer_named``


def resolve_base(preset: Preset | str, base: str | None = None) -> Base:
    """``base`` (default: the preset's ``relufy.base``): SmolLM2-135M; ``scratch-swiglu``, notebook 02's
    from-scratch SwiGLU model at this preset (seed 0, our tokenizer); or the folder of a Hugging Face model."""
    P = as_preset(preset)
    base = base or P.relufy.base
    if base == "smollm2-135m":
        return Base(base, base, base)
    if base == "scratch-swiglu":
        return Base(base, str(paths.scratch_model_dir(P.name, "swiglu", P.train.seeds[0])), "ours")
    if (Path(base) / "config.json").exists():
        from ..models.registration import family
        from ..models.swap import SUPPORTED_MODEL_TYPES

        model_type = family(json.loads((Path(base) / "config.json").read_text()).get("model_type"))
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{base} holds a {model_type!r} model, which is not supported: ReLUfication swaps a gated "
                f"gate/up/down MLP ({', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if not any(next(Path(base).glob(pat), None) for pat in ("*.safetensors", "pytorch_model*.bin")):
            raise ValueError(f"{base} has a config.json but no weights (*.safetensors or pytorch_model*.bin)")
        return Base(Path(base).name, str(base), str(base))
    raise ValueError(
        f"unknown base model {base!r}; give {', '.join(BASE_MODELS)} or the folder of a Hugging Face "
        "model (Llama, Mistral, Qwen2/3, Gemma families)"
    )


def variant_recipe(variant: str, recipe: str) -> str:
    """The recipe ``variant`` actually runs under ``recipe``: splitting halves needs dReLU's up ReLU (under a linear
    up every half is kept anyway), so ReGLU or shifted ReLU under a split recipe is the same run as without the split,
    and shares its folder."""
    from dataclasses import replace

    from ..models.variants import get_variant

    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    r = RECIPES[recipe]
    if not r.split_halves or get_variant(variant).relu_up:
        return recipe
    plain = replace(r, split_halves=False, about="")
    same = [name for name, other in RECIPES.items() if replace(other, about="") == plain]
    return same[0] if same else recipe


def relufied_dir(
    preset: Preset | str, variant: str, recipe: str = DEFAULT_RECIPE, base: str | None = None, tag: str = ""
) -> Path:
    """Where ``relufy`` writes a run (and, once complete, the ``save_pretrained`` model); ``tag`` tells apart
    runs of the same recipe with other settings (the recipe comparison's shorter budget)."""
    P = as_preset(preset)
    name = resolve_base(P, base).name
    recipe = variant_recipe(variant, recipe)
    return paths.models_dir() / P.name / f"relufied-{name}-{variant}-{recipe}{'-' + tag if tag else ''}"


def relufy_config(
    preset: Preset | str, variant: str, recipe: str = DEFAULT_RECIPE, base: str | None = None, **overrides
):
    """The ``TrainConfig`` of a ReLUfication run: the preset's ``relufy`` section, the recipe's objective."""
    from ..models.variants import get_variant
    from .config import TrainConfig

    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    P = as_preset(preset)
    b = resolve_base(P, base)
    get_variant(variant)
    R = P.relufy
    r = RECIPES[recipe]
    fields = dict(
        model_preset=None,
        base_model=b.source,
        variant=variant,
        seed=0,
        total_tokens=R.total_tokens,
        batch_size=R.batch_size,
        micro_batch_size=R.micro_batch_size,
        context_length=R.context_length,
        lr=R.lr,
        min_lr_ratio=R.min_lr_ratio,
        warmup_steps=R.warmup_steps,
        precision=R.precision,
        tokenizer=b.tokenizer,
        objective=r.objective,
        l1_coef=r.l1_coef,
        l1_warmup_fraction=r.l1_warmup_fraction,
        up_anneal_fraction=r.up_anneal_fraction,
        hidden_coef=r.hidden_coef,
        trainable=r.trainable,
        eval_every=R.eval_every,
        eval_sequences=max(1, R.curve_eval_tokens // R.context_length),
        checkpoint_every=R.checkpoint_every,
        log_every=max(1, R.eval_every // 4),
    )
    return TrainConfig(**{**fields, **overrides})


def load_base(preset: Preset | str, base: str | None = None):
    """(model, tokenizer) of the base model (``resolve_base``), in eval mode."""
    from ..data.build import load_tokenizer_named
    from ..models.pretrained import load_smollm2
    from ..models.swap import load_model

    b = resolve_base(preset, base)
    if b.source == "smollm2-135m":
        return load_smollm2()
    return load_model(b.source), load_tokenizer_named(b.tokenizer)


def curve_hook(eval_ids: torch.Tensor, context_length: int):
    """An ``EvalHook``: held-out perplexity and the exact-zero fraction of combined, measured in one pass."""
    from ..eval.perplexity import perplexity
    from ..sparsity.instruments import record_activations

    def hook(model, step, tokens):
        with record_activations(model, kinds=("combined",)) as rec:
            r = perplexity(model, eval_ids, context_length=context_length)
        return {"heldout_ppl": r.ppl, "zero_frac": float(rec.overall().zero_frac.iloc[0])}

    return hook


def compare_dir(preset: Preset | str, recipe: str, base: str | None = None) -> Path:
    """The run folder of ``recipe`` in notebook 05's recipe comparison (on dReLU): a "-compare" folder of the
    preset's ``compare_tokens``, except for the default recipe, whose comparison run is the dReLU run itself (its
    whole budget: its curve is read at the others' minutes, and shows where it flattens)."""
    if recipe == DEFAULT_RECIPE:
        return relufied_dir(preset, "drelu", recipe, base)
    return relufied_dir(preset, "drelu", recipe, base, tag="compare")


def compare_tokens(preset: Preset | str, recipe: str) -> int:
    """Training tokens of ``recipe``'s run in the recipe comparison (see ``compare_dir``)."""
    R = as_preset(preset).relufy
    return R.total_tokens if recipe == DEFAULT_RECIPE else (R.compare_tokens or R.total_tokens)


def run_summary(run_dir: str | Path) -> dict:
    """What a finished run cost: tokens, steps, minutes of the warm start and of the training loop (evaluations and
    checkpoints included), and tokens per second of the loop and of the whole run (warm start included). A run
    resumed after a kill counts only its last session's loop time (``resumed_from_step`` says so)."""
    from .checkpoint import SUMMARY_FILE

    run_dir = Path(run_dir)
    s = json.loads((run_dir / SUMMARY_FILE).read_text())
    warm_path = run_dir / WARM_FILE
    warm = json.loads(warm_path.read_text())["seconds"] if warm_path.exists() else 0.0
    cfg = json.loads((run_dir / "train_config.json").read_text())
    loop = s["seconds_this_session"]
    tokens = s["tokens_seen"] - s["resumed_from_step"] * cfg["batch_size"] * cfg["context_length"]
    resumed = s["resumed_from_step"]
    return {
        "tokens": s["tokens_seen"],
        "steps": s["steps"],
        "precision": s["precision"],
        "trainable": cfg.get("trainable", "all"),
        "warm_start_min": warm / 60,
        "train_min": s["train_seconds"] / 60,
        "loop_min": loop / 60,
        "total_min": (warm + loop) / 60,
        "resumed_from_step": resumed,
        "loop_tokens_per_s": tokens / loop,
        "all_in_tokens_per_s": tokens / (warm + loop) if not resumed else float("nan"),
    }


def _warm_start_run(student, teacher, sequences, fit_tokens: int, cfg, warm: WarmStart, device) -> dict:
    """The warm start of a run on its own last ``fit_tokens`` training tokens, then its error on training tokens it
    did not fit (``unseen``: a quarter as many, from the other end)."""
    n_fit = max(1, fit_tokens // cfg.context_length)
    fit = sequences[-n_fit:] if n_fit < len(sequences) else sequences
    report = warm_start(student, teacher, fit.to(device), warm)
    unseen = sequences[: min(len(sequences) - n_fit, max(1, n_fit // 4))]
    if len(unseen):
        check = warm_start(student, teacher, unseen.to(device), warm, fit=False)
        report["unseen"] = {"tokens": check["tokens"], "layers": check["layers"]}
    return report


def relufy(
    preset: Preset | str = "cpu",
    variant: str = "drelu",
    recipe: str = DEFAULT_RECIPE,
    base: str | None = None,
    run_dir: str | Path | None = None,
    warm: WarmStart | None = None,
    progress: bool | None = None,
    threads: int | None = None,
    **overrides,
) -> tuple[Path, dict]:
    """Swap ``base``'s MLPs to ``variant`` and continue training it with ``recipe``; returns (run folder, summary).

    A finished run is loaded, not retrained; a killed one resumes from its last checkpoint (the warm start is
    not redone: the checkpoint holds weights that came after it). The summary adds the warm start's seconds
    and per-layer errors. ``overrides`` are ``TrainConfig`` fields (``total_tokens=...``).
    """
    import copy

    from ..data.build import heldout_ids
    from ..models.swap import apply_variant, mark_saved_variant, set_up_slope
    from .checkpoint import CHECKPOINT, check_config, is_complete
    from .config import up_slope_at
    from .data import training_sequences
    from .loop import train

    P = as_preset(preset)  # resolved once for the whole run, and passed down
    recipe = variant_recipe(variant, recipe)
    warm = warm or WarmStart(split=RECIPES[recipe].split_halves)
    cfg = relufy_config(P, variant, recipe, base, **overrides)  # every argument checked before anything is made
    b = resolve_base(P, base)
    run_dir = Path(run_dir) if run_dir is not None else relufied_dir(P, variant, recipe, base)
    if threads:
        torch.set_num_threads(threads)
    warm_path = run_dir / WARM_FILE
    check_config(run_dir, cfg)  # before anything else: a finished run of another config is refused, not returned
    if is_complete(run_dir):
        mark_saved_variant(run_dir)  # a folder saved before the turbosparse_<family> model types
        summary = json.loads((run_dir / "train_summary.json").read_text())
        if not (run_dir / RECORD_FILE).exists():
            write_record(run_dir, variant, recipe, b, P.relufy.curve_eval_tokens)
        return run_dir, {**summary, "warm_start": json.loads(warm_path.read_text()) if warm_path.exists() else None}
    teacher, tok = load_base(P, base)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the gpu and paper presets are meant for a GPU
    teacher.to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = apply_variant(copy.deepcopy(teacher), variant)
    for p in student.parameters():
        p.requires_grad_(True)
    if cfg.up_anneal_fraction > 0:  # the warm start fits the linear up the anneal starts from
        set_up_slope(student, up_slope_at(-1, cfg))
    sequences = training_sequences(cfg)
    warm_report = None
    if RECIPES[recipe].warm == "lstsq" and not (run_dir / CHECKPOINT / "state.json").exists():
        warm_report = _warm_start_run(student, teacher, sequences, P.relufy.fit_tokens, cfg, warm, device)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(warm_path, warm_report)
    elif warm_path.exists():
        warm_report = json.loads(warm_path.read_text())
    E = P.eval
    context = min(E.context_length, getattr(teacher.config, "max_position_embeddings", None) or E.context_length)
    hook = curve_hook(heldout_ids(tok, max_tokens=P.relufy.curve_eval_tokens), context)
    summary = train(
        cfg,
        run_dir,
        model=student,
        sequences=sequences,
        progress=progress,
        teacher=teacher if cfg.objective != "lm" else None,
        eval_hook=hook,
    )
    if warm_report is not None:
        summary = {**summary, "warm_start": warm_report}
    tok.save_pretrained(run_dir)  # the folder loads as a complete model (weights, config, tokenizer)
    write_record(run_dir, variant, recipe, b, P.relufy.curve_eval_tokens)
    return run_dir, summary


def write_record(run_dir: Path, variant: str, recipe: str, base: Base, heldout_tokens: int) -> dict:
    """``relufication.json`` beside the saved model: what it was made from (base, variant, recipe and its loss
    terms), the budget (tokens, steps, minutes) and the quality it reached (the recovery curve's last point:
    held-out perplexity on the curve's tokens, exact zeros of combined). A reader of the folder needs nothing else."""
    from dataclasses import asdict

    curve = recovery_curve(run_dir)
    last = curve.iloc[-1] if len(curve) else None
    record = {
        "base": base.source,
        "variant": variant,
        "recipe": recipe,
        "recipe_terms": asdict(RECIPES[recipe]),
        "budget": run_summary(run_dir),
        "quality": None
        if last is None
        else {
            "tokens_seen": int(last.tokens_seen),
            "heldout_ppl": float(last.heldout_ppl),
            "zero_frac": float(last.zero_frac),
            "heldout_tokens": heldout_tokens,
        },
        "load_with": "turbosparse_lib.models.swap.load_model(folder)",
    }
    write_json(run_dir / RECORD_FILE, record)
    return record


def recovery_curve(run_dir: str | Path) -> pd.DataFrame:
    """The evaluations of a run: tokens, wall-clock seconds (warm start + training), held-out perplexity and
    exact-zero fraction."""
    import pandas as pd

    from .checkpoint import read_metrics

    m = read_metrics(run_dir)
    m = m[m.heldout_ppl.notna()].copy() if "heldout_ppl" in m else m.iloc[0:0]
    warm_path = Path(run_dir) / WARM_FILE
    warm_s = json.loads(warm_path.read_text())["seconds"] if warm_path.exists() else 0.0
    m["train_seconds"] = m.get("train_seconds", pd.Series(0.0, index=m.index)).fillna(0.0)
    m["wall_seconds"] = warm_s + m["train_seconds"]
    return m[["step", "tokens_seen", "wall_seconds", "val_loss", "heldout_ppl", "zero_frac"]].reset_index(drop=True)


def recovery_at_equal_time(curves: pd.DataFrame, by: str = "recipe") -> tuple[float, pd.DataFrame]:
    """Held-out perplexity of each run at the same time: the end of the shortest run.

    ``curves``: ``recovery_curve`` rows with a ``by`` column naming the run. Interpolates log-perplexity
    linearly in time within each curve; a run whose first evaluation comes later than that time has no
    value there (NaN), never its first value carried back (a warm start that has not ended yet has
    recovered nothing). Returns (time in seconds, one row per run: ``ppl_at_t``, ``first_s``, ``last_s``,
    ``best_ppl`` = the lowest perplexity it reaches, and ``best_s``, when).
    """
    import pandas as pd

    t = float(curves.groupby(by).wall_seconds.max().min())
    rows = []
    for name, g in curves.groupby(by, sort=False):
        g = g.sort_values("wall_seconds")
        s, p = g.wall_seconds.to_numpy(float), np.log(g.heldout_ppl.to_numpy(float))
        at = float(np.exp(np.interp(t, s, p))) if s[0] <= t <= s[-1] else float("nan")
        b = int(np.argmin(p))
        rows.append(
            {
                by: name,
                "ppl_at_t": at,
                "first_s": s[0],
                "last_s": s[-1],
                "best_ppl": float(np.exp(p[b])),
                "best_s": s[b],
            }
        )
    return t, pd.DataFrame(rows).set_index(by)


def main(argv: list[str] | None = None) -> int:

    p = cli.parser(
        "turbosparse-relufy",
        "ReLUfy a pretrained model: swap its MLP activation, then continue training it (resumable). Section 5 of "
        "the paper.",
    )
    cli.add_preset(p)
    p.add_argument("--variant", default="drelu", help="reglu, shifted_relu, drelu, ... (default drelu)")
    p.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"one of {', '.join(RECIPES)} (default {DEFAULT_RECIPE})")
    p.add_argument(
        "--base",
        default=None,
        help="smollm2-135m, scratch-swiglu or the folder of a Hugging Face model (default: the preset's)",
    )
    p.add_argument("--total-tokens", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--out", default=None, help="run folder (default: data/models/<preset>/relufied-<base>-<variant>-<recipe>)"
    )
    a = p.parse_args(argv)
    overrides = {"total_tokens": a.total_tokens} if a.total_tokens is not None else {}
    try:
        relufy_config(a.preset, a.variant, a.recipe, a.base, **overrides)
        if a.threads is not None and a.threads < 1:
            raise ValueError(f"--threads must be >= 1; got {a.threads}")
        if a.out is not None and Path(a.out).exists() and not Path(a.out).is_dir():
            raise ValueError(f"--out {a.out} is a file; give a folder for the run")
    except (ValueError, TypeError) as e:
        return cli.refuse("turbosparse-relufy", e)
    try:
        run_dir, summary = relufy(a.preset, a.variant, a.recipe, a.base, a.out, threads=a.threads, **overrides)
    except ValueError as e:  # a folder holding another run's config
        return cli.refuse("turbosparse-relufy", e)
    print(json.dumps({"run_dir": str(run_dir), **{k: v for k, v in summary.items() if k != "warm_start"}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

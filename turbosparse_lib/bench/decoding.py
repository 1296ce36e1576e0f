"""End-to-end decoding benchmarks: our engine (dense or sparse, in f32, Q8_0 or Q4_0) beside llama.cpp.

Sparse runs are labelled by their mask source: ``exact`` and ``topk`` replay masks recorded on a
first pass (``inference.masks.RecordedMasks``: the cost of an ideal, free predictor); ``oracle``
computes the exact mask in line from the weights (``ExactZeroOracle``, inside the FFN kernel): gate-first,
every gate row read, then the up rows only where the gate fired and the down rows only where the
combined value is not zero. It is exact and needs no predictor: the baseline a predictor must beat.
Every run of ours decodes a token in one compiled call (``inference.step``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Literal

import numpy as np
import pandas as pd

from .. import paths
from ..inference.engine import Engine
from ..inference.masks import ExactZeroOracle, MaskProvider, RecordedMasks, TopKOracle
from ..inference.quant import FORMATS
from . import timing
from .bytes_model import ModelShape, bytes_per_token, engine_precision, llama_cpp_precision, measured_bytes_per_token
from .timing import median

MASK_SOURCES = {
    None: "dense",
    "exact": "exact zeros, recorded then replayed at no cost (an ideal predictor)",
    "topk": "top-k oracle, recorded then replayed at no cost (an ideal predictor, lossy)",
    "oracle": "gate-first: every gate row read, then up and down rows only where the gate fired (exact, no predictor)",
    "provider": "a mask provider run in line each token (e.g. trained predictors), its cost counted",
}
PROFILE_PARTS = ("embed", "attention", "mask", "ffn", "lm_head", "other")


@dataclass
class EngineRun:
    """One configuration of our engine: weight format ``precision`` ('f32', 'q8_0', 'q4_0'; the engine is
    quantised from the float one once and kept), ``masks`` None (dense), 'oracle' (ExactZeroOracle in line),
    'exact' (its masks, recorded then replayed), 'topk' (TopKOracle at ``topk_sparsity``, replayed) or
    'provider' (``provider``, any ``(layer_idx, x_H) -> indices`` callable such as
    ``predictors.provider.PredictorMaskProvider``, called in line every token). In a Q format the engine also holds
    the FFN in llama.cpp's dense layout (``dense_layout``, ``Engine.quantized``): dense runs read it, the fastest
    dense path we have, and so does gate-first for its gate rows; sparse runs read the bundles. Every run of one
    precision shares one engine, so all prefill the prompt alike."""

    engine: Engine
    precision: Literal["f32", "q8_0", "q4_0"] = "f32"
    masks: Literal["oracle", "exact", "topk", "provider"] | None = None
    topk_sparsity: float = 0.9
    provider: MaskProvider | None = None  # for masks="provider"
    profile: dict = field(default_factory=dict)  # accumulated over timed runs
    dense_layout: bool = True  # Q formats only
    _replay: RecordedMasks | None = None

    def __post_init__(self):
        if self.precision not in FORMATS:
            raise ValueError(f"precision must be one of {', '.join(FORMATS)}; got {self.precision!r}")
        if self.masks not in MASK_SOURCES:
            raise ValueError(f"masks must be None, 'oracle', 'exact', 'topk' or 'provider'; got {self.masks!r}")
        if (self.masks == "provider") != (self.provider is not None):
            raise ValueError("a provider is given with masks='provider', and only then")
        self.engine = self.engine.quantized(self.precision, self.dense_layout)

    def _provider(self) -> MaskProvider | None:
        if self.masks is None:
            return None
        if self.masks == "oracle":
            return ExactZeroOracle(self.engine)
        if self.masks == "provider":
            return self.provider
        if self._replay is None:  # first run: record
            if self.masks == "exact":
                self._replay = RecordedMasks(ExactZeroOracle(self.engine))
            else:
                self._replay = RecordedMasks(TopKOracle(self.engine, self.topk_sparsity))
        else:
            self._replay.rewind()
        return self._replay

    def decode(self, prompt_ids: np.ndarray, new_tokens: int, profile: dict | None = None) -> tuple[np.ndarray, float]:
        """Greedy tokens (the first from prefill) and the seconds of the ``new_tokens - 1`` decode steps."""
        eng = self.engine
        provider = self._provider()
        eng.reset(len(prompt_ids) + new_tokens)
        tokens = [int(np.argmax(eng.prefill(prompt_ids)))]
        t0 = perf_counter()
        for _ in range(new_tokens - 1):
            logits = eng.step(tokens[-1], provider is not None, provider, profile)
            tokens.append(int(np.argmax(logits)))
        return np.array(tokens, dtype=np.int64), perf_counter() - t0


def bench_decoding(
    runs: dict,
    prompt_ids,
    new_tokens: int,
    repeats: int,
    against: dict[str, str] | None = None,
    max_repeats: int | None = None,
    halfwidth: float = 0.05,
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Decode with every run ``repeats`` times, round-robin, after one untimed warm-up run each.

    ``runs``: name -> ``EngineRun`` / ``LlamaCppRun``. Returns a table (one row per run: median
    tokens/s and ms/token over ``new_tokens - 1`` decode steps, the spread, whether every timed
    run gave the warm-up run's tokens) and the tokens each run produced. Engine runs accumulate
    their profile over the timed runs in ``run.profile``.

    ``against`` (run -> baseline run) adds each run's speed over its baseline's with a 95% interval
    (``timing.speedup_interval``, rounds paired) as ``ratio``, ``ratio_lo``, ``ratio_hi``; rounds then go on
    past ``repeats`` until every interval lies within ``halfwidth`` of its ratio (relative) or ``max_repeats``
    rounds are done (``converged`` says which).
    """
    against = against or {}
    max_repeats = repeats if max_repeats is None else max_repeats
    if new_tokens < 2 or repeats < 1 or max_repeats < repeats:
        raise ValueError(
            f"need new_tokens >= 2 and 1 <= repeats <= max_repeats; got {new_tokens}, {repeats}, {max_repeats}"
        )
    if unknown := {*against, *against.values()} - set(runs):
        raise ValueError(f"against names runs that are not benchmarked: {sorted(unknown)}")
    prompt = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
    tokens = {name: run.decode(prompt, new_tokens)[0] for name, run in runs.items()}  # warm-up (and recording)
    secs, stable = {name: [] for name in runs}, dict.fromkeys(runs, True)
    ci, wide = {}, []
    while True:
        for name, run in runs.items():
            toks, s = run.decode(prompt, new_tokens, run.profile)
            stable[name] &= bool(np.array_equal(toks, tokens[name]))
            secs[name].append(s)
        done = len(secs[name])
        if done < repeats:
            continue
        if against and done >= 2:
            ci = {r: timing.speedup_interval(secs[b], secs[r]) for r, b in against.items()}
            wide = [
                r for r, (lo, hi) in ci.items() if hi - lo > 2 * halfwidth * timing.speedup(secs[against[r]], secs[r])
            ]
        if done >= max_repeats or not wide:
            break
    steps = new_tokens - 1
    rows = [
        {
            "run": name,
            "tokens_per_s": steps / median(v),
            "ms_per_token": 1e3 * median(v) / steps,
            "spread_pct": 100 * (max(v) - min(v)) / median(v),
            "repeats": len(v),
            "same_tokens_each_run": stable[name],
        }
        for name, v in secs.items()
    ]
    table = pd.DataFrame(rows).set_index("run")
    if against:
        table["vs"] = pd.Series(against)
        table["ratio"] = pd.Series({r: timing.speedup(secs[b], secs[r]) for r, b in against.items()})
        table["ratio_lo"] = pd.Series({r: lo for r, (lo, _) in ci.items()})
        table["ratio_hi"] = pd.Series({r: hi for r, (_, hi) in ci.items()})
        table["converged"] = pd.Series({r: r in ci and r not in wide for r in against})
    return table, tokens


def profile_table(runs: dict) -> pd.DataFrame:
    """Milliseconds per token in each engine component (attention incl. norms, mask, ffn, lm_head, other:
    call overhead outside the compiled step), the mean FFN active fraction and the FFN rows read per
    token, for every ``EngineRun`` that has a profile."""
    rows = []
    for name, run in runs.items():
        p = getattr(run, "profile", None)
        if not p or not p.get("tokens"):
            continue
        n = p["tokens"]
        row = {"run": name, **{k: 1e3 * p.get(k, 0.0) / n for k in PROFILE_PARTS}}
        row["total"] = sum(row[k] for k in PROFILE_PARTS)
        row["ffn_active"] = p["active_neurons"] / (p["ffn_calls"] * run.engine.config.intermediate_size)
        row["ffn_rows_per_token"] = (p["rows_gate"] + p["rows_up"] + p["rows_down"]) / n
        rows.append(row)
    return pd.DataFrame(rows).set_index("run")


def decoding_limits(
    shape: ModelShape,
    runs: dict,
    speed: pd.DataFrame,
    prompt_tokens: int,
    new_tokens: int,
    bandwidth_gbs: float,
    baselines: dict[str, str],
) -> pd.DataFrame:
    """Per run: bytes per token, achieved GB/s and its fraction of ``bandwidth_gbs``, the GB/s of the FFN
    kernels alone (from the profile; NaN for llama.cpp); and against ``baselines[precision]`` (the dense
    run of ours at the same precision) the measured ``speedup``, the ``byte_limit`` (baseline bytes / own
    bytes) and ``of_limit`` = speedup / byte_limit.

    Bytes per token at the mean decode position: the model's attention, lm_head, norms and KV cache
    (``bytes_per_token``) and, for our runs, the FFN rows the kernels counted (``measured_bytes_per_token``:
    the in-line oracle's every gate row included), the mask indices handed to them and a mask provider's
    own weights (``provider.nbytes``: the predictors, read every token). llama.cpp runs are
    dense, with its F16 KV cache.
    """
    prof = profile_table(runs)
    context = prompt_tokens + (new_tokens - 2) / 2  # mean position of the decode steps
    rows = []
    for name, run in runs.items():
        fmt, masks = run.precision, getattr(run, "masks", None)
        if name in prof.index:
            b = measured_bytes_per_token(
                shape, run.profile, context, engine_precision(fmt), index_bytes=masks not in (None, "oracle")
            )
        else:
            b = bytes_per_token(shape, None, context, llama_cpp_precision(fmt))
        # a provider's own weights (the predictors) are read every token: they count, as PowerInfer's do
        b["mask_provider"] = float(getattr(getattr(run, "provider", None), "nbytes", 0))
        b["total"] += b["mask_provider"]
        ffn_ms = float(prof.loc[name, "ffn"]) if name in prof.index else math.nan
        rows.append(
            {
                "run": name,
                "precision": fmt,
                "masks": masks or "dense",
                "ffn_active": float(prof.loc[name, "ffn_active"]) if name in prof.index else 1.0,
                "MB_per_token": b["total"] / 1e6,
                "tokens_per_s": speed.loc[name, "tokens_per_s"],
                "ffn_GBps": (b["ffn"] + b["mask_indices"]) / ffn_ms / 1e6,
            }
        )
    df = pd.DataFrame(rows).set_index("run")
    df["GBps"] = df.MB_per_token * df.tokens_per_s / 1e3
    df["bw_frac"] = df.GBps / bandwidth_gbs
    for fmt, base in baselines.items():
        if base not in df.index:
            raise KeyError(f"baseline {base!r} for {fmt} is not among the runs {list(df.index)}")
        same = df.precision == fmt
        df.loc[same, "speedup"] = df.tokens_per_s[same] / df.loc[base, "tokens_per_s"]
        df.loc[same, "byte_limit"] = df.loc[base, "MB_per_token"] / df.MB_per_token[same]
    df["of_limit"] = df.speedup / df.byte_limit
    return df


def scratch_drelu_dirs(preset: str, seeds=(0, 1)) -> list[Path]:
    """The from-scratch dReLU models notebook 02 saved at ``preset`` (empty if it has not run)."""
    return [d for s in seeds if ((d := paths.scratch_model_dir(preset, "drelu", s)) / "config.json").exists()]


def decoding_runs(
    engine_swiglu: Engine,
    engine: Engine,
    model_label: str,
    topk_sparsity: float,
    llama: dict | None = None,
    precisions=("f32", "q8_0", "q4_0"),
    shipped_label: str = "SmolLM2 as shipped (SwiGLU)",
) -> tuple[dict, dict, pd.DataFrame]:
    """The end-to-end configurations of notebook 06, each labelled with its model, precision and mask source.

    ``engine_swiglu``: the dense model as shipped (llama.cpp decodes the same); ``engine``: the sparse model
    (``model_label`` says which, e.g. an untrained dReLU swap), both float32 (each precision is quantised from
    them). ``llama``: precision -> ``LlamaCppRun`` on the shipped model in that format (or None). For every
    precision: the shipped model dense, the sparse model dense, sparse with exact masks replayed and with the
    oracle in line; at f32 also top-k replayed. Returns the runs, a (precision, kind) -> run-name map for the
    code that reads them (kinds: swiglu, dense, exact, oracle, topk, llama), and a legend table.
    """
    m, llama = model_label, llama or {}
    spec = {}  # (precision, kind) -> (run name, engine, masks)
    for p in precisions:
        spec[(p, "swiglu")] = (f"{shipped_label} · dense {p} (ours)", engine_swiglu, None)
        spec[(p, "dense")] = (f"{m} · dense {p}", engine, None)
        spec[(p, "exact")] = (f"{m} · sparse {p} · exact replayed", engine, "exact")
        spec[(p, "oracle")] = (f"{m} · sparse {p} · exact in-line", engine, "oracle")
        if p == "f32":
            spec[(p, "topk")] = (f"{m} · sparse {p} · top-{topk_sparsity:.0%} replayed", engine, "topk")
    runs = {name: EngineRun(eng, key[0], masks, topk_sparsity) for key, (name, eng, masks) in spec.items()}
    keys = {key: v[0] for key, v in spec.items()}
    legend = [
        {
            "run": name,
            "model": shipped_label if key[1] == "swiglu" else m,
            "precision": key[0],
            "mask_source": MASK_SOURCES[masks],
        }
        for key, (name, _, masks) in spec.items()
    ]
    for p, run in llama.items():
        keys[(p, "llama")] = name = f"llama.cpp · {shipped_label} · dense {p}"
        runs[name] = run
        legend.append({"run": name, "model": shipped_label, "precision": f"{p} (GGUF, pure)", "mask_source": "dense"})
    return runs, keys, pd.DataFrame(legend).set_index("run")


def scratch_model_decoding(dirs: list[Path], prompt_ids, bench, bandwidth_gbs: float, llc_bytes: int) -> dict:
    """End-to-end dense and exact-replay decoding of from-scratch dReLU models, where their weights exceed
    twice the cache (smaller ones are not bandwidth-bound). Returns name -> limits table, or a reason string."""
    from ..models.swap import load_model
    from .bytes_model import weights_mb

    out = {}
    for d in dirs:
        eng = Engine.from_transformers(load_model(d))
        mb = weights_mb(eng)
        if mb * 1e6 < 2 * llc_bytes:
            out[d.name] = (
                f"{mb:.0f} MB of weights, within twice the {llc_bytes / 2**20:.0f} MB cache: not "
                "bandwidth-bound, so not timed end to end"
            )
            continue
        runs = {"dense f32": EngineRun(eng), "sparse f32 exact replayed": EngineRun(eng, masks="exact")}
        speed, _ = bench_decoding(runs, prompt_ids, bench.new_tokens, bench.decode_repeats)
        out[d.name] = decoding_limits(
            ModelShape.of_engine(eng, d.name),
            runs,
            speed,
            bench.prompt_tokens,
            bench.new_tokens,
            bandwidth_gbs,
            {"f32": "dense f32"},
        )
    return out


def _threshold_label(t: float | str) -> str:
    """A predicted run's label: ``threshold 0.3`` for one threshold, or the operating point's own label."""
    return t if isinstance(t, str) else f"threshold {t:g}"


def predicted_decoding_runs(
    engine: Engine,
    predictors,
    thresholds,
    model_label: str,
    llama: dict | None = None,
    precisions=("f32", "q8_0", "q4_0"),
    llama_label: str = "SmolLM2 as shipped (SwiGLU)",
    points: dict | None = None,
) -> tuple[dict, dict, pd.DataFrame]:
    """The configurations of notebook 07's speed-at-equal-quality table, for every precision: ``engine``
    (a float32 engine of the sparse model) dense, sparse with exact masks replayed (an ideal, free predictor),
    gate-first (the exact masks computed in line: every gate row, the rest where the gate fired), sparse with
    ``predictors`` (a ``PredictorSet``) in line at each threshold, its matrices in the engine's format; sparse at
    each operating point (``points``: label -> ``PredictorSet`` with its per-layer thresholds,
    ``predictors.metrics.operating_point``); and llama.cpp (``llama``: precision -> ``LlamaCppRun``) at that
    precision on the model it can run.

    Returns the runs, a (precision, kind, threshold or point label) -> run-name map (kinds: dense, exact,
    gatefirst, predicted, point, llama; None for all kinds but predicted and point) and a legend table.
    """
    from ..predictors.provider import PredictorMaskProvider

    spec, keys = {}, {}
    for p in precisions:
        keys[(p, "dense", None)] = name = f"{model_label} · dense {p}"
        spec[name] = (p, None, None, None)
        keys[(p, "exact", None)] = name = f"{model_label} · sparse {p} · exact replayed"
        spec[name] = (p, "exact", None, None)
        keys[(p, "gatefirst", None)] = name = f"{model_label} · sparse {p} · gate-first"
        spec[name] = (p, "oracle", None, None)
        for t in thresholds:
            keys[(p, "predicted", t)] = name = f"{model_label} · sparse {p} · predicted, threshold {t:g}"
            spec[name] = (p, "provider", PredictorMaskProvider(predictors, t, fmt=p), t)
        for label, ps in (points or {}).items():
            keys[(p, "point", label)] = name = f"{model_label} · sparse {p} · predicted, {label}"
            spec[name] = (p, "provider", PredictorMaskProvider(ps, fmt=p), label)
    runs = {name: EngineRun(engine, p, masks, provider=prov) for name, (p, masks, prov, _) in spec.items()}
    legend = [
        {
            "run": name,
            "model": model_label,
            "precision": p,
            "mask_source": MASK_SOURCES[masks] if t is None else f"predictors in line, {_threshold_label(t)}",
            "threshold": None if isinstance(t, str) else t,
            "point": t if isinstance(t, str) else None,
        }
        for name, (p, masks, _, t) in spec.items()
    ]
    for p, run in (llama or {}).items():
        keys[(p, "llama", None)] = name = f"llama.cpp · {llama_label} · dense {p}"
        runs[name] = run
        legend.append(
            {
                "run": name,
                "model": llama_label,
                "precision": f"{p} (GGUF, pure)",
                "mask_source": "dense",
                "threshold": None,
                "point": None,
            }
        )
    return runs, keys, pd.DataFrame(legend).set_index("run")

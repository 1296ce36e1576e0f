"""End-to-end decoding benchmarks: our engine (dense or sparse, float32 or int8) beside llama.cpp.

Sparse runs are labelled by their mask source: ``exact`` and ``topk`` replay masks recorded on a
first pass (``inference.masks.RecordedMasks``: the cost of an ideal, free predictor); ``oracle``
computes the exact mask in line from the weights (``ExactZeroOracle``), so the price of computing
masks shows in the profile's ``mask`` entry.
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
from .bytes_model import FP32, OURS_INT8_FFN, ModelShape, bytes_per_token
from .timing import median

MASK_SOURCES = {
    None: "dense",
    "exact": "exact zeros, recorded then replayed at no cost (an ideal predictor)",
    "topk": "top-k oracle, recorded then replayed at no cost (an ideal predictor, lossy)",
    "oracle": "exact zeros computed in line from the weights (oracle cost paid every token)",
}


@dataclass
class EngineRun:
    """One configuration of our engine: ``masks`` None (dense), 'oracle' (ExactZeroOracle in-line),
    'exact' (its masks, recorded then replayed) or 'topk' (TopKOracle at ``topk_sparsity``, replayed)."""

    engine: Engine
    ffn_dtype: Literal["float32", "int8"] = "float32"
    masks: Literal["oracle", "exact", "topk"] | None = None
    topk_sparsity: float = 0.9
    profile: dict = field(default_factory=dict)  # accumulated over timed runs
    _replay: RecordedMasks | None = None

    def __post_init__(self):
        if self.ffn_dtype not in ("float32", "int8"):
            raise ValueError(f"ffn_dtype must be 'float32' or 'int8'; got {self.ffn_dtype!r}")
        if self.masks not in (None, "oracle", "exact", "topk"):
            raise ValueError(f"masks must be None, 'oracle', 'exact' or 'topk'; got {self.masks!r}")
        if self.ffn_dtype == "int8" and self.engine.layers[0].gate_q is None:
            self.engine.quantize_ffn_int8()

    def _provider(self) -> MaskProvider | None:
        if self.masks is None:
            return None
        if self.masks == "oracle":
            return ExactZeroOracle(self.engine)
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
        eng.ffn_dtype = self.ffn_dtype  # the float weights stay beside the int8 ones
        provider = self._provider()
        eng.reset(len(prompt_ids) + new_tokens)
        tokens = [int(np.argmax(eng.prefill(prompt_ids)))]
        t0 = perf_counter()
        for _ in range(new_tokens - 1):
            logits = eng.step(tokens[-1], provider is not None, provider, profile)
            tokens.append(int(np.argmax(logits)))
        return np.array(tokens, dtype=np.int64), perf_counter() - t0


def bench_decoding(runs: dict, prompt_ids, new_tokens: int, repeats: int) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Decode with every run ``repeats`` times, round-robin, after one untimed warm-up run each.

    ``runs``: name -> ``EngineRun`` / ``LlamaCppRun``. Returns a table (one row per run: median
    tokens/s and ms/token over ``new_tokens - 1`` decode steps, the spread, whether every timed
    run gave the warm-up run's tokens) and the tokens each run produced. Engine runs accumulate
    their profile over the timed runs in ``run.profile``.
    """
    if new_tokens < 2 or repeats < 1:
        raise ValueError(f"need new_tokens >= 2 and repeats >= 1; got {new_tokens}, {repeats}")
    prompt = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
    tokens = {name: run.decode(prompt, new_tokens)[0] for name, run in runs.items()}  # warm-up (and recording)
    secs, stable = {name: [] for name in runs}, dict.fromkeys(runs, True)
    for _ in range(repeats):
        for name, run in runs.items():
            toks, s = run.decode(prompt, new_tokens, run.profile)
            stable[name] &= bool(np.array_equal(toks, tokens[name]))
            secs[name].append(s)
    steps = new_tokens - 1
    rows = [{
        "run": name, "tokens_per_s": steps / median(v), "ms_per_token": 1e3 * median(v) / steps,
        "spread_pct": 100 * (max(v) - min(v)) / median(v), "repeats": len(v), "same_tokens_each_run": stable[name],
    } for name, v in secs.items()]  # fmt: skip
    return pd.DataFrame(rows).set_index("run"), tokens


def profile_table(runs: dict) -> pd.DataFrame:
    """Milliseconds per token in each engine component (attention incl. norms, mask, ffn, lm_head),
    and the mean FFN active fraction, for every ``EngineRun`` that has a profile."""
    rows = []
    for name, run in runs.items():
        p = getattr(run, "profile", None)
        if not p or not p.get("tokens"):
            continue
        n = p["tokens"]
        row = {"run": name, **{k: 1e3 * p[k] / n for k in ("embed", "attention", "mask", "ffn", "lm_head")}}
        row["total"] = sum(row[k] for k in ("embed", "attention", "mask", "ffn", "lm_head"))
        row["ffn_active"] = p["active_neurons"] / (p["ffn_calls"] * run.engine.config.intermediate_size)
        rows.append(row)
    return pd.DataFrame(rows).set_index("run")


def decoding_limits(shape: ModelShape, runs: dict, speed: pd.DataFrame, prompt_tokens: int, new_tokens: int,
                    bandwidth_gbs: float, baselines: dict[str, str]) -> pd.DataFrame:
    """Per run: bytes per token (at the run's measured FFN active fraction and mean decode position),
    achieved GB/s and its fraction of ``bandwidth_gbs``, the GB/s of the FFN kernels alone (from the
    profile; NaN for llama.cpp); and against ``baselines[ffn_dtype]`` (the
    dense run of the same FFN precision) the measured ``speedup``, the ``byte_limit`` (baseline
    bytes / own bytes) and ``of_limit`` = speedup / byte_limit. llama.cpp runs count as dense fp32.
    """
    prof = profile_table(runs)
    context = prompt_tokens + (new_tokens - 2) / 2  # mean position of the decode steps
    rows = []
    for name, run in runs.items():
        dtype, masks = getattr(run, "ffn_dtype", "float32"), getattr(run, "masks", None)
        active = None if masks is None else float(prof.loc[name, "ffn_active"])
        b = bytes_per_token(shape, active, context, OURS_INT8_FFN if dtype == "int8" else FP32)
        ffn_ms = float(prof.loc[name, "ffn"]) if name in prof.index else math.nan
        rows.append({"run": name, "ffn_dtype": dtype, "masks": masks or "dense",
                     "ffn_active": 1.0 if active is None else active, "MB_per_token": b["total"] / 1e6,
                     "tokens_per_s": speed.loc[name, "tokens_per_s"],
                     "ffn_GBps": (b["ffn"] + b["mask_indices"]) / ffn_ms / 1e6})  # fmt: skip
    df = pd.DataFrame(rows).set_index("run")
    df["GBps"] = df.MB_per_token * df.tokens_per_s / 1e3
    df["bw_frac"] = df.GBps / bandwidth_gbs
    for dtype, base in baselines.items():
        if base not in df.index:
            raise KeyError(f"baseline {base!r} for {dtype} is not among the runs {list(df.index)}")
        same = df.ffn_dtype == dtype
        df.loc[same, "speedup"] = df.tokens_per_s[same] / df.loc[base, "tokens_per_s"]
        df.loc[same, "byte_limit"] = df.loc[base, "MB_per_token"] / df.MB_per_token[same]
    df["of_limit"] = df.speedup / df.byte_limit
    return df




def scratch_drelu_dirs(preset: str, seeds=(0, 1)) -> list[Path]:
    """The from-scratch dReLU models notebook 02 saved at ``preset`` (empty if it has not run)."""
    return [d for s in seeds if ((d := paths.scratch_model_dir(preset, "drelu", s)) / "config.json").exists()]


def decoding_runs(engine_swiglu: Engine, engine: Engine, model_label: str, topk_sparsity: float,
                  llama: "object | None" = None, shipped_label: str = "SmolLM2 as shipped (SwiGLU)",
                  ) -> tuple[dict, dict[str, str], pd.DataFrame]:
    """The end-to-end configurations of notebook 06, each labelled with its model, precision and mask source.

    ``engine_swiglu``: the dense model as shipped (llama.cpp decodes the same); ``engine``: the sparse model
    (``model_label`` says which, e.g. an untrained dReLU swap). Returns the runs, a key -> run-name map for the
    code that reads them, and a legend table (run, model, precision, masks, what the mask source means).
    """
    m = model_label
    spec = {  # key: (run name, engine, ffn dtype, masks, topk)
        "swiglu": (f"{shipped_label} · dense fp32 (ours)", engine_swiglu, "float32", None),
        "dense": (f"{m} · dense fp32", engine, "float32", None),
        "exact": (f"{m} · sparse fp32 · exact replayed", engine, "float32", "exact"),
        "topk": (f"{m} · sparse fp32 · top-{topk_sparsity:.0%} replayed", engine, "float32", "topk"),
        "oracle": (f"{m} · sparse fp32 · exact in-line", engine, "float32", "oracle"),
        "int8": (f"{m} · dense int8 FFN", engine, "int8", None),
        "int8_exact": (f"{m} · sparse int8 FFN · exact replayed", engine, "int8", "exact"),
        "int8_oracle": (f"{m} · sparse int8 FFN · exact in-line", engine, "int8", "oracle"),
    }
    runs = {name: EngineRun(eng, dtype, masks, topk_sparsity) for name, eng, dtype, masks in spec.values()}
    keys = {k: v[0] for k, v in spec.items()}
    legend = [{"run": name, "model": shipped_label if k == "swiglu" else m, "ffn_precision": dtype,
               "mask_source": MASK_SOURCES[masks]} for k, (name, _, dtype, masks) in spec.items()]
    if llama is not None:
        keys["llama"] = f"llama.cpp · {shipped_label} · dense F32"
        runs[keys["llama"]] = llama
        legend.append({"run": keys["llama"], "model": shipped_label, "ffn_precision": "float32 (GGUF F32)",
                       "mask_source": "dense"})
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
            out[d.name] = (f"{mb:.0f} MB of weights, within twice the {llc_bytes / 2**20:.0f} MB cache: not "
                           "bandwidth-bound, so not timed end to end")
            continue
        runs = {"dense fp32": EngineRun(eng), "sparse fp32 exact replayed": EngineRun(eng, masks="exact")}
        speed, _ = bench_decoding(runs, prompt_ids, bench.new_tokens, bench.decode_repeats)
        out[d.name] = decoding_limits(ModelShape.of_engine(eng, d.name), runs, speed, bench.prompt_tokens,
                                      bench.new_tokens, bandwidth_gbs, {"float32": "dense fp32"})
    return out

"""Notebook 06's verdicts: each measured number against its target in ``paper.targets``.

``speed_targets`` computes them once, as (target key, value, note) rows; the notebook shows the rows as a styled table
(``tables.targets_summary``) and ``speed_verdicts`` prints the same rows as lines, with the engine's bandwidth."""

from __future__ import annotations

import pandas as pd

from ..paper.targets import check

Row = tuple[str, float, str]  # (target key in paper.targets, measured value, what was measured)


def gemv_targets(gemv: pd.DataFrame) -> list[Row]:
    """Our f32 GEMV against BLAS (worst shape), and each format's share of the bandwidth on its worst shape above
    the cache (none at a preset whose shapes all fit in it)."""
    f32 = gemv[gemv.fmt == "f32"]
    rows = [("gemv_vs_blas", f32.ours_vs_best.max(), f"f32, worst shape {f32.loc[f32.ours_vs_best.idxmax(), 'shape']}")]
    for fmt, g in gemv.groupby("fmt", sort=False):
        big = g[g.above_cache]
        if not big.empty:
            worst = big.loc[big.bw_frac.idxmin()]
            rows.append(("gemv_of_bandwidth", worst.bw_frac, f"{fmt}, worst shape {worst['shape']}"))
    return rows


def ffn_targets(ffn: pd.DataFrame) -> list[Row]:
    """The sparse FFN's speed-up at 90% on Mistral-7B's shape, per format (where the preset measures that shape)."""
    mis = ffn[(ffn.N == 14336) & (ffn.H == 4096) & (ffn.sparsity == 0.9)]
    return [
        (
            "ffn_sparse_speedup_90",
            r.speedup,
            f"{r.dtype}; byte limit {r.byte_limit:.2f}x, sparse reads at {r.sparse_bw_frac:.0%} of bandwidth, "
            f"{r.layers_cycled} of {r.model_layers} layers cycled",
        )
        for r in mis.itertuples()
    ]


def dense_over_llama_targets(p: str, speed: pd.DataFrame, keys: dict) -> list[Row]:
    """Our dense engine on the model as shipped over llama.cpp, both at ``p``: the paired ratio and, where the rounds
    were timed against each other (``bench_decoding(against=...)``), its 95% interval's lower end as a target too."""
    ours, llama = speed.loc[keys[(p, "swiglu")]], speed.loc[keys[(p, "llama")]]
    paired = "ratio" in speed and pd.notna(ours.get("ratio"))
    ratio = ours.ratio if paired else ours.tokens_per_s / llama.tokens_per_s
    rows = [(f"ours_over_llama_cpp_{p}", ratio, f"{p}, same model as shipped, same threads")]
    if paired:
        rows.append(
            (
                "ours_over_llama_cpp_interval_lo",
                ours.ratio_lo,
                f"{p}, 95% interval [{ours.ratio_lo:.2f}, {ours.ratio_hi:.2f}], {ours.repeats:.0f} paired rounds",
            )
        )
    return rows


def speed_targets(
    gemv: pd.DataFrame,
    ffn: pd.DataFrame,
    limits: pd.DataFrame,
    speed: pd.DataFrame,
    keys: dict,
    quality: pd.DataFrame | None = None,
) -> list[Row]:
    """Every target notebook 06 measures, from the run's tables (``keys``: (precision, kind) -> run name)."""
    rows = gemv_targets(gemv) + ffn_targets(ffn)
    for p in dict.fromkeys(p for p, _ in keys):
        for kind in ("exact", "topk", "oracle"):
            if (p, kind) in keys:
                r = limits.loc[keys[(p, kind)]]
                note = f"{keys[(p, kind)]}: x{r.speedup:.2f} over dense, byte limit x{r.byte_limit:.2f}"
                rows.append(("e2e_of_byte_limit", r.of_limit, note))
        if (p, "llama") in keys:
            rows += dense_over_llama_targets(p, speed, keys)
    if quality is not None and "ours_over_llama_cpp" in quality:
        for fmt, r in quality.drop(index="f32", errors="ignore").iterrows():
            note = f"{fmt}: ours {r.ppl_ours:.2f}, llama.cpp {r.ppl_llama_cpp:.2f}, {r.tokens} tokens"
            rows.append(("ppl_ours_over_llama_cpp", r.ours_over_llama_cpp, note))
    return rows


def target_lines(rows: list[Row]) -> list[str]:
    """One line per row: the target, the value and its verdict (``paper.targets.check``), then the note."""
    return [f"{check(key, value, '.3g')} ({note})" for key, value, note in rows]


def engine_lines(limits: pd.DataFrame, prof: pd.DataFrame, keys: dict, bandwidth_gbs: float) -> list[str]:
    """Per precision with exact masks: what the FFN kernels read inside the engine, dense and sparse, against the
    DRAM bandwidth, and the share of a sparse token that sparsity does not touch (attention and the lm_head)."""
    lines = []
    for p in dict.fromkeys(p for p, _ in keys):
        if (p, "exact") not in keys:
            continue
        d, e = limits.loc[keys[(p, "dense")]], limits.loc[keys[(p, "exact")]]
        fixed = prof.loc[keys[(p, "exact")], ["attention", "lm_head"]].sum() / prof.loc[keys[(p, "exact")], "total"]
        lines.append(
            f"[{p}] inside the engine the FFN kernels read {d.ffn_GBps:.1f} GB/s dense and {e.ffn_GBps:.1f} GB/s "
            f"sparse (DRAM: {bandwidth_gbs:.1f} GB/s); attention and lm_head, which sparsity does not touch, are "
            f"{fixed:.0%} of a sparse token"
        )
    return lines


def speed_verdicts(
    gemv: pd.DataFrame,
    ffn: pd.DataFrame,
    limits: pd.DataFrame,
    prof: pd.DataFrame,
    speed: pd.DataFrame,
    keys: dict,
    bandwidth_gbs: float,
    quality: pd.DataFrame | None = None,
) -> list[str]:
    """``speed_targets`` as lines, then ``engine_lines``; a precision without llama.cpp says so."""
    lines = target_lines(speed_targets(gemv, ffn, limits, speed, keys, quality))
    lines += engine_lines(limits, prof, keys, bandwidth_gbs)
    precisions = dict.fromkeys(p for p, _ in keys)
    return lines + [f"our dense {p} against llama.cpp: not measured" for p in precisions if (p, "llama") not in keys]


def interval_word(lo: float, hi: float) -> str:
    """What a speed ratio's 95% interval says: faster or slower only where it excludes parity."""
    if pd.isna(lo) or pd.isna(hi):
        return "one run, no interval"
    return "faster" if lo > 1 else "slower" if hi < 1 else "not told from parity"


def _ratio(speed: pd.DataFrame, run: str) -> str:
    r = speed.loc[run]
    if pd.isna(r.get("ratio_lo", float("nan"))):
        return f"x{r.ratio:.2f}"
    return f"x{r.ratio:.2f} [{r.ratio_lo:.2f}, {r.ratio_hi:.2f}], {interval_word(r.ratio_lo, r.ratio_hi)}"


def speed_answer(speed: pd.DataFrame, limits: pd.DataFrame, prof: pd.DataFrame, keys: dict, model: str) -> str:
    """Notebook 06's answer in prose (markdown), from the run's tables: our dense engine against llama.cpp per
    precision, the sparse model's exact masks (replayed, and gate-first in line) against its dense run, with the
    byte limit and the share of a sparse token that sparsity does not touch."""
    precisions = list(dict.fromkeys(p for p, _ in keys))
    llama = [f"{p.upper()} {_ratio(speed, keys[(p, 'swiglu')])}" for p in precisions if (p, "llama") in keys]
    text = [
        "**Dense, against llama.cpp** (SmolLM2 as shipped, tokens/s ratio with its 95% interval over paired rounds): "
        + ("; ".join(llama) if llama else "not measured here (llama-cpp-python not installed)")
        + "."
    ]
    sparse = []
    for p in precisions:
        if (p, "exact") not in keys:
            continue
        e = limits.loc[keys[(p, "exact")]]
        fixed = prof.loc[keys[(p, "exact")], ["attention", "lm_head"]].sum() / prof.loc[keys[(p, "exact")], "total"]
        line = (
            f"{p.upper()}: exact masks replayed {_ratio(speed, keys[(p, 'exact')])} at {e.ffn_active:.1%} of FFN "
            f"neurons active, {e.of_limit:.0%} of the byte limit x{e.byte_limit:.2f}"
        )
        if (p, "oracle") in keys:
            line += f"; gate-first in line (exact, no predictor) {_ratio(speed, keys[(p, 'oracle')])}"
        sparse.append(line + f"; attention and the lm_head are {fixed:.0%} of a sparse token")
    if sparse:
        text.append(f"**Sparse, against our dense run of the same model, {model}.** " + ". ".join(sparse) + ".")
    return "\n\n".join(text)

"""Notebook 06's verdicts: each measured number against its target in ``paper.targets``, one line each."""

from __future__ import annotations

import pandas as pd

from ..paper.targets import check


def _gemv_lines(gemv: pd.DataFrame) -> list[str]:
    f32 = gemv[gemv.fmt == "f32"]
    lines = [
        check("gemv_vs_blas", f32.ours_vs_best.max(), ".2f")
        + f" (worst shape {f32.loc[f32.ours_vs_best.idxmax(), 'shape']})"
    ]
    for fmt, g in gemv.groupby("fmt", sort=False):
        big = g[g.above_cache]
        if big.empty:
            lines.append(f"[{fmt}] GEMV bandwidth: no shape above the cache at this preset")
            continue
        worst = big.loc[big.bw_frac.idxmin()]
        lines.append(
            f"[{fmt}] " + check("gemv_of_bandwidth", worst.bw_frac, ".0%") + f" (worst shape {worst['shape']})"
        )
    return lines


def _ffn_lines(ffn: pd.DataFrame) -> list[str]:
    mis = ffn[(ffn.N == 14336) & (ffn.H == 4096) & (ffn.sparsity == 0.9)]
    if mis.empty:
        return [
            f"sparse FFN at 90% on Mistral-7B's shape: not measured at this preset (shapes {sorted(set(ffn['shape']))})"
        ]
    return [
        f"[{r.dtype}] " + check("ffn_sparse_speedup_90", r.speedup, ".2f") + f"; byte limit {r.byte_limit:.2f}x, "
        f"sparse reads at {r.sparse_bw_frac:.0%} of bandwidth, {r.layers_cycled} of {r.model_layers} layers cycled"
        for r in mis.itertuples()
    ]


def dense_over_llama_lines(p: str, speed: pd.DataFrame, keys: dict) -> list[str]:
    """Our dense engine on the model as shipped over llama.cpp, both at ``p``: the paired ratio and, where the rounds
    were timed against each other (``bench_decoding(against=...)``), its 95% interval's lower end as a target too."""
    ours, llama = speed.loc[keys[(p, "swiglu")]], speed.loc[keys[(p, "llama")]]
    paired = "ratio" in speed and pd.notna(ours.get("ratio"))
    ratio = ours.ratio if paired else ours.tokens_per_s / llama.tokens_per_s
    lines = [check(f"ours_over_llama_cpp_{p}", ratio, ".2f") + " (same model as shipped, same threads)"]
    if paired:
        lines.append(
            f"[{p}] "
            + check("ours_over_llama_cpp_interval_lo", ours.ratio_lo, ".2f")
            + f" (95% interval [{ours.ratio_lo:.2f}, {ours.ratio_hi:.2f}], {ours.repeats:.0f} paired rounds)"
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
    """Lines of 'what it says' for notebook 06, computed from the run's tables (``keys``: (precision, kind) -> run)."""
    lines = _gemv_lines(gemv) + _ffn_lines(ffn)
    precisions = list(dict.fromkeys(p for p, _ in keys))
    for p in precisions:
        for kind in ("exact", "topk", "oracle"):
            if (p, kind) not in keys:
                continue
            r = limits.loc[keys[(p, kind)]]
            lines.append(
                f"{keys[(p, kind)]}: {r.speedup:.2f}x over dense at FFN active {r.ffn_active:.3f}, byte limit "
                f"{r.byte_limit:.2f}x; " + check("e2e_of_byte_limit", r.of_limit, ".0%")
            )
        d, e = limits.loc[keys[(p, "dense")]], limits.loc[keys[(p, "exact")]]
        fixed = prof.loc[keys[(p, "exact")], ["attention", "lm_head"]].sum() / prof.loc[keys[(p, "exact")], "total"]
        lines.append(
            f"[{p}] inside the engine the FFN kernels read {d.ffn_GBps:.1f} GB/s dense and {e.ffn_GBps:.1f} GB/s "
            f"sparse (DRAM: {bandwidth_gbs:.1f} GB/s); attention and lm_head, which sparsity does not touch, are "
            f"{fixed:.0%} of a sparse token"
        )
        if (p, "llama") in keys:
            lines += dense_over_llama_lines(p, speed, keys)
        else:
            lines.append(
                f"our dense {p} against llama.cpp: not measured (llama-cpp-python not installed; smoke preset)"
            )
    if quality is not None and "ours_over_llama_cpp" in quality:
        for fmt, r in quality.drop(index="f32", errors="ignore").iterrows():
            lines.append(
                f"[{fmt}] "
                + check("ppl_ours_over_llama_cpp", r.ours_over_llama_cpp, ".3f")
                + f" (ours {r.ppl_ours:.2f}, llama.cpp {r.ppl_llama_cpp:.2f}, {r.tokens} tokens)"
            )
    return lines

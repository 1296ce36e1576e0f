"""Notebook 06's verdicts: each measured number against its target in ``paper.targets``, one line each."""

from __future__ import annotations

import pandas as pd

from ..paper.targets import check


def speed_verdicts(gemv: pd.DataFrame, ffn: pd.DataFrame, limits: pd.DataFrame, prof: pd.DataFrame,
                   speed: pd.DataFrame, keys: dict[str, str], bandwidth_gbs: float) -> list[str]:
    """Lines of 'what it says' for notebook 06, computed from the run's tables."""
    lines = [check("gemv_vs_blas", gemv.ours_vs_best.max(), ".2f") + f" (worst shape {gemv.loc[gemv.ours_vs_best.idxmax(), 'shape']})"]
    mis = ffn[(ffn.N == 14336) & (ffn.H == 4096) & (ffn.sparsity == 0.9)]
    if mis.empty:
        lines.append(f"sparse FFN at 90% on Mistral-7B's shape: not measured at this preset (shapes {sorted(set(ffn['shape']))})")
    for r in mis.itertuples():
        lines.append(f"[{r.dtype}] " + check("ffn_sparse_speedup_90", r.speedup, ".2f") + f"; byte limit {r.byte_limit:.2f}x")
    for k in ("exact", "int8_exact", "topk", "oracle", "int8_oracle"):
        r = limits.loc[keys[k]]
        lines.append(f"{keys[k]}: {r.speedup:.2f}x over dense at FFN active {r.ffn_active:.3f}, byte limit "
                     f"{r.byte_limit:.2f}x; " + check("e2e_of_byte_limit", r.of_limit, ".0%"))
    d, e = limits.loc[keys["dense"]], limits.loc[keys["exact"]]
    fixed = prof.loc[keys["exact"], ["attention", "lm_head"]].sum() / prof.loc[keys["exact"], "total"]
    lines.append(f"inside the engine the FFN kernels read {d.ffn_GBps:.1f} GB/s dense and {e.ffn_GBps:.1f} GB/s sparse "
                 f"(DRAM: {bandwidth_gbs:.1f} GB/s); attention and lm_head, which sparsity does not touch, are "
                 f"{fixed:.0%} of a sparse token")
    if "llama" in keys:
        ratio = speed.loc[keys["llama"], "tokens_per_s"] / speed.loc[keys["swiglu"], "tokens_per_s"]
        lines.append(check("llama_cpp_over_ours_fp32", ratio, ".2f") + " (same model as shipped, same threads)")
    else:
        lines.append("our dense fp32 against llama.cpp F32: not measured (llama-cpp-python not installed; smoke preset)")
    return lines

"""Comparisons that say what the evidence allows: intervals, seed spread, and a verdict computed by rule.

A difference between two variants counts only when it is larger than what chance gives: the paired
bootstrap interval over evaluation windows must exclude "no difference" at every seed, in the same
direction, and the mean difference must exceed the spread between seeds. Anything less is
reported as "not distinguishable" (at this scale, with these tokens and seeds).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .perplexity import PerplexityResult, paired_interval

NOT_DISTINGUISHABLE = "not distinguishable"


def perplexity_table(results: dict[tuple[str, int], PerplexityResult], samples: int = 1000) -> pd.DataFrame:
    """One row per (variant, seed): ppl with its bootstrap interval, nll, tokens and windows."""
    rows = []
    for (variant, seed), r in results.items():
        lo, hi = r.interval(samples)
        rows.append(
            {
                "variant": variant,
                "seed": seed,
                "ppl": r.ppl,
                "ppl_lo": lo,
                "ppl_hi": hi,
                "nll": r.nll,
                "tokens": r.n_tokens,
                "windows": r.n_windows,
            }
        )
    return pd.DataFrame(rows)


def compare_variants(
    results: dict[tuple[str, int], PerplexityResult], base: str, other: str, samples: int = 1000
) -> dict:
    """``other`` against ``base`` at every seed both have (same held-out windows), and the verdict.

    Returns per-seed ratios other/base with paired intervals, the mean ratio, the seed spread of each
    variant's perplexity (max - min over seeds, relative to its mean), and ``verdict``: "<other> better",
    "<other> worse" or "not distinguishable".
    """
    seeds = sorted({s for v, s in results if v == base} & {s for v, s in results if v == other})
    if not seeds:
        raise ValueError(f"no seed has both {base!r} and {other!r}")
    per_seed = pd.DataFrame(
        [{"seed": s, **paired_interval(results[(base, s)], results[(other, s)], samples)} for s in seeds]
    )
    ppl = {v: np.array([results[(v, s)].ppl for s in seeds]) for v in (base, other)}
    return {"base": base, "other": other, "per_seed": per_seed, **variant_verdict(per_seed, ppl, base, other)}


def variant_verdict(per_seed: pd.DataFrame, ppl: dict[str, np.ndarray], base: str, other: str) -> dict:
    """The rule of ``compare_variants`` on its numbers (also what the claims report re-applies to the saved
    CSVs): ``per_seed`` paired ratios other/base with ``ratio_lo``/``ratio_hi``; ``ppl``: variant -> the
    perplexity at each seed. "<other> better"/"worse" only when every seed's interval excludes 1 and the
    mean ratio differs from 1 by more than either variant's seed spread."""
    spread = {v: float((p.max() - p.min()) / p.mean()) if len(p) > 1 else 0.0 for v, p in ppl.items()}
    mean_ratio = float(np.mean(ppl[other]) / np.mean(ppl[base]))
    above, below = bool((per_seed.ratio_lo > 1).all()), bool((per_seed.ratio_hi < 1).all())
    beyond_seeds = abs(mean_ratio - 1) > max(spread.values())
    if below and beyond_seeds:
        verdict = f"{other} better"
    elif above and beyond_seeds:
        verdict = f"{other} worse"
    else:
        verdict = NOT_DISTINGUISHABLE
    return {"mean_ratio": mean_ratio, "seed_spread": spread, "verdict": verdict}


def describe(cmp: dict) -> str:
    """One line for a notebook: the ratio, its intervals, the seed spread, the verdict."""
    ps = cmp["per_seed"]
    seeds = "; ".join(f"seed {r.seed}: x{r.ratio:.3f} [{r.ratio_lo:.3f}, {r.ratio_hi:.3f}]" for r in ps.itertuples())
    spread = ", ".join(f"{v} {s:.1%}" for v, s in cmp["seed_spread"].items())
    return (
        f"{cmp['other']} / {cmp['base']} perplexity: mean x{cmp['mean_ratio']:.3f} ({seeds}); seed spread {spread} "
        f"-> {cmp['verdict']}"
    )


def topk_robustness(
    sweeps: pd.DataFrame, level: float, a: str = "swiglu", b: str = "drelu", robust: float = 1.05
) -> dict:
    """Which variant keeps its perplexity better at top-k ``level``, by rule.

    ``sweeps``: rows of ``eval.sweeps.topk_sweep`` with ``model`` and ``seed`` columns. Per model and seed,
    the degradation is the ratio ppl(level) / ppl(0) with its paired interval. ``b`` is more robust only if
    at every seed its interval lies wholly below ``a``'s; less robust if wholly above; otherwise the two are
    not distinguishable. When both stay within ``robust`` (the paper's dReLU: x1.03 at 90%) at every seed,
    the verdict is "both robust": a statistically clear but tiny gap is not a difference in robustness.
    """
    at = sweeps[sweeps.sparsity == level]
    seeds = sorted(set(at[at.model == a].seed) & set(at[at.model == b].seed))
    if not seeds:
        raise ValueError(f"no seed has both {a!r} and {b!r} at sparsity {level}")
    rows = []
    for s in seeds:
        ra = at[(at.model == a) & (at.seed == s)].iloc[0]
        rb = at[(at.model == b) & (at.seed == s)].iloc[0]
        rows.append(
            {
                "seed": s,
                f"{a}_ratio": ra.ratio,
                f"{a}_lo": ra.ratio_lo,
                f"{a}_hi": ra.ratio_hi,
                f"{b}_ratio": rb.ratio,
                f"{b}_lo": rb.ratio_lo,
                f"{b}_hi": rb.ratio_hi,
                "b_below": rb.ratio_hi < ra.ratio_lo,
                "b_above": rb.ratio_lo > ra.ratio_hi,
            }
        )
    df = pd.DataFrame(rows)
    if (df[f"{a}_hi"] <= robust).all() and (df[f"{b}_hi"] <= robust).all():
        verdict = f"both robust (within x{robust} at every seed)"
    elif df.b_below.all():
        verdict = f"{b} more robust"
    elif df.b_above.all():
        verdict = f"{a} more robust"
    else:
        verdict = NOT_DISTINGUISHABLE
    return {"level": level, "per_seed": df, "verdict": verdict}


def sparsity_table(
    models: dict,
    base: str,
    ids,
    context_length: int,
    tol_ids,
    samples: int = 1000,
    tol: float = 0.01,
    matched_to: str | None = None,
    cache: bool = False,
) -> tuple[pd.DataFrame, dict]:
    """The table 1 analogue: per model, held-out perplexity with its interval, the ratio to ``base`` on the same
    windows (paired interval), the exact-zero fraction of combined, and one sparsity for every variant: the
    largest top-k level within ``tol`` of the model's own unmasked perplexity (``eval.sweeps.topk_tolerance``
    on ``tol_ids``). With ``matched_to`` (a model's name), also ``topk_at_matched``: the largest top-k level at
    which each model is still as good as that model unmasked (perplexity on ``tol_ids`` within ``tol`` of its), NaN
    for a model that is worse even unmasked: sparsity at equal quality, so that a broken model cannot win by being
    broken. Returns the table and the ``PerplexityResult`` of each model. With ``cache``, each model's numbers are
    remembered (``eval.cache``): a rerun evaluates only the models it has not seen."""
    from ..sparsity.instruments import record_activations
    from . import cache as eval_cache
    from .perplexity import perplexity
    from .sweeps import topk_tolerance

    def measure(m) -> dict:
        with record_activations(m, kinds=("combined",)) as rec:
            r = perplexity(m, ids, context_length=context_length)
        tolerance = topk_tolerance(m, tol_ids, tol=tol, context_length=context_length)
        return {
            "result": eval_cache.result_to_json(r),
            "zero_frac": float(rec.overall().zero_frac.iloc[0]),
            "tolerance": {k: tolerance[k] for k in ("sparsity", "resolution", "unmasked_ppl")},
        }

    settings = {"ids": ids, "context_length": context_length, "tol_ids": tol_ids, "tol": tol}
    prints = {name: eval_cache.model_fingerprint(m) if cache else None for name, m in models.items()}  # None: no cache
    results, rows = {}, []
    for name, m in models.items():
        got = eval_cache.remember("sparsity_row", prints[name], settings, lambda m=m: measure(m))
        results[name] = eval_cache.result_from_json(got["result"])
        lo, hi = results[name].interval(samples)
        tolerance = got["tolerance"]
        rows.append(
            {
                "model": name,
                "ppl": results[name].ppl,
                "ppl_lo": lo,
                "ppl_hi": hi,
                "zero_frac": got["zero_frac"],
                f"topk_within_{tol:.0%}": tolerance["sparsity"],
                "tolerance_resolution": tolerance["resolution"],
                "tol_ppl": tolerance["unmasked_ppl"],
            }
        )
    df = pd.DataFrame(rows).set_index("model")
    if matched_to is not None:
        if matched_to not in models:
            raise ValueError(f"matched_to={matched_to!r} is not one of the models: {', '.join(models)}")
        limit = float(df.loc[matched_to, "tol_ppl"]) * (1 + tol)  # as good as that model, within the same tolerance
        df["matched_ppl"] = limit

        def at_matched(m) -> float:
            return topk_tolerance(m, tol_ids, context_length=context_length, limit_ppl=limit)["sparsity"]

        df["topk_at_matched"] = [
            eval_cache.remember("topk_at_matched", prints[n], {**settings, "limit": limit}, lambda m=m: at_matched(m))
            for n, m in models.items()
        ]
    for name in models:
        c = paired_interval(results[base], results[name], samples)
        df.loc[name, ["ratio", "ratio_lo", "ratio_hi"]] = c["ratio"], c["ratio_lo"], c["ratio_hi"]
    return df, results


def distribution_similarity(candidate, reference, reference_parts: list) -> dict:
    """Is ``candidate`` (a ``sparsity.instruments.Histogram``, e.g. the activations pooled over every expert) as close
    to ``reference`` (the dense model's, pooled over layers) as the reference's own parts (its layers) are to it?

    ``tv``: total-variation distance from candidate to reference; ``spread``: the largest distance from one part to
    the reference. The verdict is "similar" when ``tv <= spread`` (the candidate differs from the dense model no
    more than the dense model's own layers differ from their pool), "different" otherwise.
    """
    tv = candidate.total_variation(reference)
    spread = max(part.total_variation(reference) for part in reference_parts)
    return {"tv": tv, "spread": spread, "verdict": "similar" if tv <= spread else "different"}

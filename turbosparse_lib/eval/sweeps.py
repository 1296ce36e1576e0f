"""Sweeps over a model's sparsity: perplexity under top-k masking (paper table 3), with intervals."""

from __future__ import annotations

import pandas as pd
from torch import nn

from ..sparsity.masks import topk_mask
from .perplexity import PerplexityResult, paired_interval, perplexity


def topk_sweep(
    model: nn.Module,
    token_ids,
    sparsities,
    context_length: int = 512,
    batch_size: int = 4,
    bootstrap_samples: int = 1000,
    return_results: bool = False,
    cache: bool = False,
):
    """Perplexity under top-k masking (paper table 3) at each target sparsity.

    Columns: sparsity (the target), realized_sparsity (zeros after masking, the model's own zeros
    included), ppl with its bootstrap interval (ppl_lo, ppl_hi), nll, n_tokens, and against the
    first level (normally 0, the unmasked model) on the same windows: ``ratio`` with its paired
    interval (ratio_lo, ratio_hi) and ``distinguishable`` (the interval excludes 1).
    With ``return_results`` also the ``PerplexityResult`` of each level. With ``cache`` each level's perplexity is
    remembered for this model (``eval.cache``).
    """
    from . import cache as eval_cache

    def level(s: float) -> dict:
        with topk_mask(model, sparsity=s) as m:
            r = perplexity(model, token_ids, context_length=context_length, batch_size=batch_size)
        return {"result": eval_cache.result_to_json(r), "realized": m.realized_sparsity}

    fingerprint = eval_cache.model_fingerprint(model) if cache else None
    settings = {"ids": token_ids, "context_length": context_length, "batch_size": batch_size}
    rows, results = [], {}
    for s in sparsities:
        s = float(s)
        got = eval_cache.remember("topk_level", fingerprint, {**settings, "sparsity": s}, lambda s=s: level(s))
        r = results[s] = eval_cache.result_from_json(got["result"])
        lo, hi = r.interval(bootstrap_samples)
        rows.append(
            dict(
                sparsity=float(s),
                realized_sparsity=got["realized"],
                ppl=r.ppl,
                ppl_lo=lo,
                ppl_hi=hi,
                nll=r.nll,
                n_tokens=r.n_tokens,
            )
        )
    df = pd.DataFrame(rows)
    base: PerplexityResult = results[float(sparsities[0])]
    cmp = pd.DataFrame([paired_interval(base, results[float(s)], bootstrap_samples) for s in sparsities])
    df = pd.concat([df, cmp], axis=1)
    return (df, results) if return_results else df


def topk_tolerance(
    model: nn.Module,
    token_ids,
    tol: float = 0.01,
    context_length: int = 512,
    batch_size: int = 4,
    hi: float = 0.99,
    iters: int = 6,
    limit_ppl: float | None = None,
) -> dict:
    """The largest top-k sparsity whose perplexity stays within ``(1 + tol)`` of the unmasked model's, or, with
    ``limit_ppl``, at or below that perplexity (sparsity at a quality fixed for every model; NaN for a model
    whose unmasked perplexity is already above it: it never reaches that quality).

    One definition of sparsity for every variant, SwiGLU included (it has no exact zeros): bisection on
    [0, ``hi``] over top-k levels (perplexity rises with the level), ``iters`` halvings, so the answer is a
    lower bound within ``hi / 2**iters``. For a ReLU-family model every level below its own zero fraction
    masks nothing but zeros, so the answer is at least that fraction. Returns the sparsity, the unmasked
    perplexity and every level evaluated.
    """

    def ppl_at(s: float) -> float:
        with topk_mask(model, sparsity=s):
            return perplexity(model, token_ids, context_length=context_length, batch_size=batch_size).ppl

    base = perplexity(model, token_ids, context_length=context_length, batch_size=batch_size).ppl
    limit = base * (1 + tol) if limit_ppl is None else limit_ppl
    tried = [(0.0, base)]
    if base > limit:
        return {
            "sparsity": float("nan"),
            "unmasked_ppl": base,
            "tol": tol,
            "limit_ppl": limit,
            "evaluated": tried,
            "resolution": hi / 2**iters,
        }
    good, bad = 0.0, hi
    p_hi = ppl_at(hi)
    tried.append((hi, p_hi))
    if p_hi <= limit:
        good = hi
    else:
        for _ in range(iters):
            mid = round((good + bad) / 2, 6)
            p = ppl_at(mid)
            tried.append((mid, p))
            good, bad = (mid, bad) if p <= limit else (good, mid)
    return {
        "sparsity": good,
        "unmasked_ppl": base,
        "tol": tol,
        "limit_ppl": limit,
        "evaluated": sorted(tried),
        "resolution": hi / 2**iters,
    }

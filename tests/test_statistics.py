"""The statistics behind every verdict, on inputs whose answers are known: bootstrap and paired intervals,
the variant rule and the top-k robustness rule."""

import math

import numpy as np
import pandas as pd
import pytest

from turbosparse_lib.eval.compare import NOT_DISTINGUISHABLE, topk_robustness, variant_verdict
from turbosparse_lib.eval.perplexity import PerplexityResult, bootstrap_interval, paired_interval


def _result(window_nll_per_token, tokens_per_window=64):
    nll_W = np.asarray(window_nll_per_token, np.float64) * tokens_per_window
    tok_W = np.full(len(nll_W), tokens_per_window, np.int64)
    nll = float(nll_W.sum() / tok_W.sum())
    return PerplexityResult(
        math.exp(nll), nll, int(tok_W.sum()), len(nll_W), tokens_per_window, tokens_per_window, nll_W, tok_W
    )


RNG = np.random.default_rng(0)
NOISY = 3.0 + 0.3 * RNG.standard_normal(200)  # per-window mean NLL, varying as real text does


def test_bootstrap_interval_brackets_the_point_and_is_the_point_without_spread():
    r = _result(NOISY)
    lo, hi = bootstrap_interval(r, samples=2000)
    assert lo < r.ppl < hi
    # about 1.96 standard errors of the mean NLL either side, in perplexity
    se = NOISY.std(ddof=1) / math.sqrt(len(NOISY))
    assert math.log(hi) - math.log(lo) == pytest.approx(2 * 1.96 * se, rel=0.15)
    flat = _result(np.full(50, 2.0))
    assert bootstrap_interval(flat) == pytest.approx((math.exp(2.0), math.exp(2.0)))


def test_paired_interval_of_a_result_with_itself_is_exactly_one():
    r = _result(NOISY)
    p = paired_interval(r, r)
    assert (p["ratio"], p["ratio_lo"], p["ratio_hi"]) == (1.0, 1.0, 1.0) and not p["distinguishable"]


def test_paired_interval_sees_a_known_shift_and_not_noise_alone():
    a = _result(NOISY)
    shifted = _result(NOISY + 0.02)  # 2% worse on every window: the pairing removes the window-to-window spread
    p = paired_interval(a, shifted)
    assert p["ratio"] == pytest.approx(math.exp(0.02))
    assert p["distinguishable"] and p["ratio_lo"] > 1
    assert p["ratio_lo"] == pytest.approx(math.exp(0.02)) and p["ratio_hi"] == pytest.approx(math.exp(0.02))
    noise = _result(NOISY + 0.3 * np.random.default_rng(1).standard_normal(200))  # no shift, only noise
    q = paired_interval(a, noise)
    assert q["ratio_lo"] < q["ratio"] < q["ratio_hi"]
    with pytest.raises(ValueError, match="same windows"):
        paired_interval(a, _result(NOISY[:100]))


def _per_seed(ratios, half_width):
    return pd.DataFrame(
        {
            "seed": range(len(ratios)),
            "ratio": ratios,
            "ratio_lo": np.subtract(ratios, half_width),
            "ratio_hi": np.add(ratios, half_width),
        }
    )


def test_variant_verdict_identical_shifted_and_within_seed_spread():
    same = variant_verdict(
        _per_seed([1.0, 1.0], 0.01), {"a": np.array([20.0, 20.0]), "b": np.array([20.0, 20.0])}, "a", "b"
    )
    assert same["mean_ratio"] == 1.0 and same["verdict"] == NOT_DISTINGUISHABLE
    worse = variant_verdict(
        _per_seed([1.10, 1.12], 0.02), {"a": np.array([20.0, 20.2]), "b": np.array([22.0, 22.6])}, "a", "b"
    )
    assert worse["verdict"] == "b worse"
    better = variant_verdict(
        _per_seed([0.90, 0.91], 0.02), {"a": np.array([20.0, 20.2]), "b": np.array([18.0, 18.4])}, "a", "b"
    )
    assert better["verdict"] == "b better"
    # every interval excludes 1, but the gap is smaller than the seeds' own spread: not a difference
    spread = variant_verdict(
        _per_seed([1.03, 1.03], 0.01), {"a": np.array([18.0, 22.0]), "b": np.array([18.5, 22.7])}, "a", "b"
    )
    assert spread["verdict"] == NOT_DISTINGUISHABLE


def _sweeps(rows):
    return pd.DataFrame(
        [
            {"model": m, "seed": s, "sparsity": 0.9, "ratio": r, "ratio_lo": r - w, "ratio_hi": r + w}
            for m, s, r, w in rows
        ]
    )


def test_topk_robustness_rules():
    both = topk_robustness(_sweeps([("swiglu", 0, 1.02, 0.01), ("drelu", 0, 1.01, 0.01)]), 0.9)
    assert both["verdict"].startswith("both robust")
    b_better = topk_robustness(_sweeps([("swiglu", 0, 1.6, 0.05), ("drelu", 0, 1.05, 0.02)]), 0.9)
    assert b_better["verdict"] == "drelu more robust"
    a_better = topk_robustness(_sweeps([("swiglu", 0, 1.1, 0.02), ("drelu", 0, 1.5, 0.05)]), 0.9)
    assert a_better["verdict"] == "swiglu more robust"
    mixed = topk_robustness(
        _sweeps([("swiglu", 0, 1.6, 0.05), ("drelu", 0, 1.1, 0.02), ("swiglu", 1, 1.1, 0.02), ("drelu", 1, 1.6, 0.05)]),
        0.9,
    )
    assert mixed["verdict"] == NOT_DISTINGUISHABLE
    overlapping = topk_robustness(_sweeps([("swiglu", 0, 1.3, 0.1), ("drelu", 0, 1.25, 0.1)]), 0.9)
    assert overlapping["verdict"] == NOT_DISTINGUISHABLE
    with pytest.raises(ValueError, match="no seed"):
        topk_robustness(_sweeps([("swiglu", 0, 1.1, 0.01)]), 0.9)

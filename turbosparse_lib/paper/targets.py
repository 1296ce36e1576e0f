"""This companion's pass/fail targets: what each notebook checks its measurements against.

A target is a threshold on one measured number, with where it comes from (an issue of this
project, or the paper's own claim). Notebooks call ``check(key, value)`` and print its verdict;
no threshold is typed into a notebook cell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Target:
    key: str
    threshold: float
    direction: Literal[">=", "<="]
    what: str
    source: str  # why this number

    def met(self, value: float) -> bool:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        return value >= self.threshold if self.direction == ">=" else value <= self.threshold


_T = [
    # section 7: kernels and decoding (notebook 06)
    Target(
        "gemv_vs_blas",
        1.25,
        "<=",
        "our dense f32 GEMV time over the faster BLAS (NumPy, torch), worst shape",
        "speed issue: a sparse kernel is only as good as the dense baseline it is compared with",
    ),
    Target(
        "gemv_of_bandwidth",
        0.85,
        ">=",
        "read bandwidth of our GEMV over the measured DRAM bandwidth, on a shape larger than the cache",
        "issue #11: every GEMV kernel at the byte limit",
    ),
    Target(
        "ffn_sparse_speedup_90",
        8.0,
        ">=",
        "sparse FFN over our dense FFN at 90% sparsity, Mistral-7B shape, layers cycled",
        "issue #11 (was 6x; ideal 10x)",
    ),
    Target(
        "e2e_of_byte_limit",
        0.90,
        ">=",
        "end-to-end sparse speed-up as a fraction of its byte limit",
        "speed issue: a bandwidth-bound decoder should reach its byte limit",
    ),
    Target(
        "ours_over_llama_cpp_f32",
        1.0,
        ">=",
        "our dense f32 engine's tokens/s over llama.cpp's at F32",
        "issue #11: at least llama.cpp's speed at the same precision",
    ),
    Target(
        "ours_over_llama_cpp_q8_0",
        1.0,
        ">=",
        "our dense Q8_0 engine's tokens/s over llama.cpp's at Q8_0",
        "issue #11: at least llama.cpp's speed at the same precision",
    ),
    Target(
        "ours_over_llama_cpp_q4_0",
        1.0,
        ">=",
        "our dense Q4_0 engine's tokens/s over llama.cpp's at Q4_0",
        "issue #11: at least llama.cpp's speed at the same precision",
    ),
    Target(
        "ours_over_llama_cpp_interval_lo",
        0.95,
        ">=",
        "the lower end of the 95% interval of that ratio (paired rounds)",
        "issue #19: a ratio near 1 must be told from parity; the interval excludes values below 0.95",
    ),
    Target(
        "ppl_ours_over_llama_cpp",
        1.02,
        "<=",
        "held-out perplexity of our quantised engine over llama.cpp's at the same format (paired)",
        "issue #11: same precision means same quality",
    ),
    # section 5: ReLUfication (notebook 05)
    Target(
        "relufied_ppl_ratio",
        1.5,
        "<=",
        "held-out perplexity of the ReLUfied dReLU model over the original's",
        "ReLUfication issue: recovered within 1.5x of the original",
    ),
    Target(
        "relufied_zero_fraction",
        0.85,
        ">=",
        "fraction of the ReLUfied dReLU model's combined activations exactly zero",
        "ReLUfication issue (paper, section 6.2: about 90% for TurboSparse-Mistral-7B)",
    ),
    Target(
        "relufication_notebook_minutes",
        150.0,
        "<=",
        "minutes of notebook 05 at the cpu preset on 2 cores, every run's training included",
        "ReLUfication issue",
    ),
    Target(
        "relufication_tokens_per_s",
        80.0,
        ">=",
        "tokens per second of the ReLUfication loop on 2 cores, evaluations and checkpoints included",
        "ReLUfication issue (a plain distillation loop reaches about 100)",
    ),
    Target(
        "relufied_zeroshot_gap",
        0.05,
        "<=",
        "zero-shot continuation accuracy of the original minus the ReLUfied dReLU model's",
        "ReLUfication issue",
    ),
    # section 7: activation predictors (notebook 07)
    Target(
        "predictor_recall",
        0.95,
        ">=",
        "mean recall of the predictors (live neurons kept), held-out tokens",
        "predictor issue, at a predicted sparsity within 5 points of the true sparsity",
    ),
    Target(
        "predicted_mask_ppl_ratio",
        1.02,
        "<=",
        "held-out perplexity with predicted masks over exact masks",
        "predictor issue",
    ),
    Target(
        "predicted_sparsity_at_budget",
        0.70,
        ">=",
        "predicted sparsity at the operating point (perplexity within 2% of the exact masks on calibration tokens)",
        "predictor issue",
    ),
    Target("predictor_bytes_share", 0.10, "<=", "the predictors' weights as a share of the model's", "predictor issue"),
    Target(
        "predicted_speedup_vs_llama_cpp",
        1.3,
        ">=",
        "sparse decoding with predicted masks over llama.cpp, same precision",
        "predictor issue: at f32 and at q8_0, predictor cost included (paper, table 7: 2.08-2.81x on CPU)",
    ),
    # section 3: top-k (notebook 03): the paper's own reading of table 3
    Target(
        "topk_robust_ratio_90",
        1.05,
        "<=",
        "perplexity at 90% top-k over the unmasked model's, for a 'robust' model",
        "paper table 3: dReLU x1.03 at 90%, SwiGLU x3.95",
    ),
]
TARGETS: dict[str, Target] = {t.key: t for t in _T}


def get_target(key: str) -> Target:
    try:
        return TARGETS[key]
    except KeyError:
        raise KeyError(f"no target {key!r}; targets: {', '.join(TARGETS)}") from None


def check(key: str, value: float, fmt: str = ".3g") -> str:
    """One line: the target, the measured value and the verdict ("met" / "MISSED")."""
    t = get_target(key)
    verdict = "met" if t.met(value) else "MISSED"
    return f"{t.what}: {value:{fmt}} (our target {t.direction} {t.threshold:g}) -> {verdict}"

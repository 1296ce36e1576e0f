"""``validate_kernels()``: every kernel against its NumPy reference, in every format and on edge cases (no active
neuron, all active, sizes that are not a multiple of the 32-weight block or of the vector width). It also
JIT-compiles them (``cache=True`` keeps the machine code on disk), so the first call is never timed.
"""

from __future__ import annotations

import numpy as np

from ..models.variants import VARIANTS
from . import bundles, quant
from .kernels import assert_close


def validate_kernels(
    seed: int = 0, shapes=((1, 1), (7, 33), (257, 96), (64, 1000)), formats=("f32", "q8_0", "q4_0")
) -> dict[str, float]:
    """Run every kernel against its NumPy reference on random (N neurons / rows, H hidden / columns) shapes.

    For each format: the dense GEMV, the gather GEMV and the row axpy; the FFN dense, sparse over
    several index sets (none, one, half sorted, unsorted, all) and as the in-line oracle, and the
    combined values, for every registered variant. Compiles every kernel for float32/int64 inputs
    first, so call it before timing anything. Raises AssertionError on a mismatch; returns the
    worst relative error of each kernel.
    """
    rng = np.random.default_rng(seed)
    worst: dict[str, float] = {}

    def check(name, got, want, rtol=2e-4):
        worst[name] = max(worst.get(name, 0.0), assert_close(name, got, want, rtol))

    for N, H in shapes:
        # 1/sqrt(fan-in) weights keep activations O(1), as in a trained model
        Wg, Wu = (rng.standard_normal((N, H), dtype=np.float32) / np.float32(np.sqrt(H)) for _ in range(2))
        Wd = rng.standard_normal((H, N), dtype=np.float32) / np.float32(np.sqrt(N))
        x = rng.standard_normal(H, dtype=np.float32)
        idx_sets = {
            "none": np.empty(0, np.int64),
            "one": np.array([N - 1], np.int64),
            "half_sorted": np.sort(rng.permutation(N)[: max(1, N // 2)]).astype(np.int64),
            "unsorted": rng.permutation(N).astype(np.int64)[: max(1, (2 * N) // 3)],
            "all": np.arange(N, dtype=np.int64),
        }
        for fmt in formats:
            Wq, ffn = quant.quantize(Wg, fmt), bundles.FFNBundles.from_weights(Wg, Wu, Wd, fmt)
            check(f"gemv[{fmt}]", quant.gemv(Wq, x), quant.gemv_ref(Wq, x))
            for idx in idx_sets.values():
                coef = rng.standard_normal(len(idx), dtype=np.float32)
                check(f"gather_gemv[{fmt}]", quant.gather_gemv(Wq, x, idx), quant.gather_gemv_ref(Wq, x, idx))
                check(f"axpy_rows[{fmt}]", quant.axpy_rows(Wq, coef, idx), quant.axpy_rows_ref(Wq, coef, idx))
            for variant in VARIANTS:  # every registered variant, with its default arguments
                check(f"combined[{fmt}]", bundles.combined(ffn, x, variant), bundles.combined_ref(ffn, x, variant))
                dense = bundles.ffn_ref(ffn, x, None, variant)
                check(f"ffn_dense[{fmt}]", bundles.ffn(ffn, x, None, variant), dense)
                check(f"ffn_exact_in_line[{fmt}]", bundles.ffn(ffn, x, None, variant, skip_zeros=True), dense)
                for idx in idx_sets.values():
                    check(
                        f"ffn_sparse[{fmt}]", bundles.ffn(ffn, x, idx, variant), bundles.ffn_ref(ffn, x, idx, variant)
                    )
    return worst

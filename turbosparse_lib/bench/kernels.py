"""Kernel benchmarks: our dense GEMV against BLAS, and one FFN layer sparse against dense.

FFN masks come from real activation statistics (``sparsity.frequencies.sample_masks``), not
uniform draws, and the inputs make every masked neuron fire, as an exact predictor would give:
otherwise the kernel would skip the mask's false positives and read fewer rows than the stated
sparsity.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd
import torch

from ..inference import kernels
from ..inference.threads import numpy_blas_threads
from ..presets import BenchSection
from ..sparsity.frequencies import sample_masks
from ..sparsity.masks import kept_count
from .timing import median, speedup, time_round_robin, warm_up


def blas_info() -> dict:
    """Which BLAS NumPy and torch use, and their thread counts (NumPy's from its OpenBLAS when it can
    be asked, else the OPENBLAS_NUM_THREADS / OMP_NUM_THREADS it follows)."""
    try:
        numpy_blas = np.__config__.CONFIG["Build Dependencies"]["blas"]["name"]
    except (AttributeError, KeyError, TypeError):
        numpy_blas = "unknown"
    env = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or "default (all cores)"
    return {
        "numpy_blas": numpy_blas,
        "numpy_blas_threads": numpy_blas_threads() or env,
        "torch_mkl": torch.backends.mkl.is_available(),
        "torch_threads": torch.get_num_threads(),
    }


def bench_gemv(sizes: BenchSection, seed: int = 0) -> pd.DataFrame:
    """Dense float32 GEMV, cold cache: ``kernels.gemv`` vs ``W @ x`` (NumPy) vs ``torch.mv``.

    One row per shape: medians in ms, GB/s of our kernel, and ``ours_vs_best`` = our median time
    over the faster baseline's (the target is <= 1.25).
    """
    warm_up()
    rng = np.random.default_rng(seed)
    rows = []
    for name, out, inp in sizes.gemv_shapes:
        W = rng.standard_normal((out, inp), dtype=np.float32)
        x = rng.standard_normal(inp, dtype=np.float32)
        W_t, x_t = torch.from_numpy(W), torch.from_numpy(x)
        np.testing.assert_allclose(kernels.gemv(W, x), W @ x, rtol=1e-3, atol=1e-3 * np.abs(W @ x).max())
        t = time_round_robin(
            {"ours": lambda r: kernels.gemv(W, x), "numpy": lambda r: W @ x, "torch": lambda r: torch.mv(W_t, x_t)},
            sizes.repeats,
        )
        ms = {k: 1e3 * median(v) for k, v in t.items()}
        best = min(ms["numpy"], ms["torch"])
        rows.append({
            "shape": name, "out": out, "in": inp, "MB": W.nbytes / 2**20,
            "ours_ms": ms["ours"], "numpy_ms": ms["numpy"], "torch_ms": ms["torch"],
            "ours_GBps": W.nbytes / ms["ours"] / 1e6, "ours_vs_best": ms["ours"] / best,
        })  # fmt: skip
    return pd.DataFrame(rows)


def ffn_bytes(H: int, N: int, k: int | None, dtype: str) -> int:
    """Bytes one FFN call reads: weights, int8 row scales, mask indices (``k=None``: dense).

    Dense reads all 3 N H weights (int8: scales of the N gate, N up and H down rows). Sparse reads
    the gate, up and down-transposed rows of the ``k`` active neurons, their scales, and ``k``
    int64 indices.
    """
    per_weight = {"float32": 4, "int8": 1}.get(dtype)
    if per_weight is None:
        raise ValueError(f"unknown dtype {dtype!r}; valid: 'float32', 'int8'")
    scale = 4 if dtype == "int8" else 0
    if k is None:
        return 3 * N * H * per_weight + (2 * N + H) * scale
    return 3 * k * H * per_weight + 3 * k * scale + 8 * k


def bench_ffn(sizes: BenchSection, freq: np.ndarray, bandwidth_gbs: float, seed: int = 0) -> pd.DataFrame:
    """Sparse vs dense dReLU FFN at every shape, dtype and sparsity of ``sizes``, cold cache.

    For each (shape, dtype) one round-robin loop times our dense FFN, NumPy's dense FFN (float32),
    and the sparse FFN at every sparsity with masks from ``sample_masks(freq, ...)`` (a new mask
    each repeat). Gate and up weights and the inputs are positive, so every masked neuron fires.

    One row per (shape, dtype, sparsity): medians (ms), ``speedup`` (dense / sparse), ``ideal``
    1/(1-s), ``byte_limit`` (dense bytes / sparse bytes), achieved GB/s and their fraction of
    ``bandwidth_gbs``, and ``numpy_dense_ms`` (float32 only).
    """
    warm_up()
    rng = np.random.default_rng(seed)
    rows = []
    n_x = 4  # a few inputs, cycled, so no call sees exactly the previous one's vector
    for name, H, N in sizes.ffn_shapes:
        Wg = np.abs(rng.standard_normal((N, H), dtype=np.float32)) / np.float32(np.sqrt(H))
        Wu = np.abs(rng.standard_normal((N, H), dtype=np.float32)) / np.float32(np.sqrt(H))
        Wd = rng.standard_normal((H, N), dtype=np.float32) / np.float32(np.sqrt(N))
        WdT = np.ascontiguousarray(Wd.T)
        xs = [np.abs(rng.standard_normal(H, dtype=np.float32)) + np.float32(0.1) for _ in range(n_x)]
        masks = {s: sample_masks(freq, N, s, sizes.repeats, seed) for s in sizes.ffn_sparsities}
        for dtype in sizes.ffn_dtypes:
            if dtype == "float32":
                fns = {
                    "dense": lambda r: kernels.ffn_dense(xs[r % n_x], Wg, Wu, Wd, "drelu"),
                    "numpy_dense": lambda r: kernels.ffn_dense_ref(xs[r % n_x], Wg, Wu, Wd, "drelu"),
                }
                sparse = lambda idx, x: kernels.ffn_sparse(x, Wg, Wu, WdT, idx, "drelu")  # noqa: E731
                ref = lambda idx, x: kernels.ffn_sparse_ref(x, Wg, Wu, WdT, idx, "drelu")  # noqa: E731
            elif dtype == "int8":
                gq, uq, dq, dTq = (kernels.quantize_int8_rows(W) for W in (Wg, Wu, Wd, WdT))
                fns = {"dense": lambda r: kernels.ffn_dense_int8(xs[r % n_x], gq, uq, dq, "drelu")}
                sparse = lambda idx, x: kernels.ffn_sparse_int8(x, gq, uq, dTq, idx, "drelu")  # noqa: E731

                def ref(idx, x):  # dequantised copies only for the one validation call, then freed
                    deq = [kernels.dequantize_int8_rows(*q) for q in (gq, uq, dTq)]
                    return kernels.ffn_sparse_ref(x, *deq, idx, "drelu")
            else:
                raise ValueError(f"unknown FFN dtype {dtype!r}; valid: 'float32', 'int8'")
            # validate the sparse path on one mask before anything is timed
            got, want = sparse(masks[sizes.ffn_sparsities[0]][0], xs[0]), ref(masks[sizes.ffn_sparsities[0]][0], xs[0])
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-3 * (np.abs(want).max() + 1e-6))
            for s in sizes.ffn_sparsities:
                fns[f"sparse@{s}"] = lambda r, s=s: sparse(masks[s][r], xs[r % n_x])
            t = time_round_robin(fns, sizes.repeats)
            dense_ms, dense_b = 1e3 * median(t["dense"]), ffn_bytes(H, N, None, dtype)
            for s in sizes.ffn_sparsities:
                k = kept_count(s, N)
                sparse_ms, sparse_b = 1e3 * median(t[f"sparse@{s}"]), ffn_bytes(H, N, k, dtype)
                rows.append({
                    "shape": name, "H": H, "N": N, "dtype": dtype, "sparsity": s, "active": k,
                    "dense_ms": dense_ms, "sparse_ms": sparse_ms,
                    "speedup": speedup(t["dense"], t[f"sparse@{s}"]),
                    "ideal": 1 / (1 - s), "byte_limit": dense_b / sparse_b,
                    "dense_GBps": dense_b / dense_ms / 1e6, "sparse_GBps": sparse_b / sparse_ms / 1e6,
                    "dense_bw_frac": dense_b / dense_ms / 1e6 / bandwidth_gbs,
                    "sparse_bw_frac": sparse_b / sparse_ms / 1e6 / bandwidth_gbs,
                    "numpy_dense_ms": 1e3 * median(t["numpy_dense"]) if "numpy_dense" in t else math.nan,
                })  # fmt: skip
            del fns
        del Wg, Wu, Wd, WdT
    return pd.DataFrame(rows)

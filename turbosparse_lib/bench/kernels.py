"""Kernel benchmarks: our GEMV in every format against BLAS and the bandwidth, and the FFN sparse against dense.

FFN masks come from real activation statistics (``sparsity.frequencies.sample_masks``), not
uniform draws, and the inputs make every masked neuron fire, as an exact predictor would give:
otherwise the kernel would skip the mask's false positives and read fewer rows than the stated
sparsity.

The FFN benchmark cycles through as many distinct layers as the model has (up to a memory
budget), one call per layer in turn as decoding does: a layer's hot neurons then cannot stay in
the last-level cache from one call to the next, which a benchmark calling one layer again and
again would let them do (a hot 90%-sparse working set of a mid-sized layer fits in 32 MB).
"""

from __future__ import annotations

import os

import numba
import numpy as np
import pandas as pd
import torch

from ..inference import bundles, quant
from ..inference.kernels import variant_code
from ..inference.threads import numpy_blas_threads
from ..presets import BenchSection
from ..sparsity.frequencies import sample_masks
from ..sparsity.masks import kept_count
from .timing import llc_bytes, median, speedup, stream_sum, time_round_robin, warm_up


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


PROBE = "streaming read"  # the bandwidth probe timed in the GEMV rounds


def bench_gemv(sizes: BenchSection, seed: int = 0) -> pd.DataFrame:
    """Dense GEMV, cold cache, in every format of ``sizes.ffn_dtypes``: ``quant.gemv`` (f32, Q8_0, Q4_0; the Q
    formats interleaved, as the engine's dense matrices are) beside ``W @ x`` (NumPy) and ``torch.mv`` on the float32
    matrix.

    One row per (shape, format): median ms of a round-robin loop over our formats and a streaming read of
    ``sizes.bandwidth_mb`` (``bandwidth.measure_bandwidth``'s), GB/s of the bytes our kernel reads and ``bw_frac``,
    their fraction of the streaming read's GB/s *in the same round* (median over rounds: the shared machine's
    bandwidth drifts within a run, and one measurement at its start made the fractions of one run range from 52% to
    133%), ``probe_GBps`` the streaming read's median, ``above_cache`` (the matrix is larger than the last-level
    cache, so the bandwidth fraction is meaningful), and for f32 ``ours_vs_best`` = our median time over the faster
    baseline's (the target is <= 1.25), from a second round-robin loop of our f32 kernel, NumPy and torch, each timed
    call after an untimed one of its own.
    """
    warm_up()
    rng = np.random.default_rng(seed)
    probe = np.ones(max(1, int(sizes.bandwidth_mb * 2**20) // 4), dtype=np.float32)
    n_chunks = 4 * numba.get_num_threads()
    rows = []
    for name, out, inp in sizes.gemv_shapes:
        W = rng.standard_normal((out, inp), dtype=np.float32)
        x = rng.standard_normal(inp, dtype=np.float32)
        W_t, x_t = torch.from_numpy(W), torch.from_numpy(x)
        mats = {fmt: quant.quantize(W, fmt).interleaved() for fmt in sizes.ffn_dtypes}
        for Wq in mats.values():
            want = quant.gemv_ref(Wq, x)
            np.testing.assert_allclose(quant.gemv(Wq, x), want, rtol=0, atol=1e-3 * np.abs(want).max())
        fns = {fmt: (lambda r, Wq=Wq: quant.gemv(Wq, x)) for fmt, Wq in mats.items()}
        # our formats among themselves (one thread pool) with the bandwidth probe; against the BLAS libraries,
        # whose threads spin on after a call, in a second loop where each call follows one of its own
        secs = time_round_robin({**fns, PROBE: lambda r: stream_sum(probe, n_chunks)}, sizes.repeats)
        probe_gbs = probe.nbytes / np.asarray(secs[PROBE]) / 1e9  # per round
        vs = time_round_robin(
            {"ours": fns["f32"], "numpy": lambda r: W @ x, "torch": lambda r: torch.mv(W_t, x_t)},
            sizes.repeats,
            settle=True,
        )
        ms_vs = {k: 1e3 * median(v) for k, v in vs.items()}
        best = min(ms_vs["numpy"], ms_vs["torch"])
        for fmt, Wq in mats.items():
            ms = 1e3 * median(secs[fmt])
            rows.append(
                {
                    "shape": name,
                    "fmt": fmt,
                    "out": out,
                    "in": inp,
                    "MB": Wq.nbytes / 2**20,
                    "ours_ms": ms,
                    "GBps": Wq.nbytes / ms / 1e6,
                    "bw_frac": median(Wq.nbytes / np.asarray(secs[fmt]) / 1e9 / probe_gbs),
                    "probe_GBps": median(probe_gbs),
                    "above_cache": Wq.nbytes > llc_bytes(),
                    "numpy_ms": ms_vs["numpy"],
                    "torch_ms": ms_vs["torch"],
                    "ours_vs_best": ms_vs["ours"] / best if fmt == "f32" else np.nan,
                }
            )
    return pd.DataFrame(rows)


def ffn_bytes(H: int, N: int, k: int | None, fmt: str) -> int:
    """Bytes one FFN call reads in format ``fmt`` (``k=None``: dense, all N neurons).

    Dense reads the gate, up and down rows of all N neurons; sparse those of the ``k`` active
    neurons and ``k`` int64 indices. A row is ``quant.row_bytes(H, fmt)`` (Q formats: block scales
    included), and the Q formats read H float32 output scales of the down projection.
    """
    row = quant.row_bytes(H, fmt)
    scales = 0 if fmt == "f32" else 4 * H
    return (3 * N * row if k is None else 3 * k * row + 8 * k) + scales


def cycled_layers(H: int, N: int, model_layers: int, fmt: str, memory_mb: float) -> int:
    """How many distinct layers the FFN benchmark cycles through: the model's count, or as many as fit
    in ``memory_mb`` (at least one)."""
    return max(1, min(model_layers, int(memory_mb * 2**20 // (3 * N * quant.row_bytes(H, fmt)))))


def _stacked_bundles(rng, H: int, N: int, layers: int, fmt: str) -> bundles.FFNBundles:
    """``layers`` copies of one random layer, each in its own memory. Gate and up weights are positive (with
    positive inputs every masked neuron fires); copies, since only addresses matter to the caches and a
    Mistral-sized layer takes seconds to quantise."""
    Wg = np.abs(rng.standard_normal((N, H), dtype=np.float32)) / np.float32(np.sqrt(H))
    Wu = np.abs(rng.standard_normal((N, H), dtype=np.float32)) / np.float32(np.sqrt(H))
    Wd = rng.standard_normal((H, N), dtype=np.float32) / np.float32(np.sqrt(N))
    one = bundles.FFNBundles.from_weights(Wg, Wu, Wd, fmt)
    del Wg, Wu, Wd
    data = np.empty((layers, *one.data.shape), np.uint8)
    data[:] = one.data  # broadcast: one copy per layer
    return bundles.FFNBundles(
        data, fmt, H, np.ascontiguousarray(np.broadcast_to(one.down_scale, (layers, *one.down_scale.shape)))
    )


def _validate_sparse(stack: bundles.FFNBundles, x: np.ndarray, idx: np.ndarray, n: int = 512) -> None:
    """The sparse kernel against its reference on the first ``n`` neurons of layer 0 (a full
    Mistral-sized reference would need gigabytes of float64)."""
    part = bundles.FFNBundles(np.ascontiguousarray(stack.data[0, :n]), stack.fmt, stack.hidden, stack.down_scale[0])
    sub = idx[idx < n]
    got, want = bundles.ffn(part, x, sub, "drelu"), bundles.ffn_ref(part, x, sub, "drelu")
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3 * (np.abs(want).max() + 1e-6))


def bench_ffn(sizes: BenchSection, freq: np.ndarray, bandwidth_gbs: float, seed: int = 0) -> pd.DataFrame:
    """Sparse vs dense dReLU FFN at every shape, format and sparsity of ``sizes``, cycling through layers.

    For each (shape, format) a stack of ``cycled_layers`` distinct layers is built; one timed call
    runs the FFN of every layer in turn (``bundles.ffn_layers_into``, each layer on its own input and,
    sparse, its own mask drawn by ``sample_masks(freq, ...)``), and the time per FFN is that call's over
    the layer count. Dense and every sparsity run interleaved in one round-robin loop. No cache
    flush: the other layers between two calls of one layer are what evicts it, as in decoding.

    One row per (shape, format, sparsity): medians per FFN call (ms), ``speedup`` (dense / sparse),
    ``ideal`` 1/(1-s), ``byte_limit`` (dense bytes / sparse bytes), achieved GB/s and their fraction
    of ``bandwidth_gbs``, the layers cycled and the model's, and the MB the sparse sweep reads.
    """
    warm_up()
    rng = np.random.default_rng(seed)
    rows = []
    threads, act = numba.get_num_threads(), variant_code("drelu")
    for name, H, N, model_layers in sizes.ffn_shapes:
        for fmt in sizes.ffn_dtypes:
            L = cycled_layers(H, N, model_layers, fmt, sizes.ffn_memory_mb)
            stack = _stacked_bundles(rng, H, N, L, fmt)
            xs = [np.abs(rng.standard_normal((L, H), dtype=np.float32)) + np.float32(0.1) for _ in range(2)]
            y, counts = np.empty((L, H), np.float32), np.zeros(3, np.int64)
            packed = {}  # sparsity -> per round, the L layers' masks as (offsets, indices)
            for s in sizes.ffn_sparsities:
                masks, k = sample_masks(freq, N, s, sizes.repeats * L, seed), kept_count(s, N)
                offsets = np.arange(L + 1, dtype=np.int64) * k
                packed[s] = [(offsets, np.concatenate(masks[r * L : (r + 1) * L])) for r in range(sizes.repeats)]
            s0 = sizes.ffn_sparsities[0]
            _validate_sparse(stack, xs[0][0], packed[s0][0][1][: kept_count(s0, N)])
            no_idx = (np.zeros(1, np.int64), np.empty(0, np.int64))

            def sweep(x, masks, use_idx, stack=stack):
                bundles.ffn_layers_into(
                    stack.data, stack.down_scale, stack.code, H, x, *masks, use_idx, use_idx, *act, threads, y, counts
                )

            fns = {"dense": lambda r: sweep(xs[r % 2], no_idx, False)}
            for s in sizes.ffn_sparsities:
                fns[f"sparse@{s}"] = lambda r, s=s: sweep(xs[r % 2], packed[s][r], True)
            t = time_round_robin(fns, sizes.repeats, flush=False)
            dense_ms, dense_b = 1e3 * median(t["dense"]) / L, ffn_bytes(H, N, None, fmt)
            for s in sizes.ffn_sparsities:
                k = kept_count(s, N)
                sparse_ms, sparse_b = 1e3 * median(t[f"sparse@{s}"]) / L, ffn_bytes(H, N, k, fmt)
                rows.append(
                    {
                        "shape": name,
                        "H": H,
                        "N": N,
                        "dtype": fmt,
                        "sparsity": s,
                        "active": k,
                        "dense_ms": dense_ms,
                        "sparse_ms": sparse_ms,
                        "speedup": speedup(t["dense"], t[f"sparse@{s}"]),
                        "ideal": 1 / (1 - s),
                        "byte_limit": dense_b / sparse_b,
                        "dense_GBps": dense_b / dense_ms / 1e6,
                        "sparse_GBps": sparse_b / sparse_ms / 1e6,
                        "dense_bw_frac": dense_b / dense_ms / 1e6 / bandwidth_gbs,
                        "sparse_bw_frac": sparse_b / sparse_ms / 1e6 / bandwidth_gbs,
                        "layers_cycled": L,
                        "model_layers": model_layers,
                        "sweep_MB_sparse": L * sparse_b / 2**20,
                    }
                )
            del stack, fns
    return pd.DataFrame(rows)

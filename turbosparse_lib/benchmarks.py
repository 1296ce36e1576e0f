"""Section 7 on this machine: bandwidth, GEMV and FFN kernels, end-to-end decoding, bytes per token, projections.

Everything notebook 06 shows is measured here; the notebook calls, prints and plots.

Design:

- Timing rules (numba-examples style): every kernel is validated against NumPy first, which is
  also the JIT warm-up; each timed callable gets one untimed call before the clock starts; the
  callables of one comparison run round-robin inside one loop (``time_round_robin``), so drift
  and noise hit all of them alike; results are medians of the repeats and ratios are taken
  between medians measured in the same loop. Thread counts of Numba, torch and NumPy's OpenBLAS
  are set together (``setup_threads``) and printed with every table; llama.cpp gets the same count.
  The smoke preset uses one thread: on a busy CI machine every parallel kernel call would wait at
  a barrier for a descheduled thread, and smoke numbers only show that the code runs.
- Cold caches: before every timed call the 32 MB last-level cache is flushed by reading a buffer
  twice its size (untimed), so even small shapes are read from DRAM, as in decoding, where all
  the other layers' weights pass through the cache between two uses of one matrix. This replaces
  rotating over several copies of the weights and costs no memory.
- The physical limit is DRAM read bandwidth, measured with a parallel Numba streaming sum over
  an array much larger than the cache (plus a NumPy copy, for reference).
- FFN masks come from real activation statistics, not uniform draws: ``neuron_frequencies``
  records, per layer and neuron, how often dReLU's combined value is non-zero on held-out text;
  ``sample_masks`` carries that skewed (hot/cold) distribution to any width and sparsity (see its
  docstring). The FFN benchmark feeds inputs for which every masked neuron fires, as an exact
  predictor would give: otherwise the kernel would skip the mask's false positives and read fewer
  rows than the stated sparsity.
- End to end, sparse runs replay masks recorded on a first pass (``RecordedMasks``): the cost of
  an ideal, free predictor. The in-line ``ExactZeroOracle`` (a dense gate GEMV per layer) is
  timed beside it, so the price of computing masks is visible in the profile's ``mask`` entry.
- Bytes per token are counted from shapes (``bytes_per_token``): attention weights, FFN rows read,
  the lm_head (the whole vocabulary matrix, tied or not), the KV cache, and int8 scales and mask
  indices where they exist. Dense bytes over sparse bytes is the speed-up a bandwidth-bound
  decoder can reach.
- Projections onto the paper's machines (tables 7-9) divide their bandwidths by our bytes per
  token; values not in the paper (GPU and phone bandwidths, the phone's memory budget) are
  labelled as spec-sheet values or our assumptions in ``PAPER_MACHINES``.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Callable, Literal

import numba
import numpy as np
import pandas as pd
import torch
from numba import njit, prange

from . import kernels, paths
from .atomic import atomic_path
from .engine import Engine, ExactZeroOracle, MaskProvider, TopKOracle
from .sparsity import MLPInstrument, kept_count, run_over_stream

LLC_BYTES_DEFAULT = 32 * 2**20  # the L3 of the project's machines, when sysfs does not say

# ---------------------------------------------------------------------------------------------
# Sizes, keyed by preset name


@dataclass(frozen=True)
class BenchSizes:
    """What notebook 06 measures at one preset. Shapes: (name, out rows, in columns) for GEMV,
    (name, hidden H, intermediate N) for the FFN layer."""

    name: str
    threads: int | None  # Numba/torch/llama.cpp threads; None = every core Numba may use
    bandwidth_mb: int  # array size of the bandwidth measurement (>> 32 MB L3)
    repeats: int  # timed repeats of every kernel measurement; medians are reported
    gemv_shapes: tuple[tuple[str, int, int], ...]
    ffn_shapes: tuple[tuple[str, int, int], ...]
    ffn_sparsities: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95)
    ffn_dtypes: tuple[str, ...] = ("float32", "int8")
    stats_tokens: int = 256  # held-out tokens for the per-neuron activation frequencies
    stats_context: int = 256
    prompt_tokens: int = 16  # end to end: prompt length (prefill is not timed)
    new_tokens: int = 8  # tokens generated per decoding run (the first comes from prefill)
    decode_repeats: int = 2  # timed decoding runs per engine configuration
    topk_sparsity: float = 0.9  # the lossy top-k run end to end (the 90% reference point)


_SMOL_GEMV = (("SmolLM2 gate/up", 1536, 576), ("SmolLM2 down", 576, 1536))
_BIG_GEMV = (
    ("SmolLM2 qkv", 960, 576),
    *_SMOL_GEMV,
    ("SmolLM2 lm_head", 49152, 576),
    ("Mistral-7B gate/up", 14336, 4096),
    ("Mistral-7B down", 4096, 14336),
)
_BIG_FFN = (("SmolLM2-135M", 576, 1536), ("TinyLlama-1.1B", 2048, 5632), ("Mistral-7B", 4096, 14336))

BENCH_SIZES: dict[str, BenchSizes] = {
    "smoke": BenchSizes(
        name="smoke", threads=1, bandwidth_mb=128, repeats=3,
        gemv_shapes=_SMOL_GEMV, ffn_shapes=(("SmolLM2-135M", 576, 1536),),
        stats_tokens=256, stats_context=256, prompt_tokens=8, new_tokens=5, decode_repeats=2,
    ),
    # sized for well under 15 minutes on 2 cores; most of it decodes SmolLM2 (8 configurations x 8 runs of 64 steps)
    "cpu": BenchSizes(
        name="cpu", threads=2, bandwidth_mb=512, repeats=15,
        gemv_shapes=_BIG_GEMV, ffn_shapes=_BIG_FFN,
        stats_tokens=4096, stats_context=512, prompt_tokens=32, new_tokens=65, decode_repeats=7,
    ),
    "paper": BenchSizes(
        name="paper", threads=None, bandwidth_mb=1024, repeats=31,
        gemv_shapes=_BIG_GEMV, ffn_shapes=_BIG_FFN,
        stats_tokens=16384, stats_context=1024, prompt_tokens=64, new_tokens=129, decode_repeats=7,
    ),
}  # fmt: skip


def bench_sizes(preset: str) -> BenchSizes:
    """The benchmark sizes of ``preset``; an unknown name raises with the valid ones listed."""
    try:
        return BENCH_SIZES[preset]
    except KeyError:
        valid = ", ".join(BENCH_SIZES)
        raise ValueError(f"unknown preset {preset!r} for the benchmarks: choose one of {valid}") from None


def _numpy_openblas():
    """(set, get) ctypes functions of the OpenBLAS bundled in NumPy's wheel, or None (another BLAS)."""
    libs = Path(np.__file__).resolve().parent.parent / "numpy.libs"
    for so in sorted(libs.glob("libscipy_openblas*.so*")):
        lib = ctypes.CDLL(str(so))  # already loaded by NumPy: the same handle
        for prefix, suffix in (("scipy_openblas_", "64_"), ("scipy_openblas_", ""), ("openblas_", "")):
            try:
                set_fn = getattr(lib, f"{prefix}set_num_threads{suffix}")
                return set_fn, getattr(lib, f"{prefix}get_num_threads{suffix}")
            except AttributeError:
                continue
    return None


def set_numpy_blas_threads(n: int) -> bool:
    """Use ``n`` threads in NumPy's OpenBLAS (the GEMV baseline and the engine's prefill); False if
    NumPy's BLAS is not a bundled OpenBLAS, whose threads then follow OPENBLAS_NUM_THREADS / OMP_NUM_THREADS."""
    fns = _numpy_openblas()
    if fns is None:
        return False
    fns[0](int(n))
    return True


def numpy_blas_threads() -> int | None:
    """Threads of NumPy's bundled OpenBLAS, or None when it cannot be asked."""
    fns = _numpy_openblas()
    return None if fns is None else int(fns[1]())


def setup_threads(sizes: BenchSizes) -> dict:
    """Fix the threads of Numba, torch and NumPy's OpenBLAS to ``sizes.threads``; the settings, for printing."""
    n = min(sizes.threads or numba.config.NUMBA_NUM_THREADS, numba.config.NUMBA_NUM_THREADS)
    kernels.set_threads(n)
    set_numpy_blas_threads(n)
    return {**kernels.thread_info(), "numpy_openblas_threads": numpy_blas_threads()}


_WARM = False


def warm_up() -> None:
    """Validate every kernel against NumPy once per process (this is also the JIT compile)."""
    global _WARM
    if not _WARM:
        kernels.validate_kernels()
        _WARM = True


# ---------------------------------------------------------------------------------------------
# Statistics and timing


def median(xs) -> float:
    """The median of a non-empty sequence of numbers."""
    a = np.asarray(xs, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError("median of an empty sequence")
    return float(np.median(a))


def speedup(base_times, new_times) -> float:
    """How many times faster ``new`` is than ``base``: median(base) / median(new)."""
    new = median(new_times)
    if new <= 0:
        raise ValueError(f"median time must be positive; got {new}")
    return median(base_times) / new


def llc_bytes() -> int:
    """Size of the last-level cache from sysfs (the largest cache of cpu0), else 32 MB."""
    best = 0
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (d / "size").read_text().strip().upper()
        except OSError:
            continue
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * mult)
    return best or LLC_BYTES_DEFAULT


@njit(parallel=True, fastmath=kernels._FASTMATH, cache=True)
def _stream_sum(a, n_chunks):
    """Sum of a 1-D float32 array in ``n_chunks`` parallel chunks: a pure streaming read."""
    chunk = (a.shape[0] + n_chunks - 1) // n_chunks
    partial = np.zeros(n_chunks, dtype=np.float32)
    for c in prange(n_chunks):
        # a 1-D slice per chunk: this loop form vectorises; indexing a[j] over a computed range ran ~5x slower
        seg = a[c * chunk : min(a.shape[0], (c + 1) * chunk)]
        acc = np.float32(0.0)
        for j in range(seg.shape[0]):
            acc += seg[j]
        partial[c] = acc
    return partial.sum()


class CacheFlusher:
    """Evicts the last-level cache by reading a buffer ``factor`` times its size (untimed)."""

    def __init__(self, factor: int = 2):
        self.buf = np.ones(max(factor * llc_bytes(), 2**20) // 4, dtype=np.float32)

    def __call__(self) -> None:
        _stream_sum(self.buf, 4 * numba.get_num_threads())


def time_round_robin(fns: dict[str, Callable[[int], object]], repeats: int,
                     flush: bool = True) -> dict[str, np.ndarray]:
    """Seconds of ``repeats`` calls of every callable, interleaved: round r calls each ``fn(r)`` once.

    Each callable is called once untimed first (round 0's arguments). With ``flush`` the cache is
    flushed before every timed call, so each call reads its data from DRAM.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1; got {repeats}")
    flusher = CacheFlusher() if flush else (lambda: None)
    for fn in fns.values():
        fn(0)
    times = {name: np.empty(repeats) for name in fns}
    for r in range(repeats):
        for name, fn in fns.items():
            flusher()
            t0 = perf_counter()
            fn(r)
            times[name][r] = perf_counter() - t0
    return times


# ---------------------------------------------------------------------------------------------
# Memory bandwidth: the physical limit


def measure_bandwidth(size_mb: float = 256, repeats: int = 7) -> dict:
    """DRAM bandwidth in GB/s (1e9 bytes/s), medians of ``repeats``, at the current thread count.

    ``read_gbs``: parallel Numba streaming sum (what a GEMV does with its weights: the limit used
    throughout); ``copy_gbs``: NumPy copy of the same array, counting bytes read plus bytes written.
    """
    if size_mb <= 0 or repeats < 1:
        raise ValueError(f"need size_mb > 0 and repeats >= 1; got {size_mb}, {repeats}")
    n = max(int(size_mb * 2**20) // 4, 1)
    a = np.ones(n, dtype=np.float32)
    b = np.empty_like(a)
    n_chunks = 4 * numba.get_num_threads()
    times = time_round_robin(
        {"read": lambda r: _stream_sum(a, n_chunks), "copy": lambda r: np.copyto(b, a)}, repeats
    )  # the cache is flushed before each call, so no part of ``a`` is read from it
    return {
        "read_gbs": a.nbytes / median(times["read"]) / 1e9,
        "copy_gbs": 2 * a.nbytes / median(times["copy"]) / 1e9,
        "size_mb": a.nbytes / 2**20,
        "repeats": repeats,
        "threads": numba.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------------
# Dense GEMV: our kernel against NumPy (OpenBLAS) and torch (MKL)


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


def bench_gemv(sizes: BenchSizes, seed: int = 0) -> pd.DataFrame:
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


# ---------------------------------------------------------------------------------------------
# Per-neuron activation frequencies and masks drawn from them


class _NeuronCounter(MLPInstrument):
    """Counts, per layer and neuron, the tokens whose combined value (input of down_proj) is non-zero."""

    def __init__(self, model):
        super().__init__(model)
        self.counts: list[np.ndarray | None] = [None] * len(self.mlps)
        self.tokens = [0] * len(self.mlps)

    def _register(self) -> None:
        for i, mlp in enumerate(self.mlps):

            def on_down(mod, args, i=i):
                with torch.no_grad():
                    live_TN = self._tokens(args[0]) != 0
                    c_N = live_TN.sum(0).cpu().numpy().astype(np.int64)
                self.counts[i] = c_N if self.counts[i] is None else self.counts[i] + c_N
                self.tokens[i] += live_TN.shape[0]

            self._handles.append(mlp.down_proj.register_forward_pre_hook(on_down))


def neuron_frequencies(model, token_ids, context_length: int = 256, batch_size: int = 4) -> np.ndarray:
    """(layers, N): per layer, the fraction of tokens on which each neuron's combined value is non-zero.

    ``model`` runs over ``token_ids`` in non-overlapping windows of ``context_length`` tokens.
    """
    counter = run_over_stream(_NeuronCounter(model), token_ids, context_length, batch_size)
    return np.stack([c / t for c, t in zip(counter.counts, counter.tokens)])


def frequency_summary(freq_LN: np.ndarray) -> dict:
    """How skewed a (layers, N) frequency table is: mean active fraction, the share of all
    activations carried by the hottest 10% and 20% of each layer's neurons, never-active neurons."""
    freq_LN = np.atleast_2d(np.asarray(freq_LN, dtype=np.float64))
    return {
        "active_fraction": float(freq_LN.mean()),
        "hot10_share": float(np.mean([hot_share(f, 0.1) for f in freq_LN])),
        "hot20_share": float(np.mean([hot_share(f, 0.2) for f in freq_LN])),
        "never_active": float((freq_LN == 0).mean()),
    }


def hot_share(freq_N: np.ndarray, fraction: float) -> float:
    """Share of expected activations that fall on the hottest ``fraction`` of neurons (linear
    between whole neurons); 0 <= fraction <= 1. A uniform distribution gives ``fraction``."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1]; got {fraction}")
    f = np.sort(np.asarray(freq_N, dtype=np.float64).ravel())[::-1]
    total = f.sum()
    if total <= 0:
        return fraction
    cum = np.concatenate([[0.0], np.cumsum(f)]) / total  # cum[i]: share of the hottest i neurons
    return float(np.interp(fraction * len(f), np.arange(len(f) + 1), cum))


def resample_frequencies(freq: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` neuron frequencies with the distribution of ``freq``, in a random neuron order.

    Quantile mapping: neuron i of the new width gets the empirical quantile (i + 0.5) / n of
    ``freq`` (linear between order statistics), then the neurons are shuffled.
    """
    f = np.asarray(freq, dtype=np.float64).ravel()
    if f.size == 0 or n < 1 or np.any((f < 0) | (f > 1)):
        raise ValueError("need n >= 1 and a non-empty array of frequencies in [0, 1]")
    q = np.quantile(f, (np.arange(n) + 0.5) / n)
    return np.random.default_rng(seed).permutation(q)


def inclusion_probabilities(freq: np.ndarray, k: int) -> np.ndarray:
    """Per-neuron probabilities summing to exactly ``k``, in the frequencies' rank order.

    Shifting every logit by one constant, ``q_i = sigmoid(logit(f_i) + b)`` with ``b`` solved by
    bisection, is a shift of one firing threshold: hot neurons stay hot, cold ones cold, and
    ``k / N`` becomes the mean. Frequencies of exactly 0 or 1 are clipped to [1e-6, 1 - 1e-6].
    """
    f = np.clip(np.asarray(freq, dtype=np.float64).ravel(), 1e-6, 1 - 1e-6)
    n = f.size
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}]; got {k}")
    if k in (0, n):
        return np.full(n, float(k == n))
    logit = np.log(f) - np.log1p(-f)
    lo, hi = -60.0, 60.0
    for _ in range(200):  # sum(sigmoid(logit + b)) rises with b
        mid = 0.5 * (lo + hi)
        if (0.5 * (1 + np.tanh(0.5 * (logit + mid)))).sum() < k:
            lo = mid
        else:
            hi = mid
    q = 0.5 * (1 + np.tanh(0.5 * (logit + 0.5 * (lo + hi))))
    return np.minimum(q * (k / q.sum()), 1.0)


def _systematic_sample(q: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Exactly ``k`` distinct indices, index i included with probability q_i (sum q = k, q_i <= 1).

    Systematic sampling over a random order: k points u, u+1, ..., u+k-1 (u uniform in (0, 1])
    fall on the cumulative sums of q; an index is taken when a point lands in its interval,
    which has length q_i <= 1, so no index is taken twice.
    """
    order = rng.permutation(q.size)
    cum = np.cumsum(q[order])
    cum[-1] = k  # absorb rounding so the last point u + k - 1 <= k always lands
    points = (1.0 - rng.random()) + np.arange(k)
    picked = np.sort(order[np.searchsorted(cum, points, side="left")]).astype(np.int64)
    if k > 1 and not np.all(np.diff(picked) > 0):  # only if rounding pushed some q_i above 1
        raise RuntimeError("systematic sampling picked a neuron twice; inclusion probabilities exceed 1")
    return picked


def sample_masks(freq: np.ndarray, n: int, sparsity: float, n_masks: int, seed: int = 0) -> list[np.ndarray]:
    """``n_masks`` masks of width ``n`` at ``sparsity``, drawn from measured neuron frequencies.

    ``freq`` is (layers, N_source) or (N_source,): per-neuron firing frequencies of a real dReLU
    model (``neuron_frequencies``). Mask m uses layer ``m % layers``, as consecutive FFN calls of a
    model visit its layers in turn. For each layer:

    1. ``resample_frequencies`` carries the layer's distribution to width ``n`` (quantile mapping,
       neurons in random positions), keeping the skew: a few hot neurons fire on most tokens,
       most are cold;
    2. ``inclusion_probabilities`` shifts all logits by one constant so they sum to
       ``k = kept_count(sparsity, n)``;
    3. each mask is a systematic sample: exactly ``k`` distinct neurons (so the sparsity is met
       exactly on every token), neuron i present with probability q_i.

    Each mask is a sorted int64 index array of length ``k``.
    """
    freq_LN = np.atleast_2d(np.asarray(freq, dtype=np.float64))
    if n_masks < 1:
        raise ValueError(f"n_masks must be >= 1; got {n_masks}")
    k = kept_count(sparsity, n)
    q_per_layer = [inclusion_probabilities(resample_frequencies(f, n, seed + li), k) for li, f in enumerate(freq_LN)]
    rng = np.random.default_rng(seed)
    return [_systematic_sample(q_per_layer[m % len(q_per_layer)], k, rng) for m in range(n_masks)]


# ---------------------------------------------------------------------------------------------
# The FFN layer alone: sparse vs dense


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


def bench_ffn(sizes: BenchSizes, freq: np.ndarray, bandwidth_gbs: float, seed: int = 0) -> pd.DataFrame:
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


# ---------------------------------------------------------------------------------------------
# Bytes per token of a whole model


@dataclass(frozen=True)
class ModelShape:
    """What a decoder reads per token depends only on these sizes (MoE: experts per layer, routed per token)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False  # lm_head is the embedding matrix (read once per token either way)
    n_experts: int = 1
    experts_per_token: int = 1

    @classmethod
    def of_engine(cls, engine: Engine, name: str = "model") -> "ModelShape":
        c = engine.config
        return cls(name, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads,
                   c.head_dim, c.vocab_size, tied=engine.lm_head_VH is engine.embed_VH)  # fmt: skip

    @property
    def attention_params(self) -> int:
        """q, k, v, o of all layers."""
        q = (self.heads + 2 * self.kv_heads) * self.head_dim
        return self.layers * (q * self.hidden + self.hidden * self.heads * self.head_dim)

    @property
    def ffn_params(self) -> int:
        """gate, up, down of all experts of all layers."""
        return self.layers * self.n_experts * 3 * self.hidden * self.intermediate

    @property
    def params(self) -> int:
        """All parameters, a tied embedding counted once."""
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        router = self.layers * self.n_experts * self.hidden if self.n_experts > 1 else 0
        norms = (2 * self.layers + 1) * self.hidden
        return self.attention_params + self.ffn_params + embeddings + router + norms


@dataclass(frozen=True)
class Precision:
    """Bytes per stored value. ``ffn_row_scale``: bytes of a per-row scale (our int8: one float32)."""

    name: str
    weight: float  # attention, lm_head, embedding
    ffn: float
    ffn_row_scale: float = 0.0
    kv: float = 4.0


FP32 = Precision("fp32", 4, 4, 0, 4)
OURS_INT8_FFN = Precision("fp32 attention + int8 FFN", 4, 1, 4, 4)
FP16 = Precision("fp16", 2, 2, 0, 2)
Q4_0 = Precision("int4 (llama.cpp Q4_0: 18 bytes per 32 weights)", 18 / 32, 18 / 32, 0, 2)


def bytes_per_token(shape: ModelShape, ffn_active: float | None = None, context: float = 0.0,
                    precision: Precision = FP32) -> dict[str, float]:
    """Bytes read (and the KV row written) to decode one token at position ``context``.

    ``ffn_active=None`` is the dense path (all N neurons; int8 scales of gate, up and down rows);
    a fraction runs the sparse path (PowerInfer layout): the gate, up and down rows of the active
    neurons of each routed expert, their scales and int64 indices. Components: ``attention``
    (q, k, v, o weights), ``router``, ``ffn``, ``mask_indices``, ``norms`` (float32 RMSNorm
    weights), ``embedding`` (one row), ``lm_head`` (the whole vocabulary matrix), ``kv_cache``
    (``context + 1`` positions read, one written), and ``total``.
    """
    s, p = shape, precision
    if ffn_active is not None and not 0.0 <= ffn_active <= 1.0:
        raise ValueError(f"ffn_active must be in [0, 1] or None; got {ffn_active}")
    experts = s.layers * s.experts_per_token  # FFN blocks run per token
    if ffn_active is None:
        ffn = experts * (3 * s.intermediate * s.hidden * p.ffn + (2 * s.intermediate + s.hidden) * p.ffn_row_scale)
        indices = 0.0
    else:
        k = ffn_active * s.intermediate
        ffn = experts * (3 * k * s.hidden * p.ffn + 3 * k * p.ffn_row_scale)
        indices = experts * 8 * k
    kv_row = s.layers * 2 * s.kv_heads * s.head_dim * p.kv
    out = {
        "attention": s.attention_params * p.weight,
        "router": (s.layers * s.n_experts * s.hidden * p.weight) if s.n_experts > 1 else 0.0,
        "ffn": ffn,
        "mask_indices": indices,
        "norms": (2 * s.layers + 1) * s.hidden * 4.0,
        "embedding": s.hidden * p.weight,
        "lm_head": s.vocab * s.hidden * p.weight,
        "kv_cache": kv_row * (context + 2),  # read context + 1 rows, write 1
    }
    out["total"] = sum(out.values())
    return out


def activated_params(shape: ModelShape, ffn_active: float = 1.0) -> float:
    """Parameters used per token (attention, routed FFN neurons, router, lm_head; not the embedding)."""
    router = shape.layers * shape.n_experts * shape.hidden if shape.n_experts > 1 else 0
    routed_ffn = shape.ffn_params * shape.experts_per_token / shape.n_experts
    return shape.attention_params + router + ffn_active * routed_ffn + shape.vocab * shape.hidden


def ffn_active_from_activated(shape: ModelShape, activated: float) -> float:
    """The FFN active fraction that makes ``activated_params`` equal ``activated`` (clipped to [0, 1])."""
    fixed = activated_params(shape, 0.0)
    return float(np.clip((activated - fixed) / (activated_params(shape, 1.0) - fixed), 0.0, 1.0))


# ---------------------------------------------------------------------------------------------
# End to end: our engine (dense / sparse, float32 / int8) and llama.cpp


class RecordedMasks:
    """Records another mask provider's masks on the first decoding run, replays them afterwards.

    Replaying costs a list lookup: the timing of an ideal, free predictor with the recorded
    masks. A replayed run decodes the same prompt with the same masks, so it is bit-identical to
    the recorded one; a layer order that differs from the recording raises.
    """

    def __init__(self, provider: MaskProvider):
        self.provider = provider
        self.masks: list[tuple[int, np.ndarray]] = []
        self.recording, self.cursor = True, 0

    def rewind(self) -> None:
        """Start replaying from the first recorded mask (ends recording)."""
        self.recording, self.cursor = False, 0

    def __call__(self, layer_idx: int, x_H: np.ndarray) -> np.ndarray:
        if self.recording:
            idx = np.ascontiguousarray(self.provider(layer_idx, x_H), dtype=np.int64)
            self.masks.append((layer_idx, idx))
            return idx
        if self.cursor >= len(self.masks):
            raise IndexError(f"replay ran past the {len(self.masks)} recorded masks: "
                             "decode no more tokens than were recorded")
        li, idx = self.masks[self.cursor]
        if li != layer_idx:
            raise RuntimeError(f"replayed mask {self.cursor} belongs to layer {li}, but layer {layer_idx} asked")
        self.cursor += 1
        return idx


@dataclass
class EngineRun:
    """One configuration of our engine: ``masks`` None (dense), 'oracle' (ExactZeroOracle in-line),
    'exact' (its masks, recorded then replayed) or 'topk' (TopKOracle at ``topk_sparsity``, replayed)."""

    engine: Engine
    ffn_dtype: Literal["float32", "int8"] = "float32"
    masks: Literal["oracle", "exact", "topk"] | None = None
    topk_sparsity: float = 0.9
    profile: dict = field(default_factory=dict)  # accumulated over timed runs
    _replay: RecordedMasks | None = None

    def __post_init__(self):
        if self.ffn_dtype not in ("float32", "int8"):
            raise ValueError(f"ffn_dtype must be 'float32' or 'int8'; got {self.ffn_dtype!r}")
        if self.masks not in (None, "oracle", "exact", "topk"):
            raise ValueError(f"masks must be None, 'oracle', 'exact' or 'topk'; got {self.masks!r}")
        if self.ffn_dtype == "int8" and self.engine.layers[0].gate_q is None:
            self.engine.quantize_ffn_int8()

    def _provider(self) -> MaskProvider | None:
        if self.masks is None:
            return None
        if self.masks == "oracle":
            return ExactZeroOracle(self.engine)
        if self._replay is None:  # first run: record
            if self.masks == "exact":
                self._replay = RecordedMasks(ExactZeroOracle(self.engine))
            else:
                self._replay = RecordedMasks(TopKOracle(self.engine, self.topk_sparsity))
        else:
            self._replay.rewind()
        return self._replay

    def decode(self, prompt_ids: np.ndarray, new_tokens: int, profile: dict | None = None) -> tuple[np.ndarray, float]:
        """Greedy tokens (the first from prefill) and the seconds of the ``new_tokens - 1`` decode steps."""
        eng = self.engine
        eng.ffn_dtype = self.ffn_dtype  # the float weights stay beside the int8 ones
        provider = self._provider()
        eng.reset(len(prompt_ids) + new_tokens)
        tokens = [int(np.argmax(eng.prefill(prompt_ids)))]
        t0 = perf_counter()
        for _ in range(new_tokens - 1):
            logits = eng.step(tokens[-1], provider is not None, provider, profile)
            tokens.append(int(np.argmax(logits)))
        return np.array(tokens, dtype=np.int64), perf_counter() - t0


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def require_llama_cpp():
    """The ``llama_cpp`` module, or an ImportError saying how to install it."""
    try:
        import llama_cpp
    except ImportError as e:
        raise ImportError(
            "llama-cpp-python is not installed; it is the llama.cpp baseline of notebook 06. Install the bench "
            "extra (builds llama.cpp, about 6 minutes on 2 cores): .venv/bin/pip install -e '.[bench]'"
        ) from e
    return llama_cpp


@contextlib.contextmanager
def _quiet_stderr():
    """Send file descriptor 2 (C libraries' stderr) to /dev/null for the duration of the block."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def smollm2_f32_gguf(threads: int = 2) -> Path:
    """SmolLM2-135M as an F32 GGUF, requantised by llama.cpp from the shipped Q4_1 file (cached).

    Dequantising Q4_1 to F32 gives the same float weights transformers loads, so llama.cpp and
    our engine decode the same model at the same precision.
    """
    from .pretrained import gguf_path

    llama_cpp = require_llama_cpp()
    out = paths.models_dir() / "smollm2-135m-f32.gguf"
    if out.exists():
        return out
    src = gguf_path()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32
    params.nthread = threads
    params.allow_requantize = True
    with atomic_path(out) as tmp, _quiet_stderr():  # llama.cpp logs every tensor to fd 2
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize({src} -> F32) failed with code {rc}")
    return out


class LlamaCppRun:
    """Greedy decoding with llama.cpp (llama-cpp-python) on a GGUF file, timed as ``EngineRun`` is.

    The logits of the last token are read straight from the context (``llama_get_logits_ith``),
    a view without a copy, and the greedy argmax is taken in NumPy as for our engine.
    """

    def __init__(self, gguf: Path, threads: int, n_ctx: int = 512):
        llama_cpp = self._lib = require_llama_cpp()
        self.llm = llama_cpp.Llama(
            model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
            n_batch=n_ctx, logits_all=False, verbose=False,
        )  # fmt: skip
        self.threads, self.profile = threads, {}
        self.ffn_dtype, self.masks = "float32", None  # dense F32, for decoding_limits

    def close(self) -> None:
        """Free the model and context now (at interpreter exit llama-cpp-python's own cleanup can fail)."""
        self.llm.close()

    def _next_token(self) -> int:
        logits = np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.llm.n_vocab(),))
        return int(np.argmax(logits))

    def decode(self, prompt_ids: np.ndarray, new_tokens: int, profile: dict | None = None) -> tuple[np.ndarray, float]:
        """Greedy tokens (the first from the prompt's evaluation) and the seconds of the decode steps."""
        if len(prompt_ids) + new_tokens > self.llm.n_ctx():
            raise ValueError(f"prompt + new tokens exceed llama.cpp's context of {self.llm.n_ctx()}")
        self.llm.reset()
        self.llm.eval([int(t) for t in prompt_ids])
        tokens = [self._next_token()]
        t0 = perf_counter()
        for _ in range(new_tokens - 1):
            self.llm.eval([tokens[-1]])
            tokens.append(self._next_token())
        return np.array(tokens, dtype=np.int64), perf_counter() - t0


def bench_decoding(runs: dict, prompt_ids, new_tokens: int, repeats: int) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Decode with every run ``repeats`` times, round-robin, after one untimed warm-up run each.

    ``runs``: name -> ``EngineRun`` / ``LlamaCppRun``. Returns a table (one row per run: median
    tokens/s and ms/token over ``new_tokens - 1`` decode steps, the spread, whether every timed
    run gave the warm-up run's tokens) and the tokens each run produced. Engine runs accumulate
    their profile over the timed runs in ``run.profile``.
    """
    if new_tokens < 2 or repeats < 1:
        raise ValueError(f"need new_tokens >= 2 and repeats >= 1; got {new_tokens}, {repeats}")
    prompt = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
    tokens = {name: run.decode(prompt, new_tokens)[0] for name, run in runs.items()}  # warm-up (and recording)
    secs, stable = {name: [] for name in runs}, dict.fromkeys(runs, True)
    for _ in range(repeats):
        for name, run in runs.items():
            toks, s = run.decode(prompt, new_tokens, run.profile)
            stable[name] &= bool(np.array_equal(toks, tokens[name]))
            secs[name].append(s)
    steps = new_tokens - 1
    rows = [{
        "run": name, "tokens_per_s": steps / median(v), "ms_per_token": 1e3 * median(v) / steps,
        "spread_pct": 100 * (max(v) - min(v)) / median(v), "repeats": len(v), "same_tokens_each_run": stable[name],
    } for name, v in secs.items()]  # fmt: skip
    return pd.DataFrame(rows).set_index("run"), tokens


def profile_table(runs: dict) -> pd.DataFrame:
    """Milliseconds per token in each engine component (attention incl. norms, mask, ffn, lm_head),
    and the mean FFN active fraction, for every ``EngineRun`` that has a profile."""
    rows = []
    for name, run in runs.items():
        p = getattr(run, "profile", None)
        if not p or not p.get("tokens"):
            continue
        n = p["tokens"]
        row = {"run": name, **{k: 1e3 * p[k] / n for k in ("embed", "attention", "mask", "ffn", "lm_head")}}
        row["total"] = sum(row[k] for k in ("embed", "attention", "mask", "ffn", "lm_head"))
        row["ffn_active"] = p["active_neurons"] / (p["ffn_calls"] * run.engine.config.intermediate_size)
        rows.append(row)
    return pd.DataFrame(rows).set_index("run")


def decoding_limits(shape: ModelShape, runs: dict, speed: pd.DataFrame, prompt_tokens: int, new_tokens: int,
                    bandwidth_gbs: float, baselines: dict[str, str]) -> pd.DataFrame:
    """Per run: bytes per token (at the run's measured FFN active fraction and mean decode position),
    achieved GB/s and its fraction of ``bandwidth_gbs``, the GB/s of the FFN kernels alone (from the
    profile; NaN for llama.cpp); and against ``baselines[ffn_dtype]`` (the
    dense run of the same FFN precision) the measured ``speedup``, the ``byte_limit`` (baseline
    bytes / own bytes) and ``of_limit`` = speedup / byte_limit. llama.cpp runs count as dense fp32.
    """
    prof = profile_table(runs)
    context = prompt_tokens + (new_tokens - 2) / 2  # mean position of the decode steps
    rows = []
    for name, run in runs.items():
        dtype, masks = getattr(run, "ffn_dtype", "float32"), getattr(run, "masks", None)
        active = None if masks is None else float(prof.loc[name, "ffn_active"])
        b = bytes_per_token(shape, active, context, OURS_INT8_FFN if dtype == "int8" else FP32)
        ffn_ms = float(prof.loc[name, "ffn"]) if name in prof.index else math.nan
        rows.append({"run": name, "ffn_dtype": dtype, "masks": masks or "dense",
                     "ffn_active": 1.0 if active is None else active, "MB_per_token": b["total"] / 1e6,
                     "tokens_per_s": speed.loc[name, "tokens_per_s"],
                     "ffn_GBps": (b["ffn"] + b["mask_indices"]) / ffn_ms / 1e6})  # fmt: skip
    df = pd.DataFrame(rows).set_index("run")
    df["GBps"] = df.MB_per_token * df.tokens_per_s / 1e3
    df["bw_frac"] = df.GBps / bandwidth_gbs
    for dtype, base in baselines.items():
        if base not in df.index:
            raise KeyError(f"baseline {base!r} for {dtype} is not among the runs {list(df.index)}")
        same = df.ffn_dtype == dtype
        df.loc[same, "speedup"] = df.tokens_per_s[same] / df.loc[base, "tokens_per_s"]
        df.loc[same, "byte_limit"] = df.loc[base, "MB_per_token"] / df.MB_per_token[same]
    df["of_limit"] = df.speedup / df.byte_limit
    return df


# ---------------------------------------------------------------------------------------------
# The paper's tables and machines, and projections onto them

MISTRAL_7B = ModelShape("Mistral-7B", 4096, 14336, 32, 32, 8, 128, 32000)
MIXTRAL_47B = ModelShape("Mixtral-47B", 4096, 14336, 32, 32, 8, 128, 32000, n_experts=8, experts_per_token=2)
PAPER_ACTIVATED = {"Mistral-7B": 2.5e9, "Mixtral-47B": 4.3e9}  # TurboSparse's activated parameters (paper, abstract)

# paper tables 7-9, tokens/s; "sparse" = PowerInfer (-2) on TurboSparse, "dense" = llama.cpp on the original
PAPER_TABLES = pd.DataFrame(
    [
        ("table 7 (CPU only)", "PC-2080Ti", "Mistral-7B-FP16", 9.94, 4.78),
        ("table 7 (CPU only)", "PC-2080Ti", "Mixtral-47B-INT4", 11.98, 4.26),
        ("table 7 (CPU only)", "PC-Laptop", "Mistral-7B-FP16", 8.71, 4.13),
        ("table 7 (CPU only)", "PC-Laptop", "Mixtral-47B-INT4", 16.1, 6.91),
        ("table 8 (CPU+GPU)", "PC-2080Ti", "Mistral-7B-FP16", 35.5, 7.64),
        ("table 8 (CPU+GPU)", "PC-2080Ti", "Mixtral-47B-INT4", 22.24, 6.63),
        ("table 8 (CPU+GPU)", "PC-Laptop", "Mixtral-47B-INT4", 33.12, 13.1),
        ("table 9 (phone)", "OnePlus-12", "Mixtral-47B-INT4", 11.1, 0.5),
    ],
    columns=["table", "setting", "model", "sparse tok/s (paper)", "dense tok/s (paper)"],
)
PAPER_TABLES["speed-up (paper)"] = PAPER_TABLES["sparse tok/s (paper)"] / PAPER_TABLES["dense tok/s (paper)"]

_PAPER_MODELS = {"Mistral-7B-FP16": (MISTRAL_7B, FP16), "Mixtral-47B-INT4": (MIXTRAL_47B, Q4_0)}


@dataclass(frozen=True)
class Machine:
    """A machine of section 7.1. Every number carries where it comes from in ``sources``."""

    name: str
    host_gbs: float  # CPU memory bandwidth
    gpu_gb: float = 0.0  # GPU memory (table 8)
    gpu_gbs: float = 0.0  # GPU memory bandwidth
    weights_budget_gb: float = math.inf  # memory for weights in the fast tier (table 9)
    flash_gbs: float = 0.0  # storage read bandwidth (table 9)
    sources: tuple[str, ...] = ()


PAPER_MACHINES = {
    "PC-2080Ti": Machine(
        "PC-2080Ti", host_gbs=38.4, gpu_gb=11, gpu_gbs=616,
        sources=("host 38.4 GB/s, GPU 11 GB: paper section 7.1",
                 "GPU 616 GB/s: RTX 2080 Ti spec sheet, not in the paper"),
    ),
    "PC-Laptop": Machine(
        "PC-Laptop", host_gbs=67.2, gpu_gb=16, gpu_gbs=576,
        sources=("host 67.2 GB/s, GPU 16 GB: paper section 7.1",
                 "GPU 576 GB/s: RTX 4090 Laptop spec sheet, not in the paper"),
    ),
    "OnePlus-12": Machine(
        "OnePlus-12", host_gbs=76.8, weights_budget_gb=16, flash_gbs=4.2,
        sources=("24 GB DRAM, UFS 4.0: paper section 7.1", "DRAM 76.8 GB/s (LPDDR5X, Snapdragon 8 Gen 3) and "
                 "UFS 4.0 4.2 GB/s sequential read: spec sheets, not in the paper",
                 "16 GB of the 24 GB for weights: our assumption"),
    ),
}  # fmt: skip

GPU_RESERVE_GB = 1.0  # GPU memory kept for KV cache and scratch buffers (our assumption)


def _weights_gb(shape: ModelShape, precision: Precision) -> float:
    """GB of the weights a decoder keeps in fast memory (the embedding stays in host memory)."""
    router = shape.layers * shape.n_experts * shape.hidden if shape.n_experts > 1 else 0
    other = shape.attention_params + router + shape.vocab * shape.hidden
    return (other * precision.weight + shape.ffn_params * precision.ffn) / 1e9


def _hot_share(freq: np.ndarray | None, ffn_active: float, capacity_fraction: float) -> float:
    """Share of the active neurons' traffic caught by the hottest ``capacity_fraction`` of each
    layer's neurons, with each layer's frequencies rescaled to ``ffn_active`` (mean over layers).
    Without frequencies (``None``) neurons are taken as equally hot."""
    if freq is None:
        return capacity_fraction
    shares = []
    for f in np.atleast_2d(np.asarray(freq, dtype=np.float64)):
        q = inclusion_probabilities(f, kept_count(1 - ffn_active, f.size))
        shares.append(hot_share(q, capacity_fraction))
    return float(np.mean(shares))


def project(table: str, machine: Machine, shape: ModelShape, precision: Precision, ffn_active: float,
            freq: np.ndarray | None = None, context: float = 256, efficiency: float = 1.0) -> dict:
    """Projected tokens/s, dense (llama.cpp-like) and sparse (PowerInfer-like), on a paper machine.

    Per token, time = sum over memory tiers of bytes read there / the tier's bandwidth, times
    1 / ``efficiency`` (1: the bandwidth limit).

    - table 7 (CPU only): everything from host memory.
    - table 8 (CPU+GPU): dense offloads whole layers to the GPU until it is full (less
      ``GPU_RESERVE_GB``), so that share of every token's bytes is read by the GPU; sparse puts
      attention on the GPU, then in the rest the hottest neurons of each layer (by ``freq``, the
      (layers, N) measured frequencies rescaled to the active fraction), and the GPU reads their
      share of the active neurons. The two devices are added, not overlapped (conservative for
      PowerInfer, which overlaps them). PCIe is not modelled: only activations cross it.
    - table 9 (phone): weights beyond the memory budget live in flash. Dense: a cyclic scan larger
      than the page cache misses on every page under LRU, so all active weights stream from
      flash; sparse (PowerInfer-2): attention and the hottest neurons stay in DRAM, the active cold
      neurons are read from flash.
    """
    if not 0.0 < efficiency <= 1.0:
        raise ValueError(f"efficiency must be in (0, 1]; got {efficiency}")
    dense_b = bytes_per_token(shape, None, context, precision)
    sparse_b = bytes_per_token(shape, ffn_active, context, precision)
    host = machine.host_gbs * 1e9
    model_gb = _weights_gb(shape, precision)
    ffn_gb_all = shape.ffn_params * precision.ffn / 1e9  # every neuron of every expert
    attn_gb = shape.attention_params * precision.weight / 1e9
    ffn_sparse = sparse_b["ffn"] + sparse_b["mask_indices"]
    rest_sparse = sparse_b["total"] - ffn_sparse  # attention, lm_head, KV cache, ...
    if table.startswith("table 7"):
        t_dense, t_sparse = dense_b["total"] / host, sparse_b["total"] / host
    elif table.startswith("table 8"):
        gpu, cap = machine.gpu_gbs * 1e9, machine.gpu_gb - GPU_RESERVE_GB
        on_gpu = min(1.0, cap / model_gb)
        t_dense = dense_b["total"] * ((1 - on_gpu) / host + on_gpu / gpu)
        room = float(np.clip((cap - attn_gb) / ffn_gb_all, 0.0, 1.0))  # fraction of all neurons that fit
        hot = _hot_share(freq, ffn_active, room) if cap > attn_gb else 0.0
        attn_on_gpu = sparse_b["attention"] if cap > attn_gb else 0.0
        t_sparse = (attn_on_gpu + hot * ffn_sparse) / gpu + (rest_sparse - attn_on_gpu + (1 - hot) * ffn_sparse) / host
    elif table.startswith("table 9"):
        flash, budget = machine.flash_gbs * 1e9, machine.weights_budget_gb
        fits = model_gb <= budget
        t_dense = dense_b["total"] / host if fits else dense_b["total"] / flash
        hot = _hot_share(freq, ffn_active, float(np.clip((budget - attn_gb) / ffn_gb_all, 0.0, 1.0)))
        t_sparse = (rest_sparse + hot * ffn_sparse) / host + (1 - hot) * ffn_sparse / (host if fits else flash)
    else:
        raise ValueError(f"unknown table {table!r}; valid: 'table 7 ...', 'table 8 ...', 'table 9 ...'")
    return {"dense tok/s": efficiency / t_dense, "sparse tok/s": efficiency / t_sparse,
            "speed-up": t_dense / t_sparse, "dense GB/token": dense_b["total"] / 1e9,
            "sparse GB/token": sparse_b["total"] / 1e9}  # fmt: skip


def project_paper_tables(ffn_active: dict[str, float], freq: np.ndarray | None = None, efficiency: float = 1.0,
                         context: float = 256) -> pd.DataFrame:
    """Every row of the paper's tables 7-9 with our projection beside it.

    ``ffn_active``: model name ('Mistral-7B', 'Mixtral-47B') -> FFN active fraction to project
    with; ``freq``: (layers, N) measured per-neuron frequencies (their skew decides how much of the
    active traffic the hot neurons in the fast tier catch); ``efficiency``: fraction of the bandwidth a
    decoder reaches (1: the limit), applied to every tier. Also the GB/s the paper's own tokens/s
    imply with our bytes per token.
    """
    rows = []
    for rec in PAPER_TABLES.to_dict("records"):
        shape, precision = _PAPER_MODELS[rec["model"]]
        if shape.name not in ffn_active:
            raise KeyError(f"no FFN active fraction for {shape.name}; give one for each of {sorted(PAPER_ACTIVATED)}")
        proj = project(rec["table"], PAPER_MACHINES[rec["setting"]], shape, precision, ffn_active[shape.name],
                       freq, context, efficiency)  # fmt: skip
        rows.append({**rec, "ffn_active": ffn_active[shape.name],
                     **{f"{k} (projection)": v for k, v in proj.items()},
                     # the bandwidth the paper's own numbers imply, if our bytes per token are right
                     "dense GB/s implied (paper)": rec["dense tok/s (paper)"] * proj["dense GB/token"],
                     "sparse GB/s implied (paper)": rec["sparse tok/s (paper)"] * proj["sparse GB/token"]})  # fmt: skip
    return pd.DataFrame(rows)


def scratch_drelu_dirs(preset: str, seeds=(0, 1)) -> list[Path]:
    """The from-scratch dReLU models notebook 02 saved at ``preset`` (empty if it has not run)."""
    return [d for s in seeds if ((d := paths.scratch_model_dir(preset, "drelu", s)) / "config.json").exists()]


def weights_mb(engine: Engine) -> float:
    """Float32 weight bytes an engine decodes with, in MB (lm_head counted once when tied)."""
    return bytes_per_token(ModelShape.of_engine(engine), None, 0.0, FP32)["total"] / 1e6

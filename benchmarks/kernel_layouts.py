"""The measurements behind the engine's interleaved Q matrices and its one-parallel-region FFN kernels (README,
"Interleaved Q matrices", "One parallel region per kernel call" and "Prefetch distance"), as one script:

1. Q8_0 GEMV read bandwidth against the row length, one row at a time and four interleaved rows, at a fixed 59.5 MB
   (Mistral-7B's down projection at 14,336 columns), cold cache, over the DRAM bandwidth measured first;
2. nanoseconds per 32-weight block in cache on one thread, one row at a time and four interleaved rows;
3. the FFN of 30 SmolLM2-shaped layers (H 576, N 1536) from one compiled loop, as the fused decode step calls it:
   the dense layout, and the bundles' sparse path at 0% (the fixed cost of the calls) and 25% of the neurons; then
   the same for 2 layers, which stay in the cache: the sparse path's time per neuron and thread in both, to tell
   memory stalls from computation;
4. the sparse path's prefetch distance (``bundles.listed_ahead``): 30 SmolLM2-shaped layers at 10, 25 and 50% of the
   neurons, the caches flushed before each token, the library's kernel against the same loop prefetching only the
   next listed neuron's bundle, in every format.

Run from the repository root: ``.venv/bin/python benchmarks/kernel_layouts.py [--threads 2] [--repeats 15]``.
Compare numbers within one run only (the machine's speed drifts between hours).
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np
from numba import njit

from turbosparse_lib.bench.bandwidth import measure_bandwidth
from turbosparse_lib.bench.timing import median, setup_threads, time_round_robin
from turbosparse_lib.inference import bundles, quant, simd
from turbosparse_lib.inference.kernels import FASTMATH, gate_act, up_act, variant_code


def gemv_against_columns(repeats: int, dram_gbs: float) -> None:
    rng = np.random.default_rng(0)
    fns, nbytes = {}, {}
    for cols in (4096, 8192, 11264, 14336, 28672):
        W = rng.standard_normal((4096 * 14336 // cols, cols), dtype=np.float32)
        x = rng.standard_normal(cols, dtype=np.float32)
        plain = quant.quantize(W, "q8_0")
        for layout, Wq in (("one row", plain), ("interleaved", plain.interleaved())):
            fns[(cols, layout)] = lambda r, Wq=Wq, x=x: quant.gemv(Wq, x)
            nbytes[(cols, layout)] = Wq.nbytes
    print("1. Q8_0 GEMV, 59.5 MB, fraction of the DRAM read bandwidth:")
    for (cols, layout), t in time_round_robin(fns, repeats).items():
        print(f"   {cols:6d} columns, {layout:<11}: {nbytes[(cols, layout)] / median(t) / 1e9 / dram_gbs:.2f}")


def ns_per_block_in_cache(repeats: int) -> None:
    rng = np.random.default_rng(1)
    W, x = rng.standard_normal((64, 4096), dtype=np.float32), rng.standard_normal(4096, dtype=np.float32)
    xq, xd = quant.quantize_activation(x)
    y = np.empty(64, np.float32)
    numba.set_num_threads(1)
    print("2. in cache, one thread, ns per 32-weight block:")
    for fmt in ("q8_0", "q4_0"):
        Wq = quant.quantize(W, fmt)
        for layout, data in (("one row", Wq.data), ("interleaved", Wq.interleaved().data)):
            loop(data, Wq.code, 4096, x, xq, xd, y, 1)
            t = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                loop(data, Wq.code, 4096, x, xq, xd, y, 200)
                t.append(time.perf_counter() - t0)
            print(f"   {fmt} {layout:<11}: {median(t) / 200 / (64 * 4096 / 32) * 1e9:.2f}")


@njit
def loop(data, code, cols, x, xq, xd, y, reps):
    for _ in range(reps):
        quant.rows_dot_into(data, code, cols, x, xq, xd, 0, quant.matrix_rows(data, code, cols), y)


@njit
def ffn_token(F, scale, gate_up, down_rows, code, H, x, xq, xd, idx, offsets, dense, act, shift, n_threads, y, rows):
    for li in range(F.shape[0]):
        lo, hi = offsets[li], offsets[li + 1]
        bundles.layer_ffn_into(
            F[li], scale[li], gate_up[li], down_rows[li], code, H, x, xq, xd, idx[lo:hi], hi - lo, not dense,
            False, act, shift, n_threads, y, rows,
        )  # fmt: skip


def ffn_layers(threads: int, repeats: int, L: int) -> None:
    numba.set_num_threads(threads)
    rng = np.random.default_rng(2)
    H, N = 576, 1536
    gate, up = (rng.standard_normal((L, N, H), dtype=np.float32) for _ in range(2))
    F = bundles.FFNBundles.from_weights(gate, up, rng.standard_normal((L, H, N), dtype=np.float32), "q4_0", True)
    x, xq, xd = quant.activation_for(F.code, rng.standard_normal(H, dtype=np.float32))
    act, shift = variant_code("reglu")  # every listed neuron's three rows are read, as with exact masks
    y, rows = np.empty(H, np.float32), np.zeros(3, np.int64)
    print(f"3. FFN of {L} SmolLM2-shaped Q4_0 layers ({F.nbytes / 2**20:.0f} MB) from one compiled loop, ms per token:")
    ms = {}
    for label, frac in (("dense layout", None), ("sparse, 0%", 0.0), ("sparse, 25%", 0.25)):
        k = N if frac is None else int(frac * N)
        idx = np.concatenate([np.sort(rng.choice(N, k, replace=False)) for _ in range(L)]).astype(np.int64)
        offsets = np.arange(L + 1, dtype=np.int64) * k
        args = (F.data, F.down_scale, F.gate_up, F.down_rows, F.code, H, x, xq, xd, idx, offsets, frac is None)
        ffn_token(*args, act, shift, threads, y, rows)
        t = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            ffn_token(*args, act, shift, threads, y, rows)
            t.append(time.perf_counter() - t0)
        ms[label] = median(t) * 1e3
        print(f"   {label:<12}: {ms[label]:.3f}")
    per_neuron = (ms["sparse, 25%"] - ms["sparse, 0%"]) * 1e6 / (L * int(0.25 * N)) * threads
    print(f"   sparse path per neuron and thread: {per_neuron:.0f} ns")


@njit(parallel=True, fastmath=FASTMATH)
def listed_ffn_one_ahead(B, code, H, x, xq, xd, idx, n, act, shift, n_threads, y, ahead):
    """The sparse path of ``bundles.ffn_into`` as it was, prefetching only the next listed neuron's bundle."""
    seg, width = B.shape[1] // 3, quant.n_blocks(H) * 32
    partial = np.empty((n_threads, width), np.float32)
    for t in numba.prange(n_threads):
        lo, hi = bundles.thread_neurons(t, n_threads, B.shape[0], idx, n, True)
        p = partial[t]
        for j in range(width):  # loops, not array expressions: each of those would be a parallel region of its own
            p[j] = 0.0
        for k in range(lo, hi):
            if k + 1 < hi:
                for off in range(0, ahead, 64):
                    simd.prefetch(B[idx[k + 1]], off)
            row = B[idx[k]]
            a = gate_act(quant.row_dot(row, 0, code, H, x, xq, xd), act, shift)
            if a != 0:
                c = a * up_act(quant.row_dot(row, seg, code, H, x, xq, xd), act)
                if c != 0:
                    quant.row_axpy(row, 2 * seg, code, H, c, p)
    for j in range(H):
        acc = np.float32(0.0)
        for t in range(n_threads):
            acc += partial[t, j]
        y[j] = acc


@njit
def listed_token(F, scale, code, H, x, xq, xd, idx, act, shift, n_threads, y, rows, ahead, one_ahead):
    for li in range(F.shape[0]):
        if one_ahead:
            listed_ffn_one_ahead(F[li], code, H, x, xq, xd, idx[li], idx.shape[1], act, shift, n_threads, y, ahead)
        else:
            bundles.ffn_into(
                F[li], scale[li], F[li][:0], code, H, x, xq, xd, idx[li], idx.shape[1], True, True, act, shift,
                n_threads, y, rows, ahead,
            )  # fmt: skip


def prefetch_distance(threads: int, repeats: int) -> None:
    numba.set_num_threads(threads)
    L, H, N = 30, 576, 1536
    flush = np.ones(64 << 20, np.uint8)  # read before each token: no layer's bundles are left in the caches
    print(f"4. sparse FFN of {L} SmolLM2-shaped layers, caches flushed, ms per token (prefetch 1 ahead / library):")
    for fmt in ("f32", "q8_0", "q4_0"):
        rng = np.random.default_rng(3)
        w = [rng.standard_normal(shape, dtype=np.float32) for shape in ((L, N, H), (L, N, H), (L, H, N))]
        F = bundles.FFNBundles.from_weights(*w, fmt)
        x, xq, xd = quant.activation_for(F.code, rng.standard_normal(H, dtype=np.float32))
        act, shift = variant_code("reglu")
        y, rows, ahead = np.empty(H, np.float32), np.zeros(3, np.int64), bundles.prefetch_bytes_for(F.data.shape[2])
        for frac in (0.1, 0.25, 0.5):
            idx = np.stack([np.sort(rng.choice(N, int(frac * N), replace=False)) for _ in range(L)]).astype(np.int64)
            t = {True: [], False: []}
            for r in range(repeats + 1):
                for one_ahead in (True, False):
                    flush.sum()
                    t0 = time.perf_counter()
                    listed_token(F.data, F.down_scale, F.code, H, x, xq, xd, idx, act, shift, threads, y, rows, ahead,
                                 one_ahead)  # fmt: skip
                    if r:  # the first round compiles
                        t[one_ahead].append(time.perf_counter() - t0)
            ratio = median(np.array(t[True]) / np.array(t[False]))
            print(
                f"   {fmt:<5} {frac:.0%} of the neurons ({bundles.listed_ahead(F.data.shape[2])} ahead): "
                f"{median(t[True]) * 1e3:.3f} / {median(t[False]) * 1e3:.3f}, x{ratio:.2f} faster (paired rounds)"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    a = ap.parse_args()
    print("threads:", setup_threads(a.threads), "| integer dot:", simd.INT8_DOT)
    dram = measure_bandwidth()["read_gbs"]
    print(f"DRAM read bandwidth: {dram:.1f} GB/s")
    gemv_against_columns(a.repeats, dram)
    ns_per_block_in_cache(a.repeats)
    for layers in (30, 2):
        ffn_layers(a.threads, 2 * a.repeats + 1, layers)
    prefetch_distance(a.threads, a.repeats)


if __name__ == "__main__":
    main()

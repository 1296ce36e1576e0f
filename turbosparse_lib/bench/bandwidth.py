"""DRAM read bandwidth: the physical limit of decoding, measured with a parallel streaming sum."""

from __future__ import annotations

import numba
import numpy as np

from .timing import median, stream_sum, time_round_robin


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
        {"read": lambda r: stream_sum(a, n_chunks), "copy": lambda r: np.copyto(b, a)}, repeats
    )  # the cache is flushed before each call, so no part of ``a`` is read from it
    return {
        "read_gbs": a.nbytes / median(times["read"]) / 1e9,
        "copy_gbs": 2 * a.nbytes / median(times["copy"]) / 1e9,
        "size_mb": a.nbytes / 2**20,
        "repeats": repeats,
        "threads": numba.get_num_threads(),
    }

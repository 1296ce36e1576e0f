"""How this project times things: one rule set for every benchmark of section 7.

- Every kernel is validated against NumPy first (``warm_up``), which is also the JIT compile;
  each timed callable gets one untimed call before the clock starts; the callables of one
  comparison run round-robin inside one loop (``time_round_robin``), so drift and noise hit all
  of them alike; results are medians of the repeats and ratios are taken between medians measured
  in the same loop.
- Thread counts of Numba, torch and NumPy's OpenBLAS are set together from the preset
  (``setup_threads``) and printed with every table; llama.cpp gets the same count. The smoke
  preset uses one thread: on a busy CI machine every parallel kernel call would wait at a barrier
  for a descheduled thread, and smoke numbers only show that the code runs.
- Cold caches: before every timed call the last-level cache is flushed by reading a buffer twice
  its size (untimed), so even small shapes are read from DRAM.
- A quiet machine: ``wait_for_quiet`` reads the load average before timing and, where the preset
  asks for it (cpu, paper), waits a bounded time for the load to fall, then refuses; the reading
  goes into the results, so a reader sees what the timings ran beside.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from time import perf_counter

import numba
import numpy as np
from numba import njit, prange

from ..inference.attention import validate_attention
from ..inference.threads import set_all_threads, thread_info
from ..inference.validate import validate_kernels

LLC_BYTES_DEFAULT = 32 * 2**20  # the L3 of the project's machines, when sysfs does not say


def setup_threads(threads: int | None) -> dict:
    """Fix the threads of Numba, torch and NumPy's OpenBLAS to ``threads`` (a preset's); the settings, for printing."""
    set_all_threads(threads)
    return thread_info()


_WARM = False


def warm_up() -> None:
    """Validate every kernel against NumPy once per process (this is also the JIT compile)."""
    global _WARM
    if not _WARM:
        validate_kernels()
        validate_attention()
        _WARM = True


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


def speedup_interval(base_times, new_times, level: float = 0.95, samples: int = 2000, seed: int = 0) -> tuple:
    """Bootstrap interval of ``speedup(base_times, new_times)`` for times taken in pairs (round i of both runs
    measured side by side, so a slow minute of the machine slows both): the rounds are resampled together,
    percentile interval at ``level``, a fixed seed so a rerun on the same times gives the same interval."""
    base, new = np.asarray(base_times, np.float64), np.asarray(new_times, np.float64)
    if base.shape != new.shape or base.ndim != 1 or len(base) < 2:
        raise ValueError(f"need paired rounds of equal count (at least 2); got {base.shape} and {new.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1); got {level}")
    pick = np.random.default_rng(seed).integers(0, len(base), size=(samples, len(base)))
    ratios = np.median(base[pick], axis=1) / np.median(new[pick], axis=1)
    return tuple(float(q) for q in np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2]))


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


# Full fast-math, unlike the engine's kernels (``kernels.FASTMATH``): the sum only has to be read at full speed,
# its last bits do not matter, and without reassociation the loop does not vectorise (a third of the bandwidth).
@njit(parallel=True, fastmath=True, cache=True)
def stream_sum(a, n_chunks):
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
        stream_sum(self.buf, 4 * numba.get_num_threads())


def time_round_robin(
    fns: dict[str, Callable[[int], object]], repeats: int, flush: bool = True, settle: bool = False
) -> dict[str, np.ndarray]:
    """Seconds of ``repeats`` calls of every callable, interleaved: round r calls each ``fn(r)`` once.

    Each callable is called once untimed first (round 0's arguments). With ``flush`` the cache is
    flushed before every timed call, so each call reads its data from DRAM. With ``settle`` each
    timed call follows an untimed call of the same callable: for callables from different thread
    pools (OpenBLAS, torch, Numba), whose threads keep spinning for a while after a call and take
    the cores from whichever library runs next.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1; got {repeats}")
    flusher = CacheFlusher() if flush else (lambda: None)
    for fn in fns.values():
        fn(0)
    times = {name: np.empty(repeats) for name in fns}
    for r in range(repeats):
        for name, fn in fns.items():
            if settle:
                fn(r)
            flusher()
            t0 = perf_counter()
            fn(r)
            times[name][r] = perf_counter() - t0
    return times


class MachineBusy(RuntimeError):
    """The machine stayed busier than the preset allows for timing."""


def machine_load() -> dict:
    """The 1-minute load average, per core and in total (``os.getloadavg``), and the core count."""
    load1, _, _ = os.getloadavg()
    cores = os.cpu_count() or 1
    return {"load1": load1, "cores": cores, "load_per_core": load1 / cores}


def wait_for_quiet(max_load_per_core: float | None, wait_s: float, poll_s: float = 15.0, own_load: float = 0.0) -> dict:
    """Wait until the 1-minute load per core is at most ``max_load_per_core``, for at most ``wait_s``.

    ``own_load``: runnable threads this process itself adds to the reading (subtracted). Returns the
    last reading with ``waited_s``; raises ``MachineBusy`` if the machine stays busy. ``None`` checks
    nothing (the smoke preset: CI machines are shared) but still reports the reading.
    """
    t0 = time.monotonic()
    while True:
        r = machine_load()
        r["load_per_core"] = max(0.0, r["load1"] - own_load) / r["cores"]
        r["waited_s"] = time.monotonic() - t0
        if max_load_per_core is None or r["load_per_core"] <= max_load_per_core:
            return r
        if r["waited_s"] >= wait_s:
            raise MachineBusy(
                f"the machine is busy (1-minute load {r['load1']:.2f} on {r['cores']} cores, "
                f"{r['load_per_core']:.2f} per core > {max_load_per_core}) after waiting {r['waited_s']:.0f} s: "
                "timings taken now would not be reliable. Stop other work and run again, or run the smoke preset."
            )
        time.sleep(poll_s)

"""Thread counts of every library that computes here: Numba, torch and NumPy's OpenBLAS.

Timings are only comparable with thread counts fixed and printed, so one call sets all three
(``set_all_threads``) and ``thread_info`` reports them beside every table.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numba
import numpy as np


def set_threads(n: int) -> None:
    """Use ``n`` threads in Numba kernels and in torch (the baselines timed beside them)."""
    import torch

    max_n = numba.config.NUMBA_NUM_THREADS
    if not 1 <= n <= max_n:
        raise ValueError(f"threads must be in [1, {max_n}] (NUMBA_NUM_THREADS); got {n}")
    numba.set_num_threads(n)
    torch.set_num_threads(n)


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


def set_all_threads(n: int | None) -> int:
    """Numba, torch and NumPy's OpenBLAS all to ``n`` threads (``None``: every core Numba may use); returns n."""
    n = min(n or numba.config.NUMBA_NUM_THREADS, numba.config.NUMBA_NUM_THREADS)
    set_threads(n)
    set_numpy_blas_threads(n)
    return n


def thread_info() -> dict:
    """Thread settings to print beside every timing."""
    import torch

    try:  # only known once a parallel kernel has run
        layer = numba.threading_layer()
    except ValueError:
        layer = "not yet initialised"
    return {
        "numba_threads": numba.get_num_threads(),
        "numba_max_threads": numba.config.NUMBA_NUM_THREADS,
        "numba_threading_layer": layer,
        "torch_threads": torch.get_num_threads(),
        "numpy_openblas_threads": numpy_blas_threads(),
        "cpu_count": os.cpu_count(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
    }

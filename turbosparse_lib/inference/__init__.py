"""Decoding on the CPU: weight formats (``quant``) and their SIMD loops (``simd``), the bundled FFN
(``bundles``), attention (``attention``), the fused decode step (``step``), the decode engine
(``engine``) and its model in NumPy (``reference``), mask providers (``masks``) and thread control
(``threads``); ``kernels`` holds the activations they share, ``validate`` checks every kernel against NumPy."""

from __future__ import annotations

import hashlib
from pathlib import Path


def _drop_stale_kernel_caches() -> None:
    """Numba's ``cache=True`` keys a compiled kernel on its own source file only, but these kernels
    inline each other across files (``bundles`` inlines ``quant``, which inlines ``simd``): after an edit
    of one file another's cached machine code would be stale. So every cached kernel of this package is
    dropped whenever any of its sources changes."""
    here = Path(__file__).parent
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(here.glob("*.py")))).hexdigest()
    cache = here / "__pycache__"
    stamp = cache / "numba-sources.sha256"
    try:
        if stamp.read_text() == digest:
            return
    except OSError:
        pass
    for f in [*cache.glob("*.nbi"), *cache.glob("*.nbc")]:
        f.unlink(missing_ok=True)
    try:
        cache.mkdir(exist_ok=True)
        stamp.write_text(digest)
    except OSError:  # a read-only install: Numba then does not cache here either
        pass


_drop_stale_kernel_caches()

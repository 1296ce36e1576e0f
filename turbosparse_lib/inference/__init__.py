"""Decoding on the CPU: weight formats (``quant``) and their SIMD loops (``simd``), the bundled FFN
(``bundles``), attention (``attention``), the fused decode step (``step``), the decode engines (``engine``,
``moe_engine``; their greedy loop in ``generation``) and their model in NumPy (``reference``), mask providers
(``masks``) and thread control (``threads``); ``kernels`` holds the activations they share, ``validate`` checks
every kernel against NumPy."""

from __future__ import annotations

import hashlib
from pathlib import Path

_HERE = Path(__file__).parent


def sources_digest() -> str:
    """SHA-256 of every source file of this package, as this process loaded them."""
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(_HERE.glob("*.py")))).hexdigest()


# Numba's ``cache=True`` stamps a compiled kernel with its own source file's hash only, but these kernels inline each
# other across files (``bundles`` inlines ``quant``, which inlines ``simd``; ``step`` inlines ``bundles``). Two ways
# that goes stale: an edit of ``quant`` leaves ``bundles``' cached machine code valid in Numba's eyes; and a process
# that imported the old sources (a notebook kernel left running) compiles a new signature after the edit and writes
# old code under the unchanged file's stamp, where every later process loads it. So this package's kernels are
# stamped with the digest of all its sources taken when the process imported them: an entry written by a process
# that saw other sources is stale to every other process and recompiled. Numba's NUMBA_CACHE_DIR, when set, holds
# them instead of the package's ``__pycache__``. (That a kernel loaded from the cache computes the same bits as one
# compiled fresh is ``kernels.FASTMATH``'s doing: no reassociation.)
SOURCES_DIGEST = sources_digest()


def _use_package_stamps() -> bool:
    """Put ``_PackageCacheLocator`` first in Numba's locators (its only hook for this); False if Numba moved it."""
    try:
        from numba.core import caching
    except ImportError:
        return False
    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)  # _CacheImpl in older Numba
    InTreeCacheLocator = getattr(caching, "InTreeCacheLocator", None) or getattr(caching, "_InTreeCacheLocator", None)
    if impl is None or InTreeCacheLocator is None:
        return False

    class _PackageCacheLocator(InTreeCacheLocator):
        """Numba's in-tree ``__pycache__`` locator for this package's files, stamped with ``SOURCES_DIGEST``."""

        def get_source_stamp(self):
            return SOURCES_DIGEST

        def get_cache_path(self):
            from numba.core import config

            return str(Path(config.CACHE_DIR) / __name__) if config.CACHE_DIR else super().get_cache_path()

        @classmethod
        def from_function(cls, py_func, py_file):
            if Path(py_file).resolve().parent != _HERE.resolve():
                return None  # any other file: Numba's own locators
            return super().from_function(py_func, py_file)

    locators = getattr(impl, "_locator_classes", None)
    if not isinstance(locators, list):
        return False
    if not any(c.__name__ == "_PackageCacheLocator" for c in locators):
        locators.insert(0, _PackageCacheLocator)
    return True


def _drop_stale_kernel_caches() -> None:
    """Without the package stamps (a Numba whose locators moved), the next best thing: drop every cached kernel of
    this package when any source changed since the last import. It misses the left-running process above."""
    cache = _HERE / "__pycache__"
    stamp = cache / "numba-sources.sha256"
    try:
        if stamp.read_text() == SOURCES_DIGEST:
            return
    except OSError:
        pass
    for f in [*cache.glob("*.nbi"), *cache.glob("*.nbc")]:
        f.unlink(missing_ok=True)
    try:
        cache.mkdir(exist_ok=True)
        stamp.write_text(SOURCES_DIGEST)
    except OSError:  # a read-only install: Numba then does not cache here either
        pass


PACKAGE_STAMPS = _use_package_stamps()
if not PACKAGE_STAMPS:
    _drop_stale_kernel_caches()

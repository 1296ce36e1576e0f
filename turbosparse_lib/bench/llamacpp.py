"""The llama.cpp baseline (llama-cpp-python, the ``bench`` extra), timed as our engine is."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from time import perf_counter

import numpy as np

from .. import paths
from ..atomic import atomic_path


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
    from ..models.pretrained import gguf_path

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



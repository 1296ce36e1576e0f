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


def _ftype(llama_cpp, fmt: str) -> int:
    ftypes = {
        "f32": llama_cpp.LLAMA_FTYPE_ALL_F32,
        "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
        "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
    }
    if fmt not in ftypes:
        raise ValueError(f"unknown weight format {fmt!r}; valid: {', '.join(ftypes)}")
    return ftypes[fmt]


def smollm2_gguf(fmt: str = "f32", threads: int = 2) -> Path:
    """SmolLM2-135M as a GGUF of type ``fmt`` ('f32', 'q8_0', 'q4_0'), requantised by llama.cpp from the
    shipped Q4_1 file (cached).

    Dequantising Q4_1 gives the same float weights transformers loads, so llama.cpp and our engine
    start from one model. The quantisation is *pure*: every matrix, the token embedding (which is
    also the output matrix: SmolLM2 ties them) included, gets the one format, as in our engine,
    instead of llama.cpp's default of keeping some tensors at a higher precision.
    """
    from ..models.pretrained import gguf_path

    llama_cpp = require_llama_cpp()
    ftype = _ftype(llama_cpp, fmt)
    out = paths.models_dir() / f"smollm2-135m-{fmt}.gguf"
    if out.exists():
        return out
    src = gguf_path()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    params.allow_requantize = True
    params.pure = True
    with atomic_path(out) as tmp, _quiet_stderr():  # llama.cpp logs every tensor to fd 2
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize({src} -> {fmt}) failed with code {rc}")
    return out


def smollm2_f32_gguf(threads: int = 2) -> Path:
    """``smollm2_gguf('f32')``: the precision of our float32 engine."""
    return smollm2_gguf("f32", threads)


class LlamaCppRun:
    """Greedy decoding with llama.cpp (llama-cpp-python) on a GGUF file, timed as ``EngineRun`` is.

    The logits of the last token are read straight from the context (``llama_get_logits_ith``),
    a view without a copy, and the greedy argmax is taken in NumPy as for our engine.
    ``precision`` names the GGUF's weight format, for the bytes-per-token bookkeeping.
    """

    def __init__(self, gguf: Path, threads: int, n_ctx: int = 512, precision: str = "f32"):
        llama_cpp = self._lib = require_llama_cpp()
        _ftype(llama_cpp, precision)
        self.llm = llama_cpp.Llama(
            model_path=str(gguf),
            n_threads=threads,
            n_threads_batch=threads,
            n_ctx=n_ctx,
            n_batch=n_ctx,
            logits_all=False,
            verbose=False,
        )
        self.threads, self.profile = threads, {}
        self.precision, self.masks = precision, None  # dense, for decoding_limits

    def close(self) -> None:
        """Free the model and context now (at interpreter exit llama-cpp-python's own cleanup can fail)."""
        self.llm.close()

    def _last_logits(self) -> np.ndarray:
        return np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.llm.n_vocab(),))

    def _next_token(self) -> int:
        return int(np.argmax(self._last_logits()))

    def prompt_logits(self, prompt_ids: np.ndarray) -> np.ndarray:
        """The logits (a copy) after evaluating ``prompt_ids`` from an empty cache."""
        self.llm.reset()
        self.llm.eval([int(t) for t in prompt_ids])
        return self._last_logits().copy()

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


def llama_cpp_chunk_logits(gguf: Path, ids: np.ndarray, chunk: int, threads: int):
    """For each chunk of ``chunk`` tokens of ``ids`` (each evaluated from an empty cache, every position's logits
    kept): (logits after tokens 0..t-1 of the chunk, float64 (n - 1, V); the tokens they predict, (n - 1,))."""
    llama_cpp = require_llama_cpp()
    llm = llama_cpp.Llama(
        model_path=str(gguf),
        n_threads=threads,
        n_threads_batch=threads,
        n_ctx=chunk,
        n_batch=chunk,
        logits_all=True,
        verbose=False,
    )
    try:
        for lo in range(0, len(ids) - 1, chunk):
            part = [int(t) for t in ids[lo : lo + chunk]]
            if len(part) < 2:
                break
            llm.reset()
            llm.eval(part)
            yield np.asarray(llm.scores[: len(part) - 1], dtype=np.float64), np.asarray(part[1:])
    finally:
        llm.close()


def llama_cpp_nll(gguf: Path, ids: np.ndarray, chunk: int, threads: int) -> np.ndarray:
    """Negative log-likelihood (nats) of every token of ``ids`` after the first of its chunk, by llama.cpp.

    ``ids`` is cut into chunks of ``chunk`` tokens, each evaluated from an empty cache with the logits
    of every position kept; token t of a chunk is scored from the logits after token t - 1, as
    ``quality.engine_nll`` scores our engine on the same chunks.
    """
    return np.concatenate([next_token_nll(z, nxt) for z, nxt in llama_cpp_chunk_logits(gguf, ids, chunk, threads)])


def next_token_nll(logits_TV: np.ndarray, next_T: np.ndarray) -> np.ndarray:
    z = logits_TV - logits_TV.max(axis=1, keepdims=True)
    return np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(next_T)), next_T]

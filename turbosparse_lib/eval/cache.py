"""Evaluation results remembered by the model they came from, so that a rerun does not recompute them.

Notebook 05 evaluates seven ReLUfied models for about fifty minutes on 2 cores; a rerun after a new run was added,
or after a kill, needs only the models it has not seen. ``remember(name, model, settings, compute)`` returns
``compute()``'s JSON-able result, from ``data/cache/evals/<name>/`` when the same evaluation of the same model
has been done before. The key holds:

- the model, bit for bit: every parameter and buffer, and every module's description (a dReLU and a SwiGLU
  model with the same weights differ only there: the variant is not a weight);
- the evaluation's name and settings (token ids are hashed; anything else must be JSON);
- the source of the evaluation code (``eval/``, ``sparsity/`` and ``models/``) and the torch and transformers
  versions: editing how a number is computed invalidates every number computed before.

Entries are written atomically; an unreadable one is recomputed. ``TURBOSPARSE_EVAL_CACHE=0`` turns the cache
off (every call computes).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import paths
from ..atomic import write_json


def cache_root() -> Path:
    return paths.cache_dir() / "evals"


def enabled() -> bool:
    return os.environ.get("TURBOSPARSE_EVAL_CACHE", "1") not in ("0", "false", "no")


def model_fingerprint(model: torch.nn.Module) -> str:
    """A digest of ``model``'s class, module descriptions and every tensor of its state, bit for bit."""
    h = hashlib.blake2b(digest_size=20)
    h.update(type(model).__qualname__.encode())
    for name, mod in model.named_modules():  # the activations (act_fn, up_act_fn) are submodules too
        h.update(f"{name}:{type(mod).__qualname__}({mod.extra_repr()})".encode())
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@cache
def code_fingerprint() -> str:
    """A digest of the code an evaluation runs: the sources of ``eval/``, ``sparsity/`` (instruments, masks) and
    ``models/`` (the variants' forward passes), and the torch and transformers versions (read once per process)."""
    import transformers

    root = Path(__file__).resolve().parents[1]
    h = hashlib.blake2b(digest_size=20)
    h.update(f"torch {torch.__version__} transformers {transformers.__version__}".encode())
    for folder in ("eval", "sparsity", "models"):
        for p in sorted((root / folder).rglob("*.py")):
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def result_to_json(r) -> dict:
    """A ``perplexity.PerplexityResult`` as JSON (its per-window sums included, for intervals)."""
    return {
        **{k: getattr(r, k) for k in ("ppl", "nll", "n_tokens", "n_windows", "context_length", "stride")},
        "window_nll": None if r.window_nll is None else np.asarray(r.window_nll).tolist(),
        "window_tokens": None if r.window_tokens is None else np.asarray(r.window_tokens).tolist(),
    }


def result_from_json(d: dict):
    from .perplexity import PerplexityResult

    arrays = {k: None if d[k] is None else np.asarray(d[k]) for k in ("window_nll", "window_tokens")}
    return PerplexityResult(**{**d, **arrays})


def _jsonable(value: Any) -> Any:
    """Settings made hashable: tensors and arrays by digest, everything else as JSON."""
    if isinstance(value, torch.Tensor | np.ndarray):
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        arr = np.ascontiguousarray(arr)
        return {"array": hashlib.blake2b(arr.tobytes(), digest_size=20).hexdigest(), "shape": list(arr.shape)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot key an evaluation on a {type(value).__name__}: pass JSON values, tensors or arrays")


def entry_path(name: str, model: torch.nn.Module | str, settings: dict) -> Path:
    """Where the result is kept; ``model`` may be its ``model_fingerprint`` already (one digest, several lookups)."""
    fingerprint = model if isinstance(model, str) else model_fingerprint(model)
    key = json.dumps(
        {"model": fingerprint, "code": code_fingerprint(), "settings": _jsonable(settings)},
        sort_keys=True,
    )
    return cache_root() / name / f"{hashlib.blake2b(key.encode(), digest_size=20).hexdigest()}.json"


def remember(name: str, model: torch.nn.Module | str | None, settings: dict, compute: Callable[[], Any]) -> Any:
    """``compute()`` (a JSON-able result), or what it returned before for the same model, settings and code.
    ``model=None`` (a caller that did not ask for the cache) or ``TURBOSPARSE_EVAL_CACHE=0``: always computes."""
    if model is None or not enabled():
        return compute()
    path = entry_path(name, model, settings)
    if path.exists():
        try:
            return json.loads(path.read_text())["result"]
        except (json.JSONDecodeError, KeyError, OSError):
            pass  # unreadable: computed again and overwritten
    result = compute()
    write_json(path, {"name": name, "settings": _jsonable(settings), "result": result})
    return result

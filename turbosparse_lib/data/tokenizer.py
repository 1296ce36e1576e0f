"""The byte-level BPE tokenizer trained on our training split.

- Byte-level BPE (GPT-2 style) with ``tokenizers``: no unknown tokens, any text round-trips.
- 8192 tokens by default: small models want a small vocabulary (with SmolLM2's 49k
  tokens the embedding would dominate a 5M-parameter model).
- One special token, ``<|endoftext|>``, separates documents and doubles as BOS/EOS/PAD.
- Deterministic: training reads the documents in the corpus' fixed order, and the
  test suite trains twice and compares the two files byte for byte.
- Loaded as a transformers ``PreTrainedTokenizerFast`` so every HF tool accepts it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from .. import paths
from ..atomic import atomic_path

EOS = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 8192


def tokenizer_path() -> Path:
    return paths.built_dir() / "tokenizer" / "tokenizer.json"


def train_bpe(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE on ``texts`` (an iterable of documents)."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok: Tokenizer, path: Path | None = None) -> Path:
    path = path or tokenizer_path()
    with atomic_path(path) as tmp:
        tok.save(str(tmp))
    return path


def load_tokenizer(path: Path | None = None) -> PreTrainedTokenizerFast:
    """Our trained tokenizer as a transformers fast tokenizer."""
    path = Path(path or tokenizer_path())
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer at {path}: run `turbosparse-data` (or `turbosparse_lib.data.build.build_all()`) first")
    return PreTrainedTokenizerFast(
        tokenizer_file=str(path), bos_token=EOS, eos_token=EOS, pad_token=EOS, unk_token=None, model_max_length=1 << 30
    )

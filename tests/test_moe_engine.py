"""The MoE decode engine against transformers (greedy, fp32), sparse experts against dense, and its bench runs."""

import numpy as np
import pytest
import torch
from test_moe import CONFIGS, tiny

from turbosparse_lib.bench.bytes_model import bytes_per_token
from turbosparse_lib.bench.decoding import bench_decoding, decoding_limits
from turbosparse_lib.bench.moe_decoding import MoERun, moe_profile_table, moe_runs, moe_shape
from turbosparse_lib.inference.moe_engine import SHARED, ExpertExactZeroOracle, MoEEngine, RecordedExpertMasks
from turbosparse_lib.models.architecture import MoEConfig
from turbosparse_lib.models.build import build_model
from turbosparse_lib.models.swap import apply_variant

NEW = 8


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(2))


def sharpened(family: str, variant: str):
    """A tiny model with weights x5, so that routing and greedy choices are not near ties."""
    model = apply_variant(tiny(family), variant)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(5.0)
    return model


def hf_greedy(model, prompt):
    with torch.no_grad():
        out = model.generate(
            prompt,
            max_new_tokens=NEW,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    return out.sequences[0, prompt.shape[1] :].numpy(), torch.stack(out.scores)[:, 0].numpy()


@pytest.mark.parametrize("variant", ["swiglu", "drelu"])
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_moe_decoding_matches_transformers(family, variant, prompt):
    model = sharpened(family, variant)
    want_tokens, want_logits = hf_greedy(model, prompt)
    eng = MoEEngine.from_transformers(model)
    tokens, got_logits = eng.generate(prompt[0].numpy(), NEW, return_logits=True)
    assert np.array_equal(tokens, want_tokens)
    np.testing.assert_allclose(got_logits, want_logits, atol=2e-5 * np.abs(want_logits).max())
    # sparse experts over their exact non-zero neurons: the same tokens (lossless)
    assert np.array_equal(eng.generate(prompt[0].numpy(), NEW, sparse=True), tokens)


def test_native_experts_decode_too(prompt):
    model = tiny("mixtral")  # no swap: transformers' fused experts are read directly
    assert np.array_equal(
        MoEEngine.from_transformers(model).generate(prompt[0].numpy(), NEW), hf_greedy(model, prompt)[0]
    )


def test_exact_zero_masks_are_the_nonzero_neurons_and_replay_bit_for_bit(prompt):
    eng = MoEEngine.from_transformers(sharpened("qwen2_moe", "drelu"))
    oracle, h = ExpertExactZeroOracle(eng), np.random.default_rng(0).standard_normal(32).astype(np.float32)
    for e in (0, 3, SHARED):
        w = eng.ffn_weights(0, e)
        c = np.maximum(w.w_gate_NH @ h, 0) * np.maximum(w.w_up_NH @ h, 0)
        assert np.array_equal(oracle(0, e, h), np.flatnonzero(c))
    rec = RecordedExpertMasks(ExpertExactZeroOracle(eng))
    first = eng.generate(prompt[0].numpy(), NEW, sparse=True, mask_provider=rec, return_logits=True)
    rec.rewind()
    again = eng.generate(prompt[0].numpy(), NEW, sparse=True, mask_provider=rec, return_logits=True)
    assert np.array_equal(first[1], again[1])
    profile = {}
    eng.generate(prompt[0].numpy(), NEW, sparse=True, profile=profile)
    assert profile["tokens"] == NEW - 1 and profile["ffn_calls"] == (NEW - 1) * 2  # one MoE layer, top-2
    assert 0 < profile["active_neurons"] < profile["ffn_calls"] * eng.config.intermediate_size


def test_routing_is_softmax_topk_renormalised():
    eng = MoEEngine.from_transformers(tiny("mixtral"))
    h = np.random.default_rng(1).standard_normal(32).astype(np.float32)
    experts, weights = eng.route(0, h)
    logits = eng.layers[0].router_EH @ h
    p = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert list(experts) == sorted(np.argsort(-p)[:2]) and weights.sum() == pytest.approx(1.0)
    assert weights[0] / weights[1] == pytest.approx(p[experts[0]] / p[experts[1]], rel=1e-5)


def test_unsupported_models_raise_clear_errors():
    with pytest.raises(TypeError, match="MoEEngine supports model types"):
        MoEEngine.from_transformers(build_model("drelu", preset="smoke"))
    eng = MoEEngine.from_transformers(tiny("qwen2_moe"))
    with pytest.raises(NotImplementedError, match="routed experts only"):
        moe_shape(eng)
    with pytest.raises(ValueError, match="masks must be one of"):
        MoERun(eng, masks="topk")


def test_dense_and_sparse_expert_runs_with_bytes_per_token(prompt):
    model = build_model(
        "drelu",
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        vocab_size=128,
        moe=MoEConfig(4, 2, 32),
        seed=0,
    ).eval()
    eng = MoEEngine.from_transformers(model)
    runs, legend = moe_runs(eng, "tiny dReLU MoE")
    speed, tokens = bench_decoding(runs, prompt[0].numpy(), new_tokens=6, repeats=1)
    names = list(runs)
    assert all(np.array_equal(tokens[n], tokens[names[0]]) for n in names)  # exact zeros: lossless
    assert speed.same_tokens_each_run.all() and list(legend.index) == names
    shape = moe_shape(eng, "tiny")
    limits = decoding_limits(shape, runs, speed, 5, 6, 10.0, {"f32": names[0]})
    dense, sparse = limits.loc[names[0]], limits.loc[names[1]]
    assert dense.ffn_active == 1.0 and 0 < sparse.ffn_active < 1 and sparse.byte_limit > 1
    routed_ffn = bytes_per_token(shape, None)["ffn"]
    assert routed_ffn == 2 * 2 * 3 * 32 * 32 * 4  # layers x top-2 experts x 3 matrices x F x H x 4 bytes
    prof = moe_profile_table(runs)
    assert (prof.expert_calls_per_token == 4).all() and prof.loc[names[0], "ffn_active"] == 1.0


def test_both_engines_decode_with_one_greedy_loop_and_its_checks(prompt, monkeypatch):
    """The dense and the MoE engine share ``generation.greedy`` and its prompt checks (the MoE copy had none)."""
    from tiny_models import hf_llama

    from turbosparse_lib.inference import generation
    from turbosparse_lib.inference.engine import Engine

    eng = MoEEngine.from_transformers(sharpened("qwen2_moe", "drelu"))
    V = eng.config.vocab_size
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0"):
        eng.generate([1, 2], -1)
    with pytest.raises(ValueError, match=r"\[0, "):
        eng.generate([1, V], 1)
    with pytest.raises(ValueError, match="integer token ids"):
        eng.generate([1.5, 2.0], 1)
    calls = []
    real = generation.greedy
    monkeypatch.setattr(generation, "greedy", lambda *a, **k: calls.append(1) or real(*a, **k))
    tokens, logits = eng.generate(prompt[0].numpy(), 3, return_logits=True)
    assert len(calls) == 1 and tokens.shape == (3,) and logits.shape == (3, V)
    np.testing.assert_array_equal(tokens, logits.argmax(axis=1))
    Engine.from_transformers(hf_llama()).generate(prompt[0].numpy() % 64, 2)  # its vocabulary: 64
    assert len(calls) == 2

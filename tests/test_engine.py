"""The CPU decode engine against transformers on tiny random Llama/Mistral models."""

from dataclasses import replace

import numpy as np
import pytest
import tiny_models
import torch
from torch import nn
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from turbosparse_lib.inference import step as step_kernels
from turbosparse_lib.inference.engine import Engine, EngineConfig
from turbosparse_lib.inference.masks import ExactZeroOracle, RecordedMasks, TopKOracle

PROMPT_LEN, NEW_TOKENS = 8, 16
TINY = dict(
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=64,
    initializer_range=0.1,  # larger than the default 0.02, so logits are far from ties
)


class DReLUMLP(nn.Module):
    """relu(gate) * relu(up) -> down (paper eq. 2), with the Llama attribute names."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def forward(self, x):
        return self.down_proj(torch.relu(self.gate_proj(x)) * torch.relu(self.up_proj(x)))


def _tiny(model_cls=LlamaForCausalLM, config_cls=LlamaConfig, seed=0, **overrides):
    return tiny_models.hf_llama(seed, model_cls, config_cls, **{**TINY, **overrides})


def _drelu(model):
    for layer in model.model.layers:
        layer.mlp = DReLUMLP(layer.mlp)
    model.config.mlp_variant = "drelu"
    return model


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, TINY["vocab_size"], (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))


def _trained_like_norms(model):
    """RMSNorm weights drawn in [0.5, 1.5] instead of their initial 1. At 1, a Q4_0 embedding row (small
    integers times one scale) normalises to values exactly halfway between two Q8_0 activation steps, so a
    one-ulp difference in the norm (float order) decides the rounding and moves the logits of this 64-wide
    model by about 1%. Trained models have no such ties."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(3))
    return model


@pytest.fixture(scope="module")
def drelu_engine():
    return Engine.from_transformers(_trained_like_norms(_drelu(_tiny(seed=2))))


def _hf_greedy(model, prompt):
    """transformers' greedy tokens, and the logits each was chosen from (one full forward)."""
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
        logits = model(out).logits[0, PROMPT_LEN - 1 : -1]
    return out[0, PROMPT_LEN:].numpy(), logits.numpy()


def _check_against_hf(model, prompt):
    engine = Engine.from_transformers(model)
    tokens, logits = engine.generate(prompt[0].numpy(), NEW_TOKENS, return_logits=True)
    hf_tokens, hf_logits = _hf_greedy(model, prompt)
    np.testing.assert_array_equal(tokens, hf_tokens)
    np.testing.assert_allclose(logits, hf_logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("tied", [False, True])
def test_dense_decoding_matches_transformers(prompt, tied):
    _check_against_hf(_tiny(tie_word_embeddings=tied), prompt)


def test_attention_bias_and_rope_theta_match_transformers(prompt):
    rope = {"rope_type": "default", "rope_theta": 500.0}
    _check_against_hf(_tiny(attention_bias=True, rope_parameters=rope), prompt)


@pytest.mark.parametrize("tied", [False, True])
def test_qwen2_matches_transformers(prompt, tied):
    """Qwen2: biases on q, k and v (drawn non-zero: transformers initialises them to zero) and none on o; the
    sliding window it records beside use_sliding_window=False is not applied; with use_sliding_window=True the
    layers from max_window_layers on slide and the ones before do not."""
    model = _tiny(Qwen2ForCausalLM, Qwen2Config, tie_word_embeddings=tied)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(4))
    assert model.model.layers[0].self_attn.o_proj.bias is None
    _check_against_hf(model, prompt)
    _check_against_hf(_tiny(Qwen2ForCausalLM, Qwen2Config, use_sliding_window=False, sliding_window=3), prompt)
    mixed = _tiny(Qwen2ForCausalLM, Qwen2Config, use_sliding_window=True, sliding_window=3, max_window_layers=1)
    assert list(Engine.from_transformers(mixed).config.windows_L) == [0, 3]
    _check_against_hf(mixed, prompt)


@pytest.mark.parametrize("tied", [False, True])
def test_qwen3_matches_transformers(prompt, tied):
    """Qwen3: an RMSNorm on every q head and every k head before RoPE (weights drawn away from their initial 1), a
    head_dim that is not hidden / heads, and its dReLU swap decoded dense and sparse, in every format: the fused
    step equals the unfused engine bit for bit, and a quantised engine matches its NumPy reference."""
    from turbosparse_lib.models.swap import apply_variant

    model = _trained_like_norms(_tiny(Qwen3ForCausalLM, Qwen3Config, tie_word_embeddings=tied, head_dim=16))
    assert model.model.layers[0].self_attn.q_norm.weight.shape == (16,)
    _check_against_hf(model, prompt)
    drelu = apply_variant(model, "drelu")
    _check_against_hf(drelu, prompt)
    _check_every_path(Engine.from_transformers(drelu), prompt)


def _check_every_path(base: Engine, prompt):
    """In f32 and Q8_0: the fused step (dense, in-line exact zeros, a Python provider) equals the unfused engine bit
    for bit, and the engine matches its NumPy reference."""
    ids = prompt[0].numpy()
    for fmt in ("f32", "q8_0"):
        engine = base.quantized(fmt)
        dense_tokens, dense_logits = engine.generate(ids, NEW_TOKENS, return_logits=True, fused=False)
        for kw in (dict(), dict(sparse=True), dict(sparse=True, mask_provider=_PythonPredictor(engine))):
            tokens, logits = engine.generate(ids, NEW_TOKENS, return_logits=True, **kw)
            np.testing.assert_array_equal(logits, dense_logits, err_msg=f"{fmt} {kw}")
        ref = engine.reference_logits(np.concatenate([ids, dense_tokens[:-1]]))[PROMPT_LEN - 1 :]
        np.testing.assert_allclose(dense_logits, ref, rtol=0, atol=1e-3 * np.abs(ref).max())


GEMMA = {  # a window shorter than prompt + new tokens, and every layer kind; soft-caps low enough to bite
    "gemma": (GemmaForCausalLM, GemmaConfig, {}),
    "gemma2": (
        Gemma2ForCausalLM,
        Gemma2Config,
        dict(sliding_window=5, attn_logit_softcapping=2.0, final_logit_softcapping=3.0, query_pre_attn_scalar=12),
    ),
    "gemma3": (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        dict(sliding_window=5, sliding_window_pattern=2, final_logit_softcapping=4.0, query_pre_attn_scalar=12),
    ),
}


@pytest.mark.parametrize("name", GEMMA)
def test_gemma_matches_transformers(prompt, name):
    """Gemma 1/2/3 (text): norms of 1 + weight (weights drawn away from 0), the embedding scaled by sqrt(hidden),
    GeGLU; Gemma 2/3: norms after attention and after the FFN, query_pre_attn_scalar, sliding and full layers
    (Gemma 3: each kind with its own RoPE theta), soft-capped logits; Gemma 2: soft-capped scores. Then its dReLU swap
    dense and sparse in every format, as for Qwen3."""
    from turbosparse_lib.models.swap import apply_variant

    model_cls, config_cls, extra = GEMMA[name]
    model = _trained_like_norms(_tiny(model_cls, config_cls, head_dim=16, **extra))
    engine = Engine.from_transformers(model)
    assert engine.config.mlp_variant == "geglu" and engine.config.embed_scale == np.float32(8.0)
    if name != "gemma":
        assert list(engine.config.windows_L) == [5, 0] and engine.weights.post_ffn_norm_LH is not None
    if name == "gemma3":
        assert engine.config.rope_thetas == (1e4, 1e6) and list(engine.config.layer_rope_L) == [0, 1]
    _check_against_hf(model, prompt)
    drelu = apply_variant(model, "drelu")
    _check_against_hf(drelu, prompt)
    _check_every_path(Engine.from_transformers(drelu), prompt)


def test_gemma_settings_change_the_logits(prompt):
    """Each Gemma setting the engine reads matters on the tiny model, so the test above would catch one ignored."""
    model_cls, config_cls, extra = GEMMA["gemma2"]
    model = _trained_like_norms(_tiny(model_cls, config_cls, head_dim=16, **extra))
    ids = prompt[0].numpy()
    want = Engine.from_transformers(model).reference_logits(ids)
    for change in (
        dict(embed_scale=1.0),
        dict(attn_softcap=0.0),
        dict(final_softcap=0.0),
        dict(attention_scale=None),
        dict(layer_windows=None, sliding_window=None),
    ):
        engine = Engine.from_transformers(model)
        engine.config = replace(engine.config, **change)
        engine.reset(len(ids))
        assert np.abs(engine.reference_logits(ids) - want).max() > 1e-3, change


def test_mistral_sliding_window_matches_transformers(prompt):
    # a window shorter than the prompt, so the window is exercised in prefill and decoding
    _check_against_hf(_tiny(MistralForCausalLM, MistralConfig, sliding_window=5), prompt)


def test_drelu_dense_matches_transformers(prompt):
    _check_against_hf(_drelu(_tiny(seed=2)), prompt)


def test_sparse_exact_zero_oracle_equals_dense(drelu_engine, prompt):
    ids = prompt[0].numpy()
    dense_tokens, dense_logits = drelu_engine.generate(ids, NEW_TOKENS, return_logits=True)
    profile = {}
    tokens, logits = drelu_engine.generate(ids, NEW_TOKENS, sparse=True, profile=profile, return_logits=True)
    np.testing.assert_array_equal(tokens, dense_tokens)
    np.testing.assert_allclose(logits, dense_logits, rtol=0, atol=1e-5)
    # exact zeros are skipped: random dReLU keeps about a quarter of the neurons
    N = drelu_engine.config.intermediate_size
    active_fraction = profile["active_neurons"] / (profile["ffn_calls"] * N)
    assert 0.1 < active_fraction < 0.5
    assert profile["tokens"] == NEW_TOKENS - 1  # the first new token comes from prefill
    assert {"embed", "attention", "mask", "ffn", "lm_head"} <= profile.keys()


def test_topk_without_sparsity_equals_dense_and_topk_is_lossy(drelu_engine, prompt):
    ids = prompt[0].numpy()
    dense_tokens, dense_logits = drelu_engine.generate(ids, NEW_TOKENS, return_logits=True)
    tokens, logits = drelu_engine.generate(
        ids, NEW_TOKENS, sparse=True, mask_provider=TopKOracle(drelu_engine, 0.0), return_logits=True
    )
    np.testing.assert_array_equal(tokens, dense_tokens)
    np.testing.assert_allclose(logits, dense_logits, rtol=0, atol=1e-5)
    _, logits_90 = drelu_engine.generate(
        ids, NEW_TOKENS, sparse=True, mask_provider=TopKOracle(drelu_engine, 0.9), return_logits=True
    )
    assert np.abs(logits_90 - dense_logits).max() > 1e-4  # 90% top-k drops live neurons
    x_H = np.ones(drelu_engine.config.hidden_size, np.float32)
    assert TopKOracle(drelu_engine, 1.0)(0, x_H).shape == (0,)


def test_predicted_mask_interface(drelu_engine, prompt):
    """A predictor is any callable (layer_idx, x_normed_H) -> indices: a superset of the oracle's
    active set (plus false positives that the kernel then finds to be zero) changes nothing."""
    oracle, seen = ExactZeroOracle(drelu_engine), []

    def predictor(layer_idx, x_H):
        seen.append(layer_idx)
        extra = np.arange(0, drelu_engine.config.intermediate_size, 3)
        return np.union1d(oracle(layer_idx, x_H), extra)[::-1]  # unsorted on purpose

    ids = prompt[0].numpy()
    dense_tokens = drelu_engine.generate(ids, NEW_TOKENS)
    tokens = drelu_engine.generate(ids, NEW_TOKENS, sparse=True, mask_provider=predictor)
    np.testing.assert_array_equal(tokens, dense_tokens)
    assert seen[:2] == [0, 1]


class _PythonPredictor:
    """A mask provider the engine cannot fuse (a plain callable): the per-layer path, provider in Python."""

    def __init__(self, engine):
        self.oracle = ExactZeroOracle(engine)

    def __call__(self, layer_idx, x_H):
        return self.oracle(layer_idx, x_H)


class _UnsortedSuperset:
    """The live neurons plus every third one, in descending order: false positives and an order to repair."""

    def __init__(self, engine):
        self.oracle, self.n = ExactZeroOracle(engine), engine.config.intermediate_size

    def __call__(self, layer_idx, x_H):
        return np.union1d(self.oracle(layer_idx, x_H), np.arange(0, self.n, 3))[::-1]


@pytest.mark.parametrize("fmt", ["f32", "q8_0", "q4_0"])
def test_fused_step_equals_the_unfused_engine_on_every_path(drelu_engine, prompt, fmt):
    """Dense, exact oracle in line, recorded masks replayed, a Python provider between the layer halves, a mask of
    every neuron and an unsorted superset of the live neurons: the unfused engine's (one kernel per op) logits bit
    for bit, in every format. Each thread sums a fixed range of neuron indices, so no path changes the float order;
    split by list position instead, the Q formats' activation quantisation turned the last bits into half a
    logit on SmolLM2 at Q8_0."""
    engine, ids = drelu_engine.quantized(fmt), prompt[0].numpy()
    dense_tokens, dense_logits = engine.generate(ids, NEW_TOKENS, return_logits=True, fused=False)
    scale = np.abs(dense_logits).max()
    replay = RecordedMasks(ExactZeroOracle(engine))
    engine.generate(ids, NEW_TOKENS, sparse=True, mask_provider=replay)  # records
    replay.rewind()
    runs = {
        "dense": dict(),
        "in-line oracle": dict(sparse=True),
        "unfused oracle": dict(sparse=True, fused=False),
        "replayed": dict(sparse=True, mask_provider=replay),
        "python provider": dict(sparse=True, mask_provider=_PythonPredictor(engine)),
        "every neuron": dict(sparse=True, mask_provider=TopKOracle(engine, 0.0)),
        "unsorted superset": dict(sparse=True, mask_provider=_UnsortedSuperset(engine)),
    }
    for name, kw in runs.items():
        tokens, logits = engine.generate(ids, NEW_TOKENS, return_logits=True, **kw)
        np.testing.assert_array_equal(tokens, dense_tokens, err_msg=name)
        np.testing.assert_array_equal(logits, dense_logits, err_msg=name)
    assert scale > 0


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_dense_layout_serves_dense_runs_and_leaves_sparse_ones_on_the_bundles(drelu_engine, prompt, fmt):
    """A dense-layout engine decodes dense from llama.cpp's layout, fused as unfused, close to the bundled dense run
    (the two quantise the down projection along different axes); its sparse paths read the bundles and give the
    bundled engine's dense logits bit for bit."""
    bundled, engine = drelu_engine.quantized(fmt), drelu_engine.quantized(fmt, dense_layout=True)
    assert engine is not bundled and drelu_engine.quantized(fmt, dense_layout=True) is engine
    assert engine.weights.ffn.dense_layout and not bundled.weights.ffn.dense_layout
    assert drelu_engine.quantized("f32", dense_layout=True) is drelu_engine  # f32 keeps the bundles' dense path
    ids = prompt[0].numpy()
    _, logits = engine.generate(ids, NEW_TOKENS, return_logits=True)
    _, unfused = engine.generate(ids, NEW_TOKENS, return_logits=True, fused=False)
    np.testing.assert_array_equal(logits, unfused)
    forced = np.concatenate([ids, ids[::-1]])  # teacher-forced, step by step (prefill is a dense run)
    bundled.reset(len(forced))
    want = np.stack([bundled.step(int(t)) for t in forced])
    engine.reset(len(forced))
    off = np.abs(np.stack([engine.step(int(t)) for t in forced]) - want).max() / np.abs(want).max()
    assert 0 < off < (0.1 if fmt == "q8_0" else 0.5)  # the bounds of quantisation against float, below
    for kw in (dict(sparse=True), dict(sparse=True, mask_provider=TopKOracle(engine, 0.0))):
        engine.reset(len(forced))
        np.testing.assert_array_equal(np.stack([engine.step(int(t), **kw) for t in forced]), want)
    assert engine.weights.nbytes > bundled.weights.nbytes


@pytest.mark.parametrize("fmt,off_float", [("q8_0", 0.1), ("q4_0", 0.5)])
def test_quantised_engine_matches_its_numpy_reference(prompt, fmt, off_float):
    """Tolerance: the kernels may differ from the NumPy model by float summation order, and a different
    order can move an activation across a rounding boundary of its Q8_0 block: 1e-3 of the logit scale.
    The model's RMSNorm weights are not 1 (see ``_trained_like_norms``)."""
    base = Engine.from_transformers(_trained_like_norms(_drelu(_tiny(seed=2))))
    engine, ids = base.quantized(fmt), prompt[0].numpy()
    assert base.quantized(fmt) is engine and engine.quantized(fmt) is engine and engine.fmt == fmt
    tokens, logits = engine.generate(ids, NEW_TOKENS, return_logits=True)
    ref = engine.reference_logits(np.concatenate([ids, tokens[:-1]]))[PROMPT_LEN - 1 :]
    np.testing.assert_allclose(logits, ref, rtol=0, atol=1e-3 * np.abs(ref).max())
    np.testing.assert_array_equal(tokens, ref.argmax(-1))
    # the reference is the quantised model, not the float one: quantisation moves the logits
    float_ref = base.reference_logits(np.concatenate([ids, tokens[:-1]]))[PROMPT_LEN - 1 :]
    off = np.abs(ref - float_ref).max() / np.abs(float_ref).max()
    assert 1e-4 < off < off_float
    with pytest.raises(ValueError, match="float32 engine"):
        engine.quantized("q4_0" if fmt == "q8_0" else "q8_0")
    assert engine.weights.nbytes < base.weights.nbytes / (3 if fmt == "q8_0" else 6)


def test_profile_splits_a_fused_token(drelu_engine, prompt):
    profile = {}
    drelu_engine.generate(prompt[0].numpy(), 4, sparse=True, profile=profile)
    assert profile["tokens"] == 3 and profile["ffn_calls"] == 3 * drelu_engine.config.num_layers
    assert profile["rows_gate"] == 3 * 2 * drelu_engine.config.intermediate_size  # the oracle reads every gate row
    assert 0 < profile["rows_down"] == profile["active_neurons"] < profile["rows_up"] < profile["rows_gate"]
    parts = ("embed", "attention", "mask", "ffn", "lm_head")
    if step_kernels.seconds_per_tick() == step_kernels.seconds_per_tick():  # not NaN: a time-stamp counter
        assert all(profile[k] > 0 for k in ("attention", "ffn", "lm_head")) and profile["mask"] == 0
    assert sum(profile[k] for k in (*parts, "other")) > 0


def test_bad_masks_and_tokens_raise(drelu_engine, prompt):
    ids = prompt[0].numpy()
    with pytest.raises(IndexError, match="outside"):
        drelu_engine.generate(ids, 3, sparse=True, mask_provider=lambda li, x: np.array([10_000]))
    with pytest.raises(ValueError, match="duplicates"):
        drelu_engine.generate(ids, 3, sparse=True, mask_provider=lambda li, x: np.array([5, 1, 5]))
    with pytest.raises(IndexError, match="vocabulary"):
        drelu_engine.step(TINY["vocab_size"])
    drelu_engine.reset()
    with pytest.raises(ValueError, match="layers"):

        class Short:
            def token_masks(self, n_layers):
                return np.zeros(2, np.int64), np.zeros(0, np.int64)

        drelu_engine.step(1, sparse=True, mask_provider=Short())


def test_unsupported_models_raise_clear_errors():
    scaled = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(NotImplementedError, match="rope type 'linear'"):
        Engine.from_transformers(_tiny(rope_parameters=scaled))
    with pytest.raises(NotImplementedError, match="gelu_pytorch_tanh"):  # erf GELU: no variant computes it
        Engine.from_transformers(_tiny(hidden_act="gelu"))
    with pytest.raises(TypeError, match="Llama, Mistral, Qwen2, Qwen3 and Gemma"):
        Engine.from_transformers(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="num_kv_heads"):
        EngineConfig(64, 128, 1, num_heads=4, num_kv_heads=3, head_dim=16, vocab_size=10)


def test_one_registry_drives_torch_kernels_and_engine(prompt):
    """A variant registered once (here: a squared-ReLU gate with a ReLU up branch) runs in the torch
    module, the Numba kernels and the engine, with no other change, and they agree."""
    from turbosparse_lib.inference import kernels as K
    from turbosparse_lib.inference.bundles import FFNBundles, combined
    from turbosparse_lib.models import variants as V
    from turbosparse_lib.models.swap import apply_variant

    spec = V.GatedVariant("drelu2", "relu2", "relu", "relu(gate)**2 * relu(up)")
    V.register_variant(spec)
    try:
        model = apply_variant(_tiny(seed=4), "drelu2")  # 1. torch: GatedMLP built from the registry
        rng = np.random.default_rng(0)
        g, u = rng.standard_normal((2, 50), dtype=np.float32)
        want = V.combined_activation("drelu2", torch.from_numpy(g), torch.from_numpy(u)).numpy()
        np.testing.assert_allclose(K.combine_ref(g, u, "drelu2"), want, rtol=1e-6)  # 2. the kernels' reference
        W = rng.standard_normal((50, 8), dtype=np.float32)
        x = rng.standard_normal(8, dtype=np.float32)
        ffn = FFNBundles.from_weights(W, W[::-1].copy(), np.ones((8, 50), np.float32), "f32")
        np.testing.assert_allclose(
            combined(ffn, x, "drelu2"), K.combine_ref(W @ x, W[::-1] @ x, "drelu2"), rtol=1e-5, atol=1e-6
        )
        engine = Engine.from_transformers(model)  # 3. the engine, dense and with its exact-zero oracle
        want_tokens, _ = _hf_greedy(model, prompt)
        np.testing.assert_array_equal(engine.generate(prompt[0].numpy(), NEW_TOKENS), want_tokens)
        np.testing.assert_array_equal(engine.generate(prompt[0].numpy(), NEW_TOKENS, sparse=True), want_tokens)
    finally:
        V.VARIANTS.pop("drelu2")


def test_generate_refuses_what_it_cannot_decode():
    engine = Engine.from_transformers(_tiny())
    P, V = engine.config.max_positions, engine.config.vocab_size
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0"):
        engine.generate([1, 2], -1)
    with pytest.raises(ValueError, match="exceeds the model's"):
        engine.generate(np.arange(P, dtype=np.int64) % V, 1)
    with pytest.raises(ValueError, match=r"\[0, "):
        engine.generate([1, V], 1)
    with pytest.raises(ValueError, match="integer token ids"):
        engine.generate([1.5, 2.0], 1)
    assert len(engine.generate([1, 2], 0)) == 0


def test_both_engines_read_rope_from_one_place_and_refuse_scaling():
    """One reader of RoPE settings for the dense and the MoE engine (the MoE copy had lost the check for
    transformers 4's ``rope_scaling``)."""
    from types import SimpleNamespace

    from turbosparse_lib.inference import engine, moe_engine
    from turbosparse_lib.inference.hf_config import layer_rope_thetas, rope_theta

    assert engine.layer_rope_thetas is layer_rope_thetas and moe_engine.rope_theta is rope_theta
    per_kind = {"full_attention": {"rope_type": "default", "rope_theta": 1e6}, "sliding_attention": {"rope_theta": 1e4}}
    kinds = ["sliding_attention", "full_attention", "sliding_attention"]
    gemma3 = SimpleNamespace(rope_parameters=per_kind, layer_types=kinds, num_hidden_layers=3)
    assert layer_rope_thetas(gemma3) == (1e4, 1e6, 1e4)
    with pytest.raises(NotImplementedError, match="per layer kind"):  # the MoE engine reads one theta
        rope_theta(gemma3)
    per_kind["full_attention"] = {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}  # Gemma 3 4B and up
    with pytest.raises(NotImplementedError, match="'linear' \\(layers of kind 'full_attention'\\)"):
        layer_rope_thetas(gemma3)
    assert rope_theta(SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": 1e5})) == 1e5
    assert rope_theta(SimpleNamespace(rope_theta=5e5)) == 5e5
    for cfg in (
        SimpleNamespace(rope_scaling={"type": "linear", "factor": 2.0}, rope_theta=1e4),
        SimpleNamespace(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}),
        SimpleNamespace(rope_parameters={"rope_theta": 1e4, "partial_rotary_factor": 0.5}),
    ):
        with pytest.raises(NotImplementedError):
            rope_theta(cfg)

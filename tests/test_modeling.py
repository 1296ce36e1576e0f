"""Building, swapping and reloading gated-MLP variants in tiny random transformers models."""

import pytest
import torch
from transformers import (
    Gemma2Config,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

from turbosparse_lib.models.architecture import ModelConfig
from turbosparse_lib.models.build import build_model
from turbosparse_lib.models.swap import apply_variant, count_parameters, load_model, mlp_modules, native_variant
from turbosparse_lib.models.variants import VARIANTS, GatedMLP

VOCAB = 128
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
FAMILIES = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "gemma": GemmaConfig,
    "gemma2": Gemma2Config,
}


def tiny_model(family: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(FAMILIES[family](**TINY)).eval()


@pytest.fixture
def ids():
    torch.manual_seed(1)
    return torch.randint(0, VOCAB, (2, 12))  # (B, T)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_swap_to_native_variant_reproduces_logits_exactly(family, ids):
    model = tiny_model(family)
    expected = logits(model, ids)
    variant = native_variant(model.config)
    assert variant == ("geglu" if family.startswith("gemma") else "swiglu")
    apply_variant(model, variant)
    assert all(isinstance(m, GatedMLP) and m.variant == variant for m in mlp_modules(model))
    assert torch.equal(logits(model, ids), expected)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_swap_keeps_weights_and_changes_the_function(family, ids):
    model = tiny_model(family)
    native = mlp_modules(model)[0]
    w = native.gate_proj.weight
    before = logits(model, ids)
    apply_variant(model, "drelu")
    assert mlp_modules(model)[0].gate_proj.weight is w  # shared, not copied
    assert model.config.mlp_variant == "drelu" and model.config.mlp_variant_kwargs == {}
    assert not torch.allclose(logits(model, ids), before)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_save_load_round_trip_families(family, ids, tmp_path):
    model = apply_variant(tiny_model(family), "shifted_relu", b=0.5)
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.config.mlp_variant == "shifted_relu" and loaded.config.mlp_variant_kwargs == {"b": 0.5}
    assert all(m.act_fn.b == 0.5 for m in mlp_modules(loaded))
    assert torch.equal(logits(loaded, ids), expected)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_build_and_round_trip_every_variant(variant, ids, tmp_path):
    model = build_model(
        variant,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        context_length=64,
        seed=0,
    )
    assert type(model).__name__ == "LlamaForCausalLM"
    assert all(m.variant == variant for m in mlp_modules(model))
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    assert '"mlp_variant": "' + variant in (tmp_path / "config.json").read_text()
    assert torch.equal(logits(load_model(tmp_path), ids), expected)


def test_build_model_seed_and_presets():
    a = build_model("drelu", preset="smoke", vocab_size=VOCAB, seed=3)
    b = build_model("drelu", preset="smoke", vocab_size=VOCAB, seed=3)
    assert torch.equal(a.model.layers[1].mlp.up_proj.weight, b.model.layers[1].mlp.up_proj.weight)
    assert a.config.hidden_size == 64 and a.config.num_hidden_layers == 2
    assert count_parameters(a) > count_parameters(a, exclude_embeddings=True)
    with pytest.raises(TypeError, match="unknown model fields"):
        build_model("drelu", hidden=32)
    with pytest.raises(ValueError, match="unknown gated-MLP variant"):
        build_model("gelu")


def test_count_parameters_counts_tied_weights_once():
    model = build_model(
        "swiglu", hidden_size=32, num_layers=1, intermediate_size=64, vocab_size=VOCAB, tie_word_embeddings=True
    )
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    cfg = ModelConfig(hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64, vocab_size=VOCAB)
    mlp = 3 * 32 * 64
    attn = 4 * 32 * 32
    norms = 3 * 32
    assert count_parameters(build_model("swiglu", **vars(cfg))) == 2 * VOCAB * 32 + mlp + attn + norms


def test_unsupported_architecture_names_supported_types():
    from transformers import GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0))
    with pytest.raises(NotImplementedError, match="gpt2.*llama, mistral, qwen2"):
        apply_variant(gpt2, "drelu")
    with pytest.raises(NotImplementedError, match="Supported model types"):
        mlp_modules(gpt2)


def test_plain_checkpoint_loads_natively(tmp_path, ids):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert not isinstance(mlp_modules(loaded)[0], GatedMLP)
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_saved_drelu_model_loads_as_drelu_with_plain_auto_model(tmp_path):
    """A swapped model saves as turbosparse_<family>: AutoModelForCausalLM (the library imported) builds the same
    dReLU model, logits bit for bit; switched back to its native variant it saves as an ordinary Llama; a folder
    written before the types existed is marked so, and without the registration transformers refuses the type
    instead of building SwiGLU."""
    import json

    import tiny_models
    from transformers import AutoModelForCausalLM

    from turbosparse_lib.models import swap

    model = swap.apply_variant(tiny_models.hf_llama(0), "drelu")
    x = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        ref = model(x).logits
    model.save_pretrained(tmp_path / "drelu")
    config = json.loads((tmp_path / "drelu" / "config.json").read_text())
    assert config["model_type"] == "turbosparse_llama" and config["mlp_variant"] == "drelu"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "drelu").eval()
    assert {m.variant for m in swap.mlp_modules(loaded)} == {"drelu"}
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, ref)
    swap.apply_variant(loaded, "swiglu")
    loaded.save_pretrained(tmp_path / "native")
    assert json.loads((tmp_path / "native" / "config.json").read_text())["model_type"] == "llama"

    old = tmp_path / "drelu" / "config.json"  # as written before: the family's type with a variant beside it
    old.write_text(json.dumps({**config, "model_type": "llama"}))
    assert swap.mark_saved_variant(tmp_path / "drelu") and not swap.mark_saved_variant(tmp_path / "drelu")
    assert json.loads(old.read_text())["model_type"] == "turbosparse_llama"
    assert not swap.mark_saved_variant(tmp_path / "native")


def test_without_the_library_a_saved_drelu_model_is_refused_not_built_as_swiglu(tmp_path):
    import subprocess
    import sys

    import tiny_models

    from turbosparse_lib.models import swap

    swap.apply_variant(tiny_models.hf_llama(0), "drelu").save_pretrained(tmp_path)
    code = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 0 and "turbosparse_llama" in run.stderr

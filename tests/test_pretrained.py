"""SmolLM2-135M from its GGUF file: loads as a Llama with SwiGLU and is a sane language model."""

import math

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(built_data):
    from turbosparse_lib.models.pretrained import load_smollm2

    return load_smollm2()


def test_architecture(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == (30, 576, 1536, 49152)
    assert cfg.hidden_act == "silu"  # SwiGLU
    assert len(tok) == 49152


def test_perplexity_on_held_out_text(smollm2):
    """512 tokens of the WikiText-2 stand-in, scored in one window: finite and below 60 (about 27 expected)."""
    from turbosparse_lib.data.build import load_splits

    model, tok = smollm2
    text = "\n\n".join(load_splits()["test"]["text"][:20])
    ids = tok(text, return_tensors="pt")["input_ids"][:, :512]
    assert ids.shape[1] == 512
    with torch.inference_mode():
        loss = model(ids, labels=ids).loss.item()
    ppl = math.exp(loss)
    assert math.isfinite(ppl) and ppl < 60, ppl


def test_cached_copy_is_plain_float32(smollm2):
    from turbosparse_lib.models.pretrained import smollm2_dir

    model, _ = smollm2
    assert (smollm2_dir() / "model.safetensors").exists()
    assert next(model.parameters()).dtype == torch.float32

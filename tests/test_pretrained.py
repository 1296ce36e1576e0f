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


def test_the_engine_decodes_smollm2_as_transformers_does(smollm2):
    """The CPU engine on the real model, in the default run: float32 greedy tokens and logits against transformers,
    then held-out perplexity (one window of 80 tokens) in Q8_0 and Q4_0 (llama.cpp's block formats) bounded against
    float32: Q8_0 within 1%, Q4_0 worse but by less than x1.6 (notebook 06 measures x1.28 on 508 tokens, for our
    engine and for llama.cpp's alike)."""
    import numpy as np

    from turbosparse_lib.bench.quality import engine_nll
    from turbosparse_lib.data.build import heldout_ids
    from turbosparse_lib.inference.engine import Engine

    model, tok = smollm2
    ids = heldout_ids(tok, max_tokens=80).numpy()
    prompt, new = ids[:24], 8
    engine = Engine.from_transformers(model)
    tokens, logits = engine.generate(prompt, new, return_logits=True)
    with torch.no_grad():
        out = model.generate(
            torch.from_numpy(prompt)[None], max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        hf_logits = model(out).logits[0, len(prompt) - 1 : -1].numpy()
    np.testing.assert_array_equal(tokens, out[0, len(prompt) :].numpy())
    np.testing.assert_allclose(logits, hf_logits, rtol=0, atol=2e-3 * np.abs(hf_logits).max())
    ppl = {
        fmt: float(np.exp(engine_nll(engine.quantized(fmt), ids, chunk=80).mean())) for fmt in ("f32", "q8_0", "q4_0")
    }
    with torch.no_grad():  # the same window, scored by transformers
        window = torch.from_numpy(ids)[None]
        hf_ppl = math.exp(model(window, labels=window).loss.item())
    assert ppl["f32"] == pytest.approx(hf_ppl, rel=1e-3), (ppl, hf_ppl)
    assert abs(ppl["q8_0"] / ppl["f32"] - 1) < 0.01, ppl
    assert 1.0 < ppl["q4_0"] / ppl["f32"] < 1.6, ppl

"""Training a from-scratch mixture of experts with the trainer of notebook 02: config guard, resume, losses."""

import json

import fault_injection
import pytest
import torch

from turbosparse_lib.models.moe import GatedExperts
from turbosparse_lib.presets import PRESET_NAMES, get_preset
from turbosparse_lib.train import checkpoint
from turbosparse_lib.train import loop as training
from turbosparse_lib.train.config import TrainConfig, train_config

STEPS = 16  # smoke: 4 x 128 tokens per step, a checkpoint every 8


def test_every_preset_matches_the_dense_active_width():
    for name in PRESET_NAMES:
        P = get_preset(name)
        assert P.moe.active_intermediate() == P.model.intermediate_size, name
    assert (get_preset("cpu").moe.num_experts, get_preset("cpu").moe.experts_per_token) == (8, 2)  # Mixtral's routing


def test_moe_config_is_recorded_and_guards_the_run_folder(tmp_path, built_data):
    cfg = train_config("smoke", "drelu", moe=True, total_tokens=4 * 4 * 128)
    assert cfg.moe == get_preset("smoke").moe and cfg.total_tokens == 4 * 4 * 128
    summary = training.train(cfg, tmp_path)
    stored = json.loads((tmp_path / checkpoint.CONFIG_FILE).read_text())
    assert stored["moe"]["num_experts"] == 4 and TrainConfig(**stored) == cfg  # the stored JSON is the config
    m = training.load_trained(tmp_path)
    assert isinstance(m.model.layers[0].mlp.experts, GatedExperts) and m.config.mlp_variant == "drelu"
    # the validation loss is the language-model loss alone (no load-balancing term)
    val = training.validation_sequences(cfg)
    assert summary["final_val_loss"] == pytest.approx(training.evaluate_loss(m, val, cfg.micro_batch_size), rel=1e-6)
    with torch.no_grad():
        x = val[:2]
        out = m(input_ids=x, labels=x)
    assert out.aux_loss is not None and out.loss > m(input_ids=x, labels=x, output_router_logits=False).loss
    with pytest.raises(ValueError, match="moe: stored"):
        training.train(train_config("smoke", "drelu", total_tokens=4 * 4 * 128), tmp_path)  # the dense one


def _run(args, **faults):
    return fault_injection.run(["-m", "turbosparse_lib.train.loop", *args], **faults)


def test_killed_moe_run_resumes_to_the_same_weights(tmp_path, built_data):
    base = [
        "--preset",
        "smoke",
        "--variant",
        "drelu",
        "--moe",
        "--threads",
        "1",
        "--total-tokens",
        str(STEPS * 4 * 128),
    ]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert _run(base + ["--out", str(whole)]).returncode == 0
    r = _run(base + ["--out", str(killed)], kill_at_step=11)
    assert r.returncode == -9, r.stderr[-2000:]
    assert json.loads((killed / checkpoint.CHECKPOINT / "state.json").read_text())["step"] == 8
    r = _run(base + ["--out", str(killed)])
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = (json.loads((d / checkpoint.SUMMARY_FILE).read_text()) for d in (whole, killed))
    assert b["resumed_from_step"] == 8 and a["final_val_loss"] == b["final_val_loss"]
    from safetensors.torch import load_file

    wa, wb = (load_file(str(d / "model.safetensors")) for d in (whole, killed))
    # save_pretrained writes Mixtral's own per-expert layout (block_sparse_moe.experts.<e>.w1/w2/w3)
    assert any(".experts.3.w1" in k for k in wa) and all(torch.equal(wa[k], wb[k]) for k in wa)

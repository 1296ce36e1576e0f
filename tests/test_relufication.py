"""ReLUfication on a tiny model: the swap keeps the weights, the warm start fits, distillation, kill and resume."""

import copy
import dataclasses
import json

import fault_injection
import numpy as np
import pytest
import tiny_models
import torch

from turbosparse_lib.models.swap import apply_variant, mlp_modules
from turbosparse_lib.presets import as_preset, get_preset
from turbosparse_lib.train import relufication as R


def _tiny(seed=0, vocab=8192):
    return tiny_models.hf_llama(seed, vocab_size=vocab, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, built_data):
    """A tiny Llama saved with our BPE as its tokenizer: a base model relufy can load like any HF folder."""
    from turbosparse_lib.data.tokenizer import load_tokenizer

    d = tmp_path_factory.mktemp("tiny-base")
    _tiny().save_pretrained(d)
    load_tokenizer().save_pretrained(d)
    return d


@pytest.mark.parametrize("variant", ["reglu", "shifted_relu", "drelu"])
def test_swap_keeps_gate_up_and_down_exactly(variant):
    teacher = _tiny()
    student = apply_variant(copy.deepcopy(teacher), variant)
    for t, s in zip(mlp_modules(teacher), mlp_modules(student)):
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(getattr(t, name).weight, getattr(s, name).weight)
    assert student.config.mlp_variant == variant


@pytest.mark.parametrize("target", ["function", "residual"])
def test_warm_start_fits_each_layer(target):
    teacher = _tiny(1, vocab=64)
    ids = torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(0))
    student = apply_variant(copy.deepcopy(teacher), "drelu")
    rep = R.warm_start(student, teacher, ids, R.WarmStart(target=target))
    assert [r["layer"] for r in rep["layers"]] == [0, 1]
    for r in rep["layers"]:
        assert r["rel_err_after"] < r["rel_err_before"]
    # gate and up keep their weights up to each neuron's sign; only down is refitted
    for t, s in zip(mlp_modules(teacher), mlp_modules(student)):
        assert torch.equal(t.gate_proj.weight, s.gate_proj.weight)
        assert torch.equal(t.up_proj.weight.abs(), s.up_proj.weight.abs())


@pytest.mark.parametrize("target", ["function", "residual"])
def test_warm_start_generalises_to_tokens_it_did_not_fit(target):
    """Fit on one half of the tokens, check on the other: each layer's error and the model's distance to the
    original (KL of the next-token distributions) fall on tokens the least squares never saw, not only on its own."""
    teacher = _tiny(1, vocab=64)
    ids = torch.randint(0, 64, (16, 32), generator=torch.Generator().manual_seed(0))
    fit_ids, unseen = ids[:8], ids[8:]
    student = apply_variant(copy.deepcopy(teacher), "drelu")
    warm = R.WarmStart(target=target)

    def kl_to_teacher():
        with torch.no_grad():
            p = torch.log_softmax(teacher(unseen).logits, -1)
            q = torch.log_softmax(student(unseen).logits, -1)
        return float((p.exp() * (p - q)).sum(-1).mean())

    before, kl_before = R.warm_start(student, teacher, unseen, warm, fit=False), kl_to_teacher()
    fitted = R.warm_start(student, teacher, fit_ids, warm)
    after, kl_after = R.warm_start(student, teacher, unseen, warm, fit=False), kl_to_teacher()
    for b, f, a in zip(before["layers"], fitted["layers"], after["layers"]):
        assert a["rel_err"] < b["rel_err"], (b, a)
        assert a["rel_err"] < 3 * f["rel_err_after"] + 0.05, (f, a)  # near the error on the fitted tokens
    assert kl_after < kl_before
    # measuring changes nothing
    w = [m.down_proj.weight.clone() for m in mlp_modules(student)]
    R.warm_start(student, teacher, unseen, warm, fit=False)
    assert all(torch.equal(a, m.down_proj.weight) for a, m in zip(w, mlp_modules(student)))


def test_warm_start_reproduces_the_native_variant():
    """Swapped to its own variant, least squares must give back (almost) the original MLPs."""
    teacher = _tiny(2, vocab=64)
    ids = torch.randint(0, 64, (16, 32), generator=torch.Generator().manual_seed(1))
    student = apply_variant(copy.deepcopy(teacher), "swiglu")
    rep = R.warm_start(student, teacher, ids, R.WarmStart(ridge=1e-8))
    assert max(r["rel_err_after"] for r in rep["layers"]) < 1e-4


def test_bad_arguments_are_refused_before_anything_is_made(tmp_path):
    with pytest.raises(ValueError, match="unknown recipe"):
        R.relufy_config("smoke", "drelu", "magic")
    with pytest.raises(ValueError, match="unknown gated-MLP variant"):
        R.relufy_config("smoke", "foo")
    with pytest.raises(ValueError, match="unknown base model"):
        R.relufy_config("smoke", "drelu", base=str(tmp_path / "nothing"))
    assert R.main(["--recipe", "magic", "--out", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()
    no_weights = tmp_path / "no-weights"
    _tiny().config.save_pretrained(no_weights)
    with pytest.raises(ValueError, match="no weights"):
        R.relufy_config("smoke", "drelu", base=str(no_weights))
    from transformers import GPT2Config

    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(gpt2)
    with pytest.raises(ValueError, match="'gpt2' model, which is not supported"):
        R.relufy_config("smoke", "drelu", base=str(gpt2))
    assert R.main(["--base", str(gpt2)]) == 2


_RUN = """
import sys, json
from turbosparse_lib.train.relufication import relufy
d, s = relufy("smoke", "drelu", "lstsq+kd", base=sys.argv[1], run_dir=sys.argv[2], tokenizer="ours", precision="fp32")
print(json.dumps({"final_train_loss": s["final_train_loss"], "resumed_from_step": s["resumed_from_step"]}))
"""


def _run(base, out, kill_at=None):
    return fault_injection.run(["-c", _RUN, str(base), str(out)], kill_at_step=kill_at)


@pytest.mark.slow
def test_killed_relufication_resumes_to_the_same_weights(tiny_base, tmp_path):
    from safetensors.torch import load_file

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    r = _run(tiny_base, whole)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run(tiny_base, killed, kill_at=3)  # checkpoints every 2 steps: step 2 is saved, step 3 is lost
    assert r.returncode == -9, r.stderr[-2000:]
    assert (killed / R.WARM_FILE).exists()
    r = _run(tiny_base, killed)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["resumed_from_step"] == 2
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    curve = R.recovery_curve(killed)
    assert list(curve.step) == [0, 2, 4] and (curve.heldout_ppl > 0).all() and curve.zero_frac.between(0, 1).all()
    from turbosparse_lib.models.swap import load_model

    m = load_model(killed)
    assert m.config.mlp_variant == "drelu"


def test_recovery_at_equal_time_leaves_a_run_that_has_not_started_without_a_value():
    import pandas as pd

    curves = pd.DataFrame(
        {
            "recipe": ["a", "a", "a", "b", "b"],
            "wall_seconds": [0.0, 100.0, 200.0, 300.0, 500.0],  # b's warm start ends after a's last point
            "heldout_ppl": [1000.0, 100.0, 10.0, 50.0, 5.0],
        }
    )
    t, r = R.recovery_at_equal_time(curves)
    assert t == 200.0
    assert r.loc["a", "ppl_at_t"] == pytest.approx(10.0)
    assert np.isnan(r.loc["b", "ppl_at_t"])  # not its first value carried back to t
    assert (
        r.loc["b", "best_ppl"] == pytest.approx(5.0)
        and r.loc["b", "best_s"] == 500.0
        and r.loc["b", "first_s"] == 300.0
    )
    t, r = R.recovery_at_equal_time(curves.assign(wall_seconds=[0.0, 100.0, 200.0, 0.0, 400.0]))
    assert r.loc["b", "ppl_at_t"] == pytest.approx(np.exp(np.interp(200, [0, 400], np.log([50, 5]))))


def test_default_recipe_trains_the_mlps_only_and_records_what_it_reached(tiny_base, tmp_path):
    """The default recipe (logits and hidden states distilled, MLPs trained) on the tiny base: attention and
    embeddings stay as they were, the folder records recipe, budget and quality, and a finished folder asked for
    another budget is refused instead of returned."""
    from safetensors.torch import load_file

    assert R.DEFAULT_RECIPE == "lstsq-split+hidden" and R.RECIPES[R.DEFAULT_RECIPE].trainable == "mlp"
    out = tmp_path / "run"
    # the smoke preset under a name no registry knows: relufy resolves it once and passes it down, never by name
    P = dataclasses.replace(get_preset("smoke"), name="smoke-unregistered")
    d, s = R.relufy(P, "drelu", R.DEFAULT_RECIPE, base=str(tiny_base), run_dir=out, tokenizer="ours", progress=False)
    before, after = load_file(str(tiny_base / "model.safetensors")), load_file(str(d / "model.safetensors"))
    for k in before:
        if "mlp" not in k:
            assert torch.equal(before[k], after[k]), k  # frozen
    assert any(not torch.equal(before[k], after[k]) for k in before if "gate_proj" in k)  # the MLPs trained
    rec = json.loads((d / R.RECORD_FILE).read_text())
    assert rec["recipe"] == R.DEFAULT_RECIPE and rec["recipe_terms"]["hidden_coef"] > 0
    assert rec["budget"]["tokens"] == s["tokens_seen"] and rec["budget"]["loop_tokens_per_s"] > 0
    curve = R.recovery_curve(d)
    assert rec["quality"]["heldout_ppl"] == pytest.approx(curve.heldout_ppl.iloc[-1])
    warm = s["warm_start"]  # checked on training sequences the least squares did not fit (one at smoke)
    assert warm["unseen"]["tokens"] > 0 and len(warm["unseen"]["layers"]) == len(warm["layers"])
    with pytest.raises(ValueError, match="another config"):
        R.relufy(
            "smoke",
            "drelu",
            R.DEFAULT_RECIPE,
            base=str(tiny_base),
            run_dir=out,
            tokenizer="ours",
            total_tokens=2 * s["tokens_seen"],
        )
    assert R.main(["--preset", "smoke", "--base", str(tiny_base), "--out", str(out), "--total-tokens", "4096"]) == 2


def test_split_recipes_fall_back_to_their_unsplit_twin_for_a_linear_up():
    """Splitting halves needs dReLU's up ReLU: ReGLU and shifted ReLU under the split default are the plain
    recipe's run (same config, same folder), dReLU keeps the split; unknown recipes are refused by name."""
    assert R.variant_recipe("drelu", "lstsq-split+hidden") == "lstsq-split+hidden"
    for v in ("reglu", "shifted_relu"):
        assert R.variant_recipe(v, "lstsq-split+hidden") == "lstsq+hidden"
        assert R.relufied_dir("cpu", v, "lstsq-split+hidden") == R.relufied_dir("cpu", v, "lstsq+hidden")
        assert R.variant_recipe(v, "lstsq+hidden+l1") == "lstsq+hidden+l1"
    assert R.relufied_dir("cpu", "drelu").name.endswith("-drelu-lstsq-split+hidden")
    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        R.variant_recipe("reglu", "nope")


def test_a_preset_is_passed_down_whole_and_a_name_resolves_to_the_same():
    """The helpers take a ``Preset`` or its name: the same config and folders for both, and a preset no registry
    knows works as an object (nothing looks it up by name again) while its name alone is refused."""
    smoke = get_preset("smoke")
    assert as_preset(smoke) is smoke and as_preset("smoke") is smoke
    assert R.relufy_config(smoke, "drelu") == R.relufy_config("smoke", "drelu")
    assert R.relufied_dir(smoke, "drelu") == R.relufied_dir("smoke", "drelu")
    P = dataclasses.replace(get_preset("cpu"), name="cpu-unregistered")
    assert R.relufy_config(P, "drelu").total_tokens == P.relufy.total_tokens
    assert R.relufied_dir(P, "drelu").parent.name == P.name
    assert R.compare_tokens(P, "paper") == P.relufy.compare_tokens
    with pytest.raises(ValueError, match="unknown preset 'cpu-unregistered'"):
        R.relufied_dir(P.name, "drelu")


def test_compare_runs_of_the_default_recipe_are_its_main_run():
    assert R.compare_dir("cpu", R.DEFAULT_RECIPE) == R.relufied_dir("cpu", "drelu", R.DEFAULT_RECIPE)
    assert R.compare_dir("cpu", "paper").name.endswith("-compare")
    from turbosparse_lib.presets import get_preset

    P = get_preset("cpu").relufy
    assert R.compare_tokens("cpu", R.DEFAULT_RECIPE) == P.total_tokens
    assert R.compare_tokens("cpu", "paper") == P.compare_tokens
    assert all(r in R.RECIPES for r in P.drelu_recipes)


def test_up_slope_falls_from_a_linear_up_to_drelu_and_stays_there():
    """The anneal's schedule: 1 (ReGLU's linear up) before the first step, linear down to 0 at the ramp's end, then
    0 (dReLU) to the end of the run; without a ramp, dReLU from the start. A variant with no up ReLU refuses it."""
    from turbosparse_lib.train.config import train_config, up_slope_at

    cfg = train_config("smoke", "drelu", 0, batch_size=8, up_anneal_fraction=0.5)
    cfg = train_config("smoke", "drelu", 0, batch_size=8, up_anneal_fraction=0.5, total_tokens=16 * cfg.tokens_per_step)
    assert cfg.steps == 16
    assert up_slope_at(-1, cfg) == 1.0
    assert up_slope_at(0, cfg) == pytest.approx(1 - 1 / 8)
    assert up_slope_at(7, cfg) == 0.0 and up_slope_at(15, cfg) == 0.0
    assert [up_slope_at(s, cfg) for s in range(8)] == sorted((up_slope_at(s, cfg) for s in range(8)), reverse=True)
    plain = train_config("smoke", "drelu", 0)
    assert up_slope_at(-1, plain) == up_slope_at(0, plain) == 0.0
    with pytest.raises(ValueError, match="only dReLU"):
        train_config("smoke", "reglu", 0, up_anneal_fraction=0.5)


def test_up_slope_one_is_reglu_and_zero_is_drelu():
    from turbosparse_lib.models.variants import GatedMLP

    torch.manual_seed(0)
    x = torch.randn(3, 5, 16)
    mlp = GatedMLP(16, 24, "drelu")
    reglu = GatedMLP.from_linears(mlp.gate_proj, mlp.up_proj, mlp.down_proj, "reglu")
    drelu_out = mlp(x)
    mlp.set_up_slope(1.0)
    assert torch.allclose(mlp(x), reglu(x))
    mlp.set_up_slope(0.25)
    half = mlp(x)
    assert not torch.allclose(half, reglu(x)) and not torch.allclose(half, drelu_out)
    mlp.set_up_slope(0.0)
    assert torch.equal(mlp(x), drelu_out) and isinstance(mlp.up_act_fn, torch.nn.ReLU)
    with pytest.raises(ValueError, match="linear up branch"):
        reglu.set_up_slope(0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mlp.set_up_slope(1.5)


def test_annealed_recipe_ends_as_a_plain_drelu_model(tiny_base, tmp_path):
    """The anneal recipe on the tiny base: the warm start fits a linear up (no exact zeros from up at the curve's
    first point), training ends with the up ReLU fully in, and the saved folder loads as an ordinary dReLU model
    whose exact zeros are the last curve point's."""
    from turbosparse_lib.models.swap import load_model
    from turbosparse_lib.sparsity.instruments import activation_stats

    recipe = "lstsq+hidden+anneal"
    assert R.RECIPES[recipe].up_anneal_fraction > 0
    d, s = R.relufy(
        "smoke", "drelu", recipe, base=str(tiny_base), run_dir=tmp_path / "run", tokenizer="ours", progress=False
    )
    cfg = json.loads((d / "config.json").read_text())
    curve = R.recovery_curve(d)
    assert curve.zero_frac.iloc[0] < curve.zero_frac.iloc[-1]  # leaky up at the start, dReLU at the end
    model = load_model(d)
    assert all(isinstance(m.up_act_fn, torch.nn.ReLU) for m in mlp_modules(model)), cfg
    from turbosparse_lib.data.build import heldout_ids
    from turbosparse_lib.data.tokenizer import load_tokenizer

    ids = heldout_ids(load_tokenizer(), max_tokens=256)
    stats = activation_stats(model, ids, context_length=64).to_frame()
    assert stats[stats.kind == "up_act"].zero_frac.min() > 0.2  # the up ReLU gives exact zeros again


def test_split_warm_start_keeps_the_best_halves_of_neurons_at_the_same_width():
    """``WarmStart(split=True)``: every slot is one rectified half of an original neuron (its gate row, its up row
    or the negated one), no half twice, and the kept halves are the F largest of all 2F by the energy they put into
    the residual stream, recomputed here with NumPy; at least one neuron keeps both halves on random weights."""
    from turbosparse_lib.train.warm_start import _split_halves

    teacher = _tiny(2, vocab=64)
    student = apply_variant(copy.deepcopy(teacher), "drelu")
    mlp = mlp_modules(student)[0]
    x = torch.randn(256, mlp.gate_proj.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        neuron, sign = _split_halves(mlp, x)
    G, U, D = (getattr(mlp, n).weight.detach().numpy() for n in ("gate_proj", "up_proj", "down_proj"))
    g, u = np.maximum(x.numpy() @ G.T, 0), x.numpy() @ U.T
    d2 = (D**2).sum(0)
    energy = np.concatenate([((g * np.maximum(u, 0)) ** 2).sum(0) * d2, ((g * np.maximum(-u, 0)) ** 2).sum(0) * d2])
    F_ = U.shape[0]
    want = set(np.argsort(-energy)[:F_].tolist())
    got = {int(n) + (F_ if s < 0 else 0) for n, s in zip(neuron, sign)}
    assert len(neuron) == F_ and got == want
    assert len(set(neuron.tolist())) < F_  # some neuron keeps both halves, so some other keeps none

    before = copy.deepcopy(mlp)
    rep = R.warm_start(student, teacher, torch.randint(0, 64, (8, 32)), R.WarmStart(split=True))
    assert rep["split"] is True
    for t, s in zip(mlp_modules(teacher), mlp_modules(student)):
        assert s.gate_proj.weight.shape == t.gate_proj.weight.shape
        for row_g, row_u in zip(s.gate_proj.weight, s.up_proj.weight):  # each slot: an original neuron's rows
            i = int(torch.nonzero((t.gate_proj.weight == row_g).all(1))[0])
            assert torch.equal(row_u.abs(), t.up_proj.weight[i].abs())
    assert not torch.equal(before.gate_proj.weight, mlp.gate_proj.weight)


def test_split_recipe_records_its_warm_start(tiny_base, tmp_path):
    run_dir, summary = R.relufy(
        "smoke", "drelu", "lstsq-split+hidden", base=str(tiny_base), run_dir=tmp_path / "split", progress=False
    )
    assert summary["warm_start"]["split"] is True
    assert json.loads((run_dir / R.RECORD_FILE).read_text())["recipe_terms"]["split_halves"] is True

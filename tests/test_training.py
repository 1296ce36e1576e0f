"""The trainer: schedule, data order, config guard, kill-and-resume equality, DDP against one process."""

import json
import os
import subprocess
import sys
import time

import fault_injection
import numpy as np
import pytest
import torch

from turbosparse_lib.train import checkpoint
from turbosparse_lib.train import loop as training
from turbosparse_lib.train.config import lr_at, train_config
from turbosparse_lib.train.data import make_sequences


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = train_config("smoke", "drelu", total_tokens=100 * 4 * 128, warmup_steps=10)
    lrs = [lr_at(s, cfg) for s in range(cfg.steps)]
    assert lrs[0] == pytest.approx(cfg.lr / 10)
    assert lrs[9] == pytest.approx(cfg.lr)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))  # warm-up rises
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # cosine falls
    assert lrs[-1] == pytest.approx(cfg.lr * cfg.min_lr_ratio, rel=1e-3)


def test_make_sequences_is_deterministic_and_disjoint():
    toks = np.arange(1000)
    a = make_sequences(toks, 10, 50, seed=3)
    b = make_sequences(toks, 10, 50, seed=3)
    assert torch.equal(a, b) and a.shape == (50, 10)
    assert len(set(a[:, 0].tolist())) == 50 and all(int(r[0]) % 10 == 0 for r in a)
    with pytest.raises(ValueError, match="sequences"):
        make_sequences(toks, 10, 101, seed=0)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="unknown preset"):
        train_config("huge", "drelu")
    with pytest.raises(ValueError, match="unknown gated-MLP variant"):
        train_config("smoke", "foo")
    with pytest.raises(ValueError, match="objective"):
        train_config("smoke", "drelu", objective="rl")
    with pytest.raises(ValueError, match="precision"):
        train_config("smoke", "drelu", precision="fp8")
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        train_config("smoke", "drelu", batch_size=3)
    with pytest.raises(TypeError, match="unknown TrainConfig fields"):
        train_config("smoke", "drelu", learning_rate=1)


def test_paper_preset_is_table_12():
    cfg = train_config("paper", "drelu")
    assert (cfg.batch_size, cfg.context_length, cfg.lr, cfg.warmup_steps, cfg.weight_decay) == (
        128,
        2048,
        1e-4,
        2000,
        0.01,
    )
    assert (cfg.beta1, cfg.beta2) == (0.9, 0.95)


def test_a_run_folder_refuses_another_config(tmp_path, built_data):
    cfg = train_config("smoke", "drelu", total_tokens=4 * 4 * 128)
    training.train(cfg, tmp_path)
    assert training.is_complete(tmp_path)
    again = training.train(cfg, tmp_path)  # finished: nothing retrained
    assert again["steps"] == 4
    with pytest.raises(ValueError, match="variant: stored 'drelu' vs requested 'swiglu'"):
        training.train(train_config("smoke", "swiglu", total_tokens=4 * 4 * 128), tmp_path)
    m = training.load_trained(tmp_path)
    assert m.config.mlp_variant == "drelu"
    metrics = training.read_metrics(tmp_path)
    assert list(metrics.step[metrics.loss.notna()]) == [2, 4] and "val_loss" in metrics


def _run(args, cwd=None, **faults):
    return fault_injection.run(["-m", "turbosparse_lib.train.loop", *args], cwd=cwd, **faults)


def _summary(run_dir):
    return json.loads((run_dir / checkpoint.SUMMARY_FILE).read_text())


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model.safetensors"))


def test_killed_run_resumes_to_the_same_final_loss(tmp_path, built_data):
    base = ["--preset", "smoke", "--variant", "drelu", "--seed", "0", "--threads", "1"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert _run(base + ["--out", str(whole)]).returncode == 0
    # checkpoints every 8 steps: a SIGKILL at step 13 loses steps 8-12, which the resume must redo
    r = _run(base + ["--out", str(killed)], kill_at_step=13)
    assert r.returncode == -9, r.stderr[-2000:]
    assert (killed / checkpoint.CHECKPOINT / "state.json").exists() and not training.is_complete(killed)
    assert json.loads((killed / checkpoint.CHECKPOINT / "state.json").read_text())["step"] == 8
    # what a kill mid-write leaves: a metrics line cut short, a half-written checkpoint folder
    with open(killed / checkpoint.METRICS_FILE, "a") as f:
        f.write('{"step": 13, "tokens_se')
    (killed / ".checkpoint.tmp-dead").mkdir()
    (killed / ".checkpoint.tmp-dead" / "model.safetensors").write_bytes(b"x" * 1000)
    r = _run(base + ["--out", str(killed)])
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = _summary(whole), _summary(killed)
    assert b["resumed_from_step"] == 8
    assert a["final_train_loss"] == b["final_train_loss"] and a["final_val_loss"] == b["final_val_loss"]
    wa, wb = _weights(whole), _weights(killed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the metrics of the resumed run have each step once, as the uninterrupted run's
    assert list(training.read_metrics(killed).step) == list(training.read_metrics(whole).step)
    assert not list(killed.glob(".*tmp-*")) and not (killed / checkpoint.LOCK_FILE).exists()


@pytest.mark.slow
def test_random_kills_end_in_the_uninterrupted_weights_with_nothing_left_behind(tmp_path, built_data):
    """Faults drawn with a fixed seed, two of each kind, each at a point the run has not yet passed: a SIGKILL as a
    step begins, one inside a checkpoint (or final weights) write with half the file on disk, and one from outside
    at a random moment. Resumed after each, the run ends with the uninterrupted run's weights, metrics and losses,
    and no temporary file, old checkpoint or lock is left in its folder."""
    import random

    base = ["--preset", "smoke", "--variant", "drelu", "--seed", "0", "--threads", "1"]
    whole, faulty = tmp_path / "whole", tmp_path / "faulty"
    t0 = time.perf_counter()
    assert _run(base + ["--out", str(whole)]).returncode == 0
    run_s = time.perf_counter() - t0
    cfg = train_config("smoke", "drelu", 0)
    rng = random.Random(0)
    kinds, seen = ["step", "write", "time"] * 2, []
    rng.shuffle(kinds)
    for kind in kinds:
        if training.is_complete(faulty):  # a kill from outside came too late
            break
        state = faulty / checkpoint.CHECKPOINT / "state.json"
        done = json.loads(state.read_text())["step"] if state.exists() else 0
        if kind == "step":
            fault = {"kill_at_step": rng.randrange(done + 1, cfg.steps)}
        elif kind == "write":  # the checkpoints still to come (model and optimiser each) and the final weights
            fault = {
                "kill_in_write": rng.randrange(
                    1, 2 * ((cfg.steps - 1) // cfg.checkpoint_every - done // cfg.checkpoint_every) + 2
                )
            }
        else:
            fault = {"kill_after_s": rng.uniform(0.1, 0.4) * run_s}
        r = _run(base + ["--out", str(faulty)], **fault)
        seen.append((fault, r.returncode))
        assert r.returncode in (fault_injection.KILLED, 0 if kind == "time" else None), (seen, r.stderr[-2000:])
        if kind == "write":  # the half-written file is there for the next start to clear
            assert list(faulty.glob(".checkpoint.tmp-*")) or list(faulty.glob(".final.tmp-*")), seen
    assert sum(rc == fault_injection.KILLED for _, rc in seen) >= 5, seen
    if not training.is_complete(faulty):
        r = _run(base + ["--out", str(faulty)])
        assert r.returncode == 0, r.stderr[-2000:]
    a, b = _summary(whole), _summary(faulty)
    assert a["final_train_loss"] == b["final_train_loss"] and a["final_val_loss"] == b["final_val_loss"]
    wa, wb = _weights(whole), _weights(faulty)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), seen
    assert list(training.read_metrics(faulty).step) == list(training.read_metrics(whole).step)
    assert sorted(p.name for p in faulty.iterdir()) == sorted(p.name for p in whole.iterdir()), seen


def test_a_corrupt_metrics_line_is_named(tmp_path):
    (tmp_path / checkpoint.METRICS_FILE).write_text('{"step": 1}\n{"step": 2,, }\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2, is not JSON"):
        training.read_metrics(tmp_path)
    (tmp_path / checkpoint.METRICS_FILE).write_text('{"step": 1}\n{"step": 2}\n{"st')  # cut short: dropped
    assert list(training.read_metrics(tmp_path).step) == [1, 2]


def test_one_process_at_a_time_in_a_run_folder(tmp_path, built_data):
    cfg = train_config("smoke", "drelu", total_tokens=2 * 4 * 128)
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / checkpoint.LOCK_FILE).write_text(str(os.getppid()))  # a live process holds it
    with pytest.raises(RuntimeError, match=f"in use by another process \\(PID {os.getppid()}\\)"):
        training.train(cfg, tmp_path)
    assert not training.is_complete(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / checkpoint.LOCK_FILE).write_text(str(dead.pid))  # its owner is gone: taken over
    training.train(cfg, tmp_path)
    assert training.is_complete(tmp_path) and not (tmp_path / checkpoint.LOCK_FILE).exists()


def test_non_finite_training_stops_before_anything_is_complete(tmp_path, built_data):
    from turbosparse_lib.models.build import build_model

    cfg = train_config("smoke", "drelu", total_tokens=4 * 4 * 128)
    model = build_model("drelu", preset="smoke", seed=0)
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="not finite at step 1"):
        training.train(cfg, tmp_path, model=model)
    assert not training.is_complete(tmp_path)


def test_a_checkpoint_with_non_finite_weights_is_refused(tmp_path, built_data):
    from safetensors.torch import load_file, save_file

    base = ["--preset", "smoke", "--variant", "drelu", "--seed", "0", "--threads", "1", "--out", str(tmp_path)]
    assert _run(base, kill_at_step=10).returncode == -9
    f = tmp_path / checkpoint.CHECKPOINT / "model.safetensors"
    w = load_file(str(f))
    k = next(iter(w))
    w[k][..., 0] = float("nan")  # garbage bytes inside a tensor
    save_file(w, str(f))
    r = _run(base)
    assert r.returncode != 0 and "non-finite weights" in r.stderr
    assert not training.is_complete(tmp_path)


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path, built_data):
    base = ["--preset", "smoke", "--variant", "swiglu", "--seed", "1", "--threads", "1"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert _run(base + ["--out", str(one)]).returncode == 0
    env = {**os.environ, "TQDM_DISABLE": "1"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "turbosparse_lib.train.loop",
            *base,
            "--out",
            str(two),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _summary(one), _summary(two)
    assert b["processes"] == 2
    assert b["final_train_loss"] == pytest.approx(a["final_train_loss"], rel=1e-4)
    assert b["final_val_loss"] == pytest.approx(a["final_val_loss"], rel=1e-4)


def test_bad_arguments_create_nothing(tmp_path):
    out = tmp_path / "run"
    (tmp_path / "a-file").write_text("x")
    for bad in (
        ["--variant", "foo"],
        ["--preset", "huge"],
        ["--precision", "fp8"],
        ["--threads", "0"],
        ["--seed", "-1"],
    ):
        r = _run(["--out", str(out), *bad])
        assert r.returncode == 2, (bad, r.stderr[-500:])
        assert not out.exists(), f"{bad} created {out}"
    r = _run(["--out", str(tmp_path / "a-file")])
    assert r.returncode == 2 and "--out" in r.stderr and "is a file" in r.stderr


def test_precision_is_measured_on_the_model_being_trained():
    from turbosparse_lib.models.build import build_model
    from turbosparse_lib.train.precision import measure_precision

    model = build_model("drelu", preset="smoke", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    m = measure_precision(model, micro_batch_size=1, context_length=16, steps=1)
    assert m["chosen"] in ("fp32", "bf16") and m["fp32_s_per_step"] > 0 and m["bf16_s_per_step"] > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # timed on a copy


def test_distillation_loss_is_zero_for_the_teacher_itself():
    from turbosparse_lib.train.objectives import distillation_loss

    logits = torch.randn(2, 5, 11)
    assert distillation_loss(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(logits, torch.randn(2, 5, 11)).item() > 0


def test_l1_penalty_is_the_mean_absolute_combined_activation():
    from turbosparse_lib.models.build import build_model
    from turbosparse_lib.models.swap import mlp_modules
    from turbosparse_lib.train.config import train_config
    from turbosparse_lib.train.objectives import CombinedL1, training_loss

    model = build_model("drelu", preset="smoke", seed=0)
    x = torch.randint(0, 100, (2, 16))
    seen = []
    hooks = [
        m.down_proj.register_forward_pre_hook(lambda mod, a: seen.append(a[0].abs().mean().item()))
        for m in mlp_modules(model)
    ]
    cfg = train_config("smoke", "drelu", 0)
    base = training_loss(model, None, x, cfg, "fp32").item()
    for h in hooks:
        h.remove()
    l1 = CombinedL1(model)
    with_l1 = training_loss(model, None, x, cfg, "fp32", l1, 0.5).item()
    l1.remove()
    assert with_l1 == pytest.approx(base + 0.5 * sum(seen) / len(seen), rel=1e-5)
    with torch.no_grad():  # evaluations do not feed the penalty
        l1 = CombinedL1(model)
        model(input_ids=x)
        assert l1.total is None
        l1.remove()


def test_hidden_state_loss_is_zero_for_the_teacher_and_scale_free():
    from turbosparse_lib.train.objectives import hidden_state_loss

    g = torch.Generator().manual_seed(0)
    t = [torch.randn(2, 5, 8, generator=g) for _ in range(4)]
    assert hidden_state_loss(t, t).item() == 0.0
    s = [t[0]] + [h + 0.1 * torch.randn(h.shape, generator=g) for h in t[1:]]
    loss = hidden_state_loss(s, t).item()
    assert 0 < loss < 0.1
    # normalised per layer: scaling both by 1000 leaves it; the embeddings (index 0) are not compared
    assert hidden_state_loss([1000 * h for h in s], [1000 * h for h in t]).item() == pytest.approx(loss, rel=1e-5)
    assert hidden_state_loss([torch.zeros_like(t[0])] + s[1:], t).item() == pytest.approx(loss, rel=1e-6)


@pytest.mark.parametrize("trainable", ["all", "no-embeddings", "mlp"])
def test_select_trainable_freezes_what_it_names(trainable):
    from turbosparse_lib.models.build import build_model
    from turbosparse_lib.models.swap import mlp_modules
    from turbosparse_lib.train.loop import select_trainable

    model = build_model("drelu", preset="smoke", seed=0)
    select_trainable(model, trainable)
    emb = model.get_input_embeddings().weight
    mlp = {id(p) for m in mlp_modules(model) for p in m.parameters()}
    attn = [p for n, p in model.named_parameters() if "self_attn" in n]
    assert emb.requires_grad == (trainable == "all")
    assert all(p.requires_grad for p in model.parameters() if id(p) in mlp)
    assert all(p.requires_grad == (trainable != "mlp") for p in attn)


def test_l1_weight_rises_progressively():
    from turbosparse_lib.train.config import l1_at, train_config

    cfg = train_config("smoke", "drelu", 0, l1_coef=2.0, l1_warmup_fraction=0.5)  # 32 steps: full at step 16
    assert l1_at(0, cfg) == pytest.approx(2.0 / 16)
    assert l1_at(7, cfg) == pytest.approx(1.0)
    assert l1_at(15, cfg) == l1_at(31, cfg) == 2.0
    assert l1_at(0, train_config("smoke", "drelu", 0, l1_coef=2.0)) == 2.0  # no ramp: constant


def test_new_loss_options_are_validated():
    from turbosparse_lib.train.config import train_config

    with pytest.raises(ValueError, match="needs objective kd"):
        train_config("smoke", "drelu", 0, hidden_coef=1.0)  # the next-token loss has no teacher
    with pytest.raises(ValueError, match="unknown trainable"):
        train_config("smoke", "drelu", 0, trainable="attention")
    with pytest.raises(ValueError, match="l1_warmup_fraction"):
        train_config("smoke", "drelu", 0, l1_warmup_fraction=2.0)

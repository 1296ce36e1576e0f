import pytest

from turbosparse_lib.presets import PRESET_NAMES, PRESETS, get_preset
from turbosparse_lib.train.config import train_config


def test_presets_exist_and_grow():
    assert tuple(PRESETS) == PRESET_NAMES
    s, c, p = (get_preset(n) for n in ("smoke", "cpu", "paper"))
    assert s.data.mixture_tokens < c.data.mixture_tokens < p.data.mixture_tokens
    assert s.train.total_tokens < c.train.total_tokens < p.train.total_tokens
    assert 0 < s.eval.eval_tokens < c.eval.eval_tokens and p.eval.eval_tokens == 0  # paper: the whole test split
    assert p.eval.context_length == 2048  # table 11


def test_paper_preset_is_the_papers_tables():
    p = get_preset("paper")
    assert (p.model.hidden_size, p.model.num_layers, p.model.num_heads, p.model.vocab_size) == (1024, 24, 16, 32000)
    assert (p.relufy.lr, p.relufy.warmup_steps, p.relufy.context_length) == (5e-5, 1000, 4096)  # table 5
    assert p.relufy.lr * p.relufy.min_lr_ratio == pytest.approx(5e-6)


def test_every_section_is_read_in_one_place():
    """The train section makes a TrainConfig; nothing else holds run sizes."""
    for name in PRESET_NAMES:
        cfg = train_config(name, "drelu")
        assert cfg.total_tokens == get_preset(name).train.total_tokens


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="smoke, cpu, gpu, paper"):
        get_preset("laptop")


def test_gpu_preset_is_cpu_with_a_longer_relufication():
    c, g = get_preset("cpu"), get_preset("gpu")
    assert g.relufy.total_tokens > 10 * c.relufy.total_tokens
    assert (g.model, g.train, g.eval, g.bench) == (c.model, c.train, c.eval, c.bench)

import pytest

from turbosparse_lib.presets import PRESET_NAMES, PRESETS, get_preset


def test_presets_exist_and_grow():
    assert tuple(PRESETS) == PRESET_NAMES
    assert get_preset("smoke").mixture_tokens < get_preset("cpu").mixture_tokens < get_preset("paper").mixture_tokens
    assert get_preset("paper").context_length == 2048  # table 11


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="smoke, cpu, paper"):
        get_preset("laptop")

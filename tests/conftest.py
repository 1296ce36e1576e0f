"""Shared fixtures. ``built_data`` builds the offline data once per session (idempotent)."""

import os

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def built_data():
    from turbosparse_lib.data.build import build_all

    return build_all(quiet=True)

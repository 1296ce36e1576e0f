"""Where the project keeps its files.

Everything is resolved from the repository root (never from the current working
directory), so notebooks, tests and scripts agree wherever they are started.
``TURBOSPARSE_ROOT`` overrides the root, for users who installed the package
elsewhere and want data written next to their own checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def repo_root() -> Path:
    """The repository root: ``$TURBOSPARSE_ROOT`` or the folder above the package."""
    env = os.environ.get("TURBOSPARSE_ROOT")
    return Path(env).resolve() if env else _PACKAGE_DIR.parent


def data_dir() -> Path:
    return repo_root() / "data"


def manifest_path() -> Path:
    """The committed list of sources: package, version, sha256, licence."""
    return data_dir() / "manifest.json"


def cache_dir() -> Path:
    """Downloaded registry packages, verified by sha256 (git-ignored)."""
    return data_dir() / "cache"


def raw_dir() -> Path:
    """Files unpacked from the cached packages (git-ignored)."""
    return data_dir() / "raw"


def built_dir() -> Path:
    """Derived data: splits, tokenizer, token arrays (git-ignored)."""
    return data_dir() / "built"


def models_dir() -> Path:
    """Dequantised pretrained models and trained checkpoints (git-ignored)."""
    return data_dir() / "models"


def results_dir(preset: str) -> Path:
    """Small results (CSV, JSON) of a preset; the cpu preset's are committed."""
    return data_dir() / "results" / preset


def figures_dir(preset: str) -> Path:
    return repo_root() / "figures" / preset


def notebooks_dir() -> Path:
    return repo_root() / "notebooks"


def executed_dir(preset: str) -> Path:
    """Executed copies of the notebooks written by the runner."""
    return notebooks_dir() / "executed" / preset


def scratch_model_dir(preset: str, variant: str, seed: int) -> Path:
    """The final weights of a model trained from scratch by notebook 02 (``save_pretrained`` format)."""
    return models_dir() / preset / f"scratch-{variant}-seed{seed}"


def scratch_moe_dir(preset: str, variant: str, seed: int) -> Path:
    """The final weights of a mixture of experts trained from scratch by notebook 04."""
    return models_dir() / preset / f"scratch-moe-{variant}-seed{seed}"

"""What a notebook writes appears all at once, and what it needs from another notebook is checked first.

- ``NotebookOutputs``: a notebook writes its CSVs and figures into staging folders
  (``data/results/<preset>/.staging-NN/``, ``figures/<preset>/.staging-NN/``); its last cell calls
  ``commit()``, which moves every staged file into place. A run that fails part-way leaves the
  previous results untouched (its staging folder is cleared when the notebook next starts).
- ``require``: the first cell of a notebook that reads another's outputs (03 and 06 read the
  models of 02) checks them and, if they are missing, raises with the command that makes them,
  instead of silently switching to another data source.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .. import paths

# notebook -> the notebooks whose outputs it reads (the runner runs them in this order)
NEEDS: dict[str, tuple[str, ...]] = {
    "00": (),
    "01": (),
    "02": (),
    "03": ("02",),
    "04": ("02",),
    "05": ("02",),
    "06": ("02", "05"),  # a model trained with dReLU: 02's from-scratch models, else 05's ReLUfied SmolLM2
    "07": ("02", "05"),
    "99": ("00", "01", "02", "03", "04", "05", "06", "07"),  # reads every result; reports what is missing
}


class MissingPrerequisite(RuntimeError):
    """A notebook's inputs, made by another notebook, are not there."""


class NotebookOutputs:
    """Staging folders for one notebook's results and figures; ``commit()`` moves them into place."""

    def __init__(self, preset: str, notebook: str):
        self.preset, self.notebook = preset, notebook
        self.final_results, self.final_figures = paths.results_dir(preset), paths.figures_dir(preset)
        self.results = self.final_results / f".staging-{notebook}"
        self.figures = self.final_figures / f".staging-{notebook}"
        for d in (self.results, self.figures):
            shutil.rmtree(d, ignore_errors=True)  # leftovers of a failed run
            d.mkdir(parents=True)
        self.committed: list[Path] = []

    def commit(self) -> list[Path]:
        """Move every staged file into ``data/results/<preset>/`` and ``figures/<preset>/``; returns them."""
        moved = []
        for staging, final in ((self.results, self.final_results), (self.figures, self.final_figures)):
            for f in sorted(staging.rglob("*")):
                if f.is_file():
                    dest = final / f.relative_to(staging)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(f, dest)
                    moved.append(dest)
            shutil.rmtree(staging, ignore_errors=True)
        self.committed = moved
        return moved


def require(preset: str, notebook: str, what: str, *needed: Path) -> None:
    """Raise ``MissingPrerequisite`` unless every path in ``needed`` exists; the message names the
    notebook that makes them and the command to run it."""
    missing = [p for p in needed if not Path(p).exists()]
    if missing:
        shown = ", ".join(
            str(Path(p).relative_to(paths.repo_root())) if Path(p).is_relative_to(paths.repo_root()) else str(p)
            for p in missing[:4]
        )
        raise MissingPrerequisite(
            f"this notebook needs {what}, made by notebook {notebook} at the {preset} preset, and {shown} "
            f"{'is' if len(missing) == 1 else 'are'} missing. Run it first: "
            f".venv/bin/turbosparse-notebooks --preset {preset} --only {notebook}"
        )

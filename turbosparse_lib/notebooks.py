"""Run the notebooks headless, in order, at a named preset: ``turbosparse-notebooks``.

- Each ``notebooks/NN_*.ipynb`` is executed with papermill, which injects
  ``preset = "<name>"`` after the cell tagged ``parameters``; extra papermill
  parameters can be passed with ``-p NAME VALUE``.
- Executed copies go to ``notebooks/executed/<preset>/`` (written under a temporary
  name, renamed when the notebook finished); figures and CSVs are written by the
  notebooks themselves to ``figures/<preset>/`` and ``data/results/<preset>/``.
- A cell error stops the run with the notebook and cell named; the partial
  notebook is kept as ``<name>.failed.ipynb`` beside the executed copies, for reading.
- Each cell has a timeout from the preset (``Preset.notebook_timeout_s``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import paths
from .presets import get_preset


def list_notebooks(only: list[str] | None = None) -> list[Path]:
    """The numbered notebooks in order; ``only`` filters by prefix or name (e.g. ``00`` or ``00_data``)."""
    nbs = sorted(p for p in paths.notebooks_dir().glob("[0-9][0-9]_*.ipynb"))
    if only:
        nbs = [p for p in nbs if any(p.stem == o or p.stem.startswith(o) for o in only)]
        if not nbs:
            raise ValueError(f"no notebook matches {only}; available: {[p.stem for p in list_notebooks()]}")
    return nbs


def run_notebooks(
    preset: str = "cpu",
    only: list[str] | None = None,
    parameters: dict | None = None,
    timeout_s: int | None = None,
    build_data: bool = True,
) -> list[Path]:
    """Execute the notebooks at ``preset``; returns the executed copies. Raises on the first cell error."""
    import papermill as pm

    p = get_preset(preset)  # fails early, with the valid names, on an unknown preset
    notebooks = list_notebooks(only)
    if build_data:
        from .data.build import build_all

        build_all(quiet=True)
    out_dir = paths.executed_dir(p.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars are for people, not logs
    done = []
    for nb in notebooks:
        final = out_dir / nb.name
        tmp = out_dir / f".{nb.stem}.running.ipynb"
        failed = out_dir / f"{nb.stem}.failed.ipynb"
        t0 = time.perf_counter()
        print(f"[turbosparse-notebooks] {nb.name} (preset {p.name}) ...", file=sys.stderr, flush=True)
        try:
            pm.execute_notebook(
                str(nb), str(tmp),
                parameters={"preset": p.name, **(parameters or {})},
                cwd=str(paths.notebooks_dir()),
                kernel_name="python3",
                progress_bar=False,
                execution_timeout=timeout_s or p.notebook_timeout_s,
            )
        except Exception as e:
            if tmp.exists():
                os.replace(tmp, failed)
            raise RuntimeError(
                f"notebook {nb.name} failed at preset {p.name!r}: {type(e).__name__}: {str(e).strip()[:2000]}\n"
                f"the partly executed notebook is {failed.relative_to(paths.repo_root())}"
            ) from e
        _relative_paths(tmp)
        os.replace(tmp, final)
        failed.unlink(missing_ok=True)
        print(f"[turbosparse-notebooks] {nb.name} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        done.append(final)
    return done


def _relative_paths(nb_path: Path) -> None:
    """papermill records absolute input/output paths; keep the committed copies machine-independent."""
    import nbformat

    nb = nbformat.read(nb_path, as_version=4)
    meta = nb.metadata.get("papermill", {})
    root = paths.repo_root()
    for key in ("input_path", "output_path"):
        if meta.get(key):
            p = Path(meta[key])
            p = p.with_name(p.name.replace(".running", "").lstrip(".")) if key == "output_path" else p
            meta[key] = str(p.relative_to(root)) if p.is_relative_to(root) else p.name
    nbformat.write(nb, nb_path)


def _parse_value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Execute the notebooks headless with papermill at a named preset.")
    ap.add_argument("--preset", default="cpu", help="smoke (CI), cpu (default reproduction) or paper")
    ap.add_argument("--only", nargs="*", help="run only these notebooks (prefix such as 00, or full stem)")
    ap.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"), default=[],
                    help="an extra papermill parameter")
    ap.add_argument("--timeout", type=int, help="per-cell timeout in seconds (default: the preset's)")
    args = ap.parse_args(argv)
    try:
        get_preset(args.preset)
        out = run_notebooks(args.preset, args.only, {k: _parse_value(v) for k, v in args.parameter}, args.timeout)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for o in out:
        print(o.relative_to(paths.repo_root()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Run the notebooks headless, in dependency order, at a named preset: ``turbosparse-notebooks``.

- Each ``notebooks/NN_*.ipynb`` is executed with papermill, which injects ``preset = "<name>"``
  after the cell tagged ``parameters``; extra papermill parameters can be passed with ``-p NAME VALUE``.
- Notebooks run in the order their inputs require (``outputs.NEEDS``: 03 and 06 read the models
  of 02), numeric order otherwise; the first cell of each checks its inputs and names the command
  that makes them.
- Where the executed copy goes: at the ``cpu`` preset, the default reproduction, it *replaces*
  ``notebooks/NN_*.ipynb``, so opening a notebook shows the results the README reports; at other
  presets it goes to ``notebooks/executed/<preset>/`` (the smoke copies there are what nbval
  re-executes and compares). Each is written under a temporary name and renamed when the
  notebook finished; a cell error stops the run with the notebook and cell named, and the partial
  notebook is kept as ``<name>.failed.ipynb`` in ``notebooks/executed/<preset>/``.
- A notebook whose code, library, parameters and inputs (the stamps of the notebooks it reads) are unchanged since
  its last finished run at this preset on this machine is not rerun (``stamp``; ``--force`` reruns it). The
  stamps live in ``data/cache/notebook-stamps/<preset>/`` (git-ignored): a fresh clone runs everything.
- The kernel is the one the notebooks name (``turbosparse``, bound to the project's ``.venv``);
  the runner installs its spec into the running environment when it is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

from .. import cli, paths
from ..atomic import write_json
from ..presets import get_preset
from .outputs import NEEDS

KERNEL_NAME = "turbosparse"
KERNEL_DISPLAY = "Python (turbosparse)"


def list_notebooks(only: list[str] | None = None) -> list[Path]:
    """The numbered notebooks in the order their inputs require; ``only`` filters by prefix or name."""
    nbs = sorted(p for p in paths.notebooks_dir().glob("[0-9][0-9]_*.ipynb"))
    if only is not None:
        if not only:
            raise ValueError(f"--only names no notebook; give prefixes or stems from {[p.stem for p in nbs]}")
        unmatched = [o for o in only if not any(p.stem == o or p.stem.startswith(o) for p in nbs)]
        if unmatched:  # every name must match: a typo never runs a subset quietly
            raise ValueError(f"no notebook matches {unmatched}; available: {[p.stem for p in nbs]}")
        nbs = [p for p in nbs if any(p.stem == o or p.stem.startswith(o) for o in only)]
    return dependency_order(nbs)


def dependency_order(nbs: list[Path]) -> list[Path]:
    """``nbs`` ordered so that every notebook comes after those of ``NEEDS`` it reads (numeric order otherwise)."""
    by_num = {p.name[:2]: p for p in nbs}
    done: list[Path] = []
    visiting: set[str] = set()

    def visit(num: str) -> None:
        if by_num[num] in done:
            return
        if num in visiting:
            raise ValueError(f"notebook dependencies form a cycle through {num}")
        visiting.add(num)
        for dep in NEEDS.get(num, ()):
            if dep in by_num:
                visit(dep)
        visiting.discard(num)
        done.append(by_num[num])

    for num in sorted(by_num):
        visit(num)
    return done


def executed_path(preset: str, notebook: Path) -> Path:
    """Where the executed copy of ``notebook`` at ``preset`` lives (the cpu copy replaces the notebook)."""
    return notebook if preset == "cpu" else paths.executed_dir(preset) / notebook.name


def stamp_path(preset: str, notebook: Path) -> Path:
    return paths.cache_dir() / "notebook-stamps" / preset / f"{notebook.name[:2]}.json"


def stamp(preset: str, notebook: Path, parameters: dict | None = None) -> str:
    """What a finished run of ``notebook`` at ``preset`` depended on, as one digest: its code cells (not the
    parameters cell papermill injects), every source file of the library, the parameters, and the stamps of the
    notebooks it reads (``NEEDS``; a missing one makes the digest new, so the notebook reruns)."""
    cells = json.loads(notebook.read_text())["cells"]
    code = [
        "".join(c["source"])
        for c in cells
        if c["cell_type"] == "code" and "injected-parameters" not in c.get("metadata", {}).get("tags", [])
    ]
    package = Path(__file__).resolve().parents[1]
    library = sorted((p.relative_to(package).as_posix(), p.read_bytes()) for p in _library_files(package))
    needs = {}
    for dep in NEEDS.get(notebook.name[:2], ()):
        dep_stamp = paths.cache_dir() / "notebook-stamps" / preset / f"{dep}.json"
        needs[dep] = json.loads(dep_stamp.read_text())["digest"] if dep_stamp.exists() else None
    h = hashlib.sha256()
    for part in (
        preset,
        json.dumps(code),
        json.dumps(parameters or {}, sort_keys=True, default=str),
        json.dumps(needs),
    ):
        h.update(part.encode())
    for name, data in library:
        h.update(name.encode())
        h.update(hashlib.sha256(data).digest())
    return h.hexdigest()


def _library_files(package: Path) -> list[Path]:
    return [p for p in package.rglob("*.py") if "__pycache__" not in p.parts]


def is_current(preset: str, notebook: Path, parameters: dict | None = None) -> bool:
    """Whether ``notebook``'s executed copy at ``preset`` is still what a rerun would give (``stamp``)."""
    path = stamp_path(preset, notebook)
    if not (path.exists() and executed_path(preset, notebook).exists()):
        return False
    return json.loads(path.read_text()).get("digest") == stamp(preset, notebook, parameters)


def ensure_kernel() -> str:
    """Install the ``turbosparse`` kernel spec into this environment (``--sys-prefix``) if it is missing."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(KERNEL_NAME)
    except NoSuchKernel:
        from ipykernel.kernelspec import install

        install(kernel_name=KERNEL_NAME, display_name=KERNEL_DISPLAY, prefix=sys.prefix)
    return KERNEL_NAME


def run_notebooks(
    preset: str = "cpu",
    only: list[str] | None = None,
    parameters: dict | None = None,
    timeout_s: int | None = None,
    build_data: bool = True,
    force: bool = False,
) -> list[Path]:
    """Execute the notebooks at ``preset``; returns the executed copies. Raises on the first cell error. A notebook
    whose stamp is current is skipped (``force``: run it anyway)."""
    import papermill as pm

    p = get_preset(preset)  # fails early, with the valid names, on an unknown preset
    notebooks = list_notebooks(only)
    if build_data:
        from ..data.build import build_all

        build_all(quiet=True)
    kernel = ensure_kernel()
    work_dir = paths.executed_dir(p.name)
    work_dir.mkdir(parents=True, exist_ok=True)
    clear_leftovers(p.name)
    os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars are for people, not logs
    done = []
    for nb in notebooks:
        final = executed_path(p.name, nb)
        if not force and is_current(p.name, nb, parameters):
            print(
                f"[turbosparse-notebooks] {nb.name}: unchanged since its last run (--force reruns it)", file=sys.stderr
            )
            done.append(final)
            continue
        tmp = work_dir / f".{nb.stem}.running.ipynb"
        failed = work_dir / f"{nb.stem}.failed.ipynb"
        t0 = time.perf_counter()
        print(f"[turbosparse-notebooks] {nb.name} (preset {p.name}) ...", file=sys.stderr, flush=True)
        try:
            pm.execute_notebook(
                str(nb),
                str(tmp),
                parameters={"preset": p.name, **(parameters or {})},
                cwd=str(paths.notebooks_dir()),
                kernel_name=kernel,
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
        _relative_paths(tmp, final)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
        failed.unlink(missing_ok=True)
        write_json(stamp_path(p.name, nb), {"digest": stamp(p.name, nb, parameters), "notebook": nb.name})
        print(
            f"[turbosparse-notebooks] {nb.name} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True
        )
        done.append(final)
    return done


def clear_leftovers(preset: str) -> list[Path]:
    """Remove what a killed run leaves at ``preset``: half-executed ``.NN_*.running.ipynb`` copies and the
    ``.staging-NN`` folders of results and figures (never read: a notebook's results move into place only when it
    has run to the end). Returns what was removed."""
    import shutil

    gone = list(paths.executed_dir(preset).glob(".*.running.ipynb"))
    gone += [
        d
        for root in (paths.results_dir(preset), paths.figures_dir(preset))
        if root.exists()
        for d in root.glob(".staging-*")
    ]
    for g in gone:
        shutil.rmtree(g, ignore_errors=True) if g.is_dir() else g.unlink(missing_ok=True)
    return gone


def _relative_paths(nb_path: Path, final: Path) -> None:
    """papermill records absolute input/output paths; keep the committed copies machine-independent."""
    import nbformat

    nb = nbformat.read(nb_path, as_version=4)
    meta = nb.metadata.get("papermill", {})
    root = paths.repo_root()
    for key, value in (("input_path", meta.get("input_path")), ("output_path", str(final))):
        if value:
            p = Path(value)
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
    ap = cli.parser("turbosparse-notebooks", "Execute the notebooks headless with papermill at a named preset.")
    cli.add_preset(ap)
    ap.add_argument("--only", nargs="*", help="run only these notebooks (prefix such as 00, or full stem)")
    ap.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        metavar=("NAME", "VALUE"),
        default=[],
        help="an extra papermill parameter",
    )
    ap.add_argument("--timeout", type=int, help="per-cell timeout in seconds (default: the preset's)")
    ap.add_argument("--force", action="store_true", help="rerun notebooks whose code, library and inputs are unchanged")
    args = ap.parse_args(argv)
    try:  # every argument is checked before anything runs
        if any(name == "preset" for name, _ in args.parameter):  # the copy is saved under --preset's name
            raise ValueError(
                "set the preset with --preset, not -p preset: the executed copy is saved under --preset's name"
            )
        list_notebooks(args.only)
    except ValueError as e:
        return cli.refuse("turbosparse-notebooks", e)
    try:
        params = {k: _parse_value(v) for k, v in args.parameter}
        out = run_notebooks(args.preset, args.only, params, args.timeout, force=args.force)
    except (ValueError, RuntimeError) as e:
        print(f"turbosparse-notebooks: {e}", file=sys.stderr)
        return cli.RUN_FAILED
    for o in out:
        print(o.relative_to(paths.repo_root()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

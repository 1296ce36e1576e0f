"""The headless runner: order, parameters, loud failures, nothing half-written, smoke copies in step."""

import json

import nbformat
import pytest

from turbosparse_lib import paths
from turbosparse_lib.runner import notebooks, outputs


def _code(nb):
    """The code cells a reader wrote (papermill's injected parameters left out)."""
    return [
        c.source for c in nb.cells if c.cell_type == "code" and "injected-parameters" not in c.metadata.get("tags", [])
    ]


def test_notebooks_are_ordered_and_tagged():
    nbs = notebooks.list_notebooks()
    assert nbs and nbs[0].name == "00_data.ipynb"
    for nb_path in nbs:
        nb = nbformat.read(nb_path, as_version=4)
        params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(params) == 1, f"{nb_path.name} needs exactly one cell tagged 'parameters'"
        assert 'preset = "smoke"' in params[0].source, "the notebook's own default must be the smoke preset"
        assert any("NBVAL_CHECK_OUTPUT" in c.source for c in nb.cells if c.cell_type == "code"), nb_path.name
        assert nb.metadata["kernelspec"]["name"] == notebooks.KERNEL_NAME, nb_path.name


def test_dependencies_come_first():
    order = [p.name[:2] for p in notebooks.list_notebooks()]
    for nb, needs in outputs.NEEDS.items():
        for dep in needs:
            if nb in order and dep in order:
                assert order.index(dep) < order.index(nb), f"{dep} must run before {nb}"


def test_code_cells_stay_short():
    for nb_path in notebooks.list_notebooks():
        for src in _code(nbformat.read(nb_path, as_version=4)):
            assert src.count("\n") + 1 <= 32, (
                f"{nb_path.name}: a code cell of {src.count(chr(10)) + 1} lines:\n{src[:200]}"
            )


def test_committed_smoke_copies_are_in_step_with_the_notebooks():
    """nbval re-executes notebooks/executed/smoke/: they must hold the notebooks' current code."""
    for nb_path in notebooks.list_notebooks():
        smoke = paths.executed_dir("smoke") / nb_path.name
        assert smoke.exists(), f"no smoke copy of {nb_path.name}: run turbosparse-notebooks --preset smoke"
        ours, theirs = nbformat.read(nb_path, as_version=4), nbformat.read(smoke, as_version=4)
        assert _code(ours) == _code(theirs), (
            f"{smoke.name} is stale: rerun turbosparse-notebooks --preset smoke --only {nb_path.name[:2]}"
        )
        assert theirs.metadata["papermill"]["parameters"]["preset"] == "smoke"


def test_committed_notebooks_show_cpu_results_or_nothing():
    """A notebook a reader opens shows the cpu-preset run, or (not run at cpu yet) its code without outputs:
    never the smoke run's numbers, whose conclusions are not the reproduction's."""
    for nb_path in notebooks.list_notebooks():
        nb = nbformat.read(nb_path, as_version=4)
        if nb.metadata.get("papermill", {}).get("parameters", {}).get("preset") == "cpu":
            continue
        ran = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
        assert not ran, f"{nb_path.name} holds outputs of a run that is not the cpu preset's (cells {ran})"


def test_unknown_preset_fails_before_running():
    with pytest.raises(ValueError, match="unknown preset"):
        notebooks.run_notebooks("huge")
    with pytest.raises(SystemExit) as e:  # argparse's choices: exit 2, naming them
        notebooks.main(["--preset", "huge"])
    assert e.value.code == 2
    assert notebooks.main(["--preset", "smoke", "--only", "42"]) == 2
    assert notebooks.main(["--preset", "smoke", "--only", "00", "42"]) == 2  # one typo refuses the whole call
    assert notebooks.main(["--preset", "smoke", "--only"]) == 2  # a bare --only is not "everything"
    assert notebooks.main(["--preset", "smoke", "-p", "preset", "cpu"]) == 2  # would save a cpu run as smoke


def _notebook(tmp_path, name, *cells):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": notebooks.KERNEL_NAME, "display_name": "x", "language": "python"}
    p = nbformat.v4.new_code_cell('preset = "smoke"')
    p.metadata["tags"] = ["parameters"]
    nb.cells = [p, *(nbformat.v4.new_code_cell(c) for c in cells)]
    (tmp_path / "notebooks").mkdir(exist_ok=True)
    nbformat.write(nb, tmp_path / "notebooks" / name)


def test_failing_notebook_is_reported_and_leaves_previous_results(tmp_path, monkeypatch):
    monkeypatch.setenv("TURBOSPARSE_ROOT", str(tmp_path))
    old = paths.results_dir("smoke") / "table.csv"
    old.parent.mkdir(parents=True)
    old.write_text("old\n")
    _notebook(
        tmp_path,
        "98_fail.ipynb",
        "from turbosparse_lib.runner.outputs import NotebookOutputs\nout = NotebookOutputs(preset, '98')",
        "(out.results / 'table.csv').write_text('new, half-made\\n')",
        "raise ValueError('boom in cell')",
        "out.commit()",
    )
    with pytest.raises(RuntimeError, match="(?s)98_fail.ipynb failed at preset 'smoke'.*boom in cell"):
        notebooks.run_notebooks("smoke", build_data=False)
    assert sorted(p.name for p in paths.executed_dir("smoke").iterdir()) == ["98_fail.failed.ipynb"]
    assert old.read_text() == "old\n"  # the failed run's half-made table never replaced it


def test_a_notebook_run_commits_its_results_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("TURBOSPARSE_ROOT", str(tmp_path))
    _notebook(
        tmp_path,
        "97_ok.ipynb",
        "from turbosparse_lib.runner.outputs import NotebookOutputs\nout = NotebookOutputs(preset, '97')",
        "(out.results / 'a.csv').write_text('1\\n'); (out.figures / 'a.png').write_bytes(b'png')",
        "import pathlib; assert not (out.final_results / 'a.csv').exists()  # nothing before the commit",
        "out.commit()",
    )
    (done,) = notebooks.run_notebooks("smoke", build_data=False)
    assert done == paths.executed_dir("smoke") / "97_ok.ipynb"
    assert json.loads(done.read_text())["metadata"]["papermill"]["parameters"]["preset"] == "smoke"
    assert (paths.results_dir("smoke") / "a.csv").read_text() == "1\n"
    assert (paths.figures_dir("smoke") / "a.png").exists()
    assert not any(p.name.startswith(".staging") for p in paths.results_dir("smoke").iterdir())


def test_an_unchanged_notebook_is_not_rerun(tmp_path, monkeypatch):
    """A second run with the same code, library and parameters skips the notebook; a changed cell, another
    parameter or --force runs it again."""
    monkeypatch.setenv("TURBOSPARSE_ROOT", str(tmp_path))
    runs = tmp_path / "runs.txt"
    cells = (f"open({str(runs)!r}, 'a').write('ran\\n')",)
    _notebook(tmp_path, "96_once.ipynb", *cells)
    for _ in range(2):
        notebooks.run_notebooks("smoke", build_data=False)
    assert runs.read_text().count("ran") == 1
    notebooks.run_notebooks("smoke", build_data=False, force=True)
    assert runs.read_text().count("ran") == 2
    notebooks.run_notebooks("smoke", parameters={"extra": 1}, build_data=False)
    assert runs.read_text().count("ran") == 3
    _notebook(tmp_path, "96_once.ipynb", *cells, "x = 1")
    notebooks.run_notebooks("smoke", build_data=False)
    assert runs.read_text().count("ran") == 4


def test_require_names_the_command(tmp_path):
    with pytest.raises(outputs.MissingPrerequisite, match=r"turbosparse-notebooks --preset cpu --only 02"):
        outputs.require("cpu", "02", "the from-scratch models", tmp_path / "nope")
    outputs.require("cpu", "02", "nothing", tmp_path)  # present: no error


def test_committed_cpu_results_come_from_committed_cpu_runs():
    """data/results/cpu and figures/cpu hold only what notebooks whose committed copy is the cpu run wrote:
    no result outlives the run that made it (a notebook re-run at cpu replaces its own files)."""
    import subprocess

    ran = set()
    for nb_path in notebooks.list_notebooks():
        meta = nbformat.read(nb_path, as_version=4).metadata.get("papermill", {})
        if meta.get("parameters", {}).get("preset") == "cpu":
            ran.add(nb_path.name[:2])
    files = subprocess.run(
        ["git", "ls-files", "data/results/cpu", "figures/cpu"],
        cwd=paths.repo_root(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    owner = {"data_summary.csv": "00", "mixture_report.csv": "00"}
    for f in files:
        name = f.rsplit("/", 1)[-1]
        num = owner.get(name, name[:2])
        assert num in ran, f"{f} is committed but notebook {num} holds no cpu run: rerun it or remove the file"


def test_leftovers_of_a_killed_run_are_cleared(tmp_path, monkeypatch):
    monkeypatch.setenv("TURBOSPARSE_ROOT", str(tmp_path))
    running = paths.executed_dir("smoke") / ".05_relufication.running.ipynb"
    staged = [
        paths.results_dir("smoke") / ".staging-05" / "a.csv",
        paths.figures_dir("smoke") / ".staging-07" / "b.png",
    ]
    kept = paths.results_dir("smoke") / "05_table.csv"
    for f in (running, *staged, kept):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("x")
    gone = notebooks.clear_leftovers("smoke")
    assert len(gone) == 3 and not running.exists() and not any(f.parent.exists() for f in staged)
    assert kept.exists()

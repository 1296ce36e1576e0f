"""The headless runner: order, parameters, loud failures, nothing half-written."""

import json

import nbformat
import pytest

from turbosparse_lib import notebooks, paths


def test_notebooks_are_ordered_and_tagged():
    nbs = notebooks.list_notebooks()
    assert nbs and nbs[0].name == "00_data.ipynb"
    for nb_path in nbs:
        nb = nbformat.read(nb_path, as_version=4)
        params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(params) == 1, f"{nb_path.name} needs exactly one cell tagged 'parameters'"
        assert 'preset = "smoke"' in params[0].source, "the notebook's own default must be the smoke preset"
        assert any("NBVAL_CHECK_OUTPUT" in c.source for c in nb.cells if c.cell_type == "code"), nb_path.name


def test_unknown_preset_fails_before_running():
    with pytest.raises(ValueError, match="unknown preset"):
        notebooks.run_notebooks("huge")
    assert notebooks.main(["--preset", "huge"]) == 1


def test_failing_notebook_is_reported_and_kept_aside(tmp_path, monkeypatch, built_data):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    p = nbformat.v4.new_code_cell('preset = "smoke"')
    p.metadata["tags"] = ["parameters"]
    nb.cells = [p, nbformat.v4.new_code_cell("raise ValueError('boom in cell')")]
    (tmp_path / "notebooks").mkdir()
    nbformat.write(nb, tmp_path / "notebooks" / "99_fail.ipynb")
    monkeypatch.setenv("TURBOSPARSE_ROOT", str(tmp_path))
    with pytest.raises(RuntimeError, match="(?s)99_fail.ipynb failed at preset 'smoke'.*boom in cell"):
        notebooks.run_notebooks("smoke", build_data=False)
    out = paths.executed_dir("smoke")
    assert sorted(p.name for p in out.iterdir()) == ["99_fail.failed.ipynb"]


@pytest.mark.slow
def test_smoke_run_of_all_notebooks(built_data):
    """CI's papermill pass: every notebook at the smoke preset, executed copies written."""
    out = notebooks.run_notebooks("smoke")
    assert [p.name for p in out] == [p.name for p in notebooks.list_notebooks()]
    for p in out:
        nb = json.loads(p.read_text())
        assert nb["metadata"]["papermill"]["parameters"]["preset"] == "smoke"
        assert not any(o.get("output_type") == "error" for c in nb["cells"] for o in c.get("outputs", []))

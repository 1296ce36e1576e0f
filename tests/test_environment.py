"""pyproject.toml is the one source of dependencies; environment.yml must stay in step."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_torch_pinned_exactly():
    deps = _pyproject()["project"]["dependencies"]
    torch = [d for d in deps if d.replace(" ", "").startswith("torch")]
    assert torch == ["torch==2.13.0"], "torch must be pinned to ==2.13.0 (other versions pull a multi-GB CUDA build)"


def test_environment_yml_matches_pyproject():
    text = (ROOT / "environment.yml").read_text()
    lines = [ln.strip() for ln in text.splitlines()]
    assert "- python=3.11" in lines, "environment.yml must pin python 3.11"
    assert "- pip" in lines
    pip_lines = [ln[2:].strip() for ln in lines if ln.startswith("- -e ")]
    assert pip_lines, "environment.yml must install the package itself through pip (`- -e .[extras]`)"
    extras = set(pip_lines[0].split("[", 1)[1].rstrip("]").split(","))
    assert extras == set(_pyproject()["project"]["optional-dependencies"]), (
        f"environment.yml installs extras {sorted(extras)} but pyproject.toml defines "
        f"{sorted(_pyproject()['project']['optional-dependencies'])}"
    )
    # no package may be listed in environment.yml directly: pyproject.toml is the one source
    listed = [
        ln
        for ln in lines
        if ln.startswith("- ")
        and ln not in ("- python=3.11", "- pip", "- pip:")
        and not ln.startswith("- -e")
        and not ln.startswith("- conda-forge")
    ]
    assert listed == [], f"environment.yml lists packages of its own: {listed}; put them in pyproject.toml"


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make test" in ci
    assert "make reproduce" in readme

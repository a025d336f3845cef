"""The project installs the way README says: same dependencies for pip and conda, a working console command."""

import subprocess
import sys
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _normalise(spec: str) -> tuple[str, str]:
    req = Requirement(spec)
    return req.name.lower().replace("_", "-"), str(req.specifier)


def test_environment_yml_names_the_same_dependencies_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    from_pyproject = {_normalise(s) for s in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        from_pyproject |= {_normalise(s) for s in extra}

    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1, "environment.yml must have exactly one pip section"
    from_conda = {_normalise(s) for s in pip_sections[0] if not s.startswith("-e")}
    assert from_conda == from_pyproject, (
        f"only in environment.yml: {sorted(from_conda - from_pyproject)}; "
        f"only in pyproject.toml: {sorted(from_pyproject - from_conda)}")
    assert "-e ." in pip_sections[0], "environment.yml must install the project itself"


def test_console_command_help_lists_the_subcommands():
    out = subprocess.run([sys.executable, "-m", "minimoe.cli", "--help"], capture_output=True, text=True, check=True)
    assert "usage: minimoe" in out.stdout
    assert "demo" in out.stdout


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "bash .ci/run" in readme
    assert "bash .ci/setup" in readme

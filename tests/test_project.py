"""The project's own files agree with each other: conda.yaml with pyproject.toml, and no text that cites
the tracker's issue numbers (a reader cannot look them up)."""

import re
import subprocess
import tomllib

import yaml

from tests.helpers import REPO


def test_conda_env_installs_exactly_the_declared_dependencies():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    conda = yaml.safe_load((REPO / "conda.yaml").read_text())["dependencies"]
    pip = next(item["pip"] for item in conda if isinstance(item, dict))
    strip = lambda spec: spec.split("#")[0].replace(" ", "")  # noqa: E731
    assert sorted(map(strip, pip)) == sorted(map(strip, declared))


def test_the_conda_python_is_one_pyproject_accepts():
    conda = yaml.safe_load((REPO / "conda.yaml").read_text())["dependencies"]
    python = next(item for item in conda if isinstance(item, str) and item.startswith("python="))
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires.startswith(">=") and tuple(map(int, python[7:].split("."))) >= \
        tuple(map(int, requires[2:].split(".")))


def test_no_text_in_the_project_cites_an_issue_number():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    pattern = re.compile(r"\b(issue|round|stop) #?\d+\b", re.IGNORECASE)
    hits = [f"{path}:{n}: {line.strip()}" for path in tracked if not path.endswith((".png", ".gz", ".npz"))
            for n, line in enumerate((REPO / path).read_text(errors="ignore").splitlines(), 1)
            if pattern.search(line)]
    assert hits == []

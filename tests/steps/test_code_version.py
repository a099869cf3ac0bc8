"""The code version that `main` reuses finished steps by: it changes with the code, and only with the code."""

import shutil
import subprocess

import pytest

from pipeline.steps import step_runs
from tests.helpers import REPO


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A real git checkout shaped like the project (its .gitignore, a package, MLproject), one commit made."""
    shutil.copy(REPO / ".gitignore", tmp_path / ".gitignore")
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "step.py").write_text("print('a step')\n")
    (tmp_path / "MLproject").write_text("name: x\n")

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    monkeypatch.setattr(step_runs, "PROJECT_DIR", tmp_path)
    return tmp_path


def test_stores_and_their_journals_do_not_change_the_code_version(checkout):
    clean = step_runs.code_version()
    assert "dirty" not in clean and not clean.startswith("nogit")
    # what commands write and remove as they run, next to the code: sqlite's rollback journals (not in
    # .gitignore), stores, a prepared cache, a report
    for name in ("mlflow.db-journal", "optuna.db-journal", "mlflow.db", "reports.html", "notes/run.txt"):
        (checkout / name).parent.mkdir(exist_ok=True)
        (checkout / name).write_text("runtime state")
    assert step_runs.code_version() == clean


def test_new_code_and_edited_code_change_it(checkout):
    clean = step_runs.code_version()
    (checkout / "pipeline" / "new_step.py").write_text("print('new')\n")
    new_file = step_runs.code_version()
    assert new_file.startswith(clean + "-dirty-")
    (checkout / "pipeline" / "new_step.py").unlink()
    assert step_runs.code_version() == clean
    (checkout / "MLproject").write_text("name: y\n")
    assert step_runs.code_version() not in (clean, new_file)


def test_a_file_gone_between_listing_and_reading_is_no_error(checkout):
    # git lists a link under pipeline/ whose target is gone: reading it fails as a file removed mid-way would
    clean = step_runs.code_version()
    (checkout / "pipeline" / "gone.py").symlink_to(checkout / "removed.py")
    assert step_runs.code_version() == clean

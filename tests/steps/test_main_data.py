"""`main` reuses a finished prepare step only on raw files of the same contents, found from where `main`
was started (the real CLI in subprocesses, real IDX files, a real sqlite store)."""

import mlflow
import pytest

from pipeline.core.idx import raw_digest, raw_files_in
from pipeline.names import RAW_DIGEST_TAG, STEP_TAG
from pipeline.steps.main import absolute_file_url
from tests.fault_helpers import run_cli
from tests.helpers import write_fake_dataset


def main_in(folder, env: dict, *args) -> mlflow.entities.Run:
    """Run `main` from ``folder``; returns its prepare step's run."""
    done = run_cli(env, "main", "--trials", 0, "--epochs", 1, "--val-size", 100, *args, cwd=folder)
    assert done.returncode == 0, done.stderr[-3000:]
    newest = mlflow.search_runs(search_all_experiments=True, output_format="list", max_results=1,
                                filter_string="attributes.run_name = 'main'",
                                order_by=["attributes.start_time DESC"])[0]
    return mlflow.get_run(newest.data.tags[STEP_TAG.format("prepare")])


@pytest.mark.slow
def test_prepare_is_reused_only_on_the_same_raw_files(mlflow_store, subprocess_env, tmp_path):
    work = tmp_path / "work"
    raw = write_fake_dataset(work / "raw", seed=0)
    env = {**subprocess_env, "FASHION_MNIST_DIR": str(raw)}  # no --data-dir: the data comes from the environment

    first = main_in(work, env)
    first_digest = raw_digest(raw_files_in(raw))
    write_fake_dataset(raw, seed=1)  # the same folder, other images
    second = main_in(work, env)
    assert second.info.run_id != first.info.run_id  # prepared afresh, not the old split
    assert first.data.params["source"] == second.data.params["source"] == str(raw)
    assert first.data.tags[RAW_DIGEST_TAG] == first_digest
    assert second.data.tags[RAW_DIGEST_TAG] == raw_digest(raw_files_in(raw)) != first_digest

    # the same files, named by a path relative to where main starts (steps run in the project folder)
    del env["FASHION_MNIST_DIR"]
    third = main_in(work, env, "--data-dir", "raw")
    assert third.info.run_id == second.info.run_id


def test_relative_store_paths_are_taken_from_where_main_starts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_file_url("sqlite:///optuna.db") == f"sqlite:///{tmp_path}/optuna.db"
    assert absolute_file_url("journal:///runs/optuna.log") == f"journal:///{tmp_path}/runs/optuna.log"
    assert absolute_file_url("optuna.journal") == str(tmp_path / "optuna.journal")
    for url in ("sqlite:////srv/optuna.db", "journal:////srv/optuna.log", "postgresql://u@db.example/optuna"):
        assert absolute_file_url(url) == url

"""A full disk and a read-only tracking location, made for real: small tmpfs mounts (root only).

Each case runs the real CLI in a subprocess with its MLflow sqlite store (and its working folder, where
``./mlruns`` goes) on the small disk, and checks: one line, a non-zero exit, and every run the store
holds FAILED (or no run at all, when not even the run's row could be written).
"""

import errno
import os

import pytest
from mlflow import MlflowClient

from tests.fault_helpers import error_line, fill, run_cli, run_statuses, tmpfs
from tests.helpers import write_fake_dataset

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root"),
]


@pytest.fixture
def small_disk(tmp_path, subprocess_env, monkeypatch):
    """A 3 MB disk holding the store and ./mlruns; the data cache (./data) points at the big disk."""
    raw = write_fake_dataset(tmp_path / "raw", n_train=6000, n_test=1000)  # a 5.5 MB prepared split
    (tmp_path / "cache").mkdir()
    with tmpfs(tmp_path / "disk", "3m") as disk:
        (disk / "data").symlink_to(tmp_path / "cache")
        uri = f"sqlite:///{disk / 'mlflow.db'}"
        monkeypatch.chdir(disk)  # the store's experiment keeps its artifacts in ./mlruns, on the small disk
        MlflowClient(uri).search_experiments()  # the store exists before the disk fills up
        yield disk, raw, {**subprocess_env, "MLFLOW_TRACKING_URI": uri}, uri


def test_artifacts_on_a_full_disk_end_in_a_failed_run(small_disk):
    disk, raw, env, uri = small_disk
    done = run_cli(env, "prepare", "--data-dir", raw, "--val-size", "1000", cwd=disk)
    assert "the disk is full" in error_line(done)
    assert run_statuses(uri) == {"prepare": ["FAILED"]}


def test_a_cache_on_a_full_disk_ends_in_a_failed_run_and_leaves_no_half_file(small_disk):
    disk, raw, env, uri = small_disk
    (disk / "data").unlink()  # now the 5.5 MB split itself is written to the small disk
    done = run_cli(env, "prepare", "--data-dir", raw, "--val-size", "1000", cwd=disk)
    assert "the disk is full" in error_line(done)
    assert run_statuses(uri) == {"prepare": ["FAILED"]}
    assert list((disk / "data").rglob("*.npz")) == []  # the half-written split was removed


def test_a_store_that_cannot_grow_is_one_line_and_leaves_no_run(small_disk):
    disk, raw, env, uri = small_disk
    fill(disk)
    done = run_cli(env, "prepare", "--data-dir", raw, "--val-size", "1000", cwd=disk)
    assert "database or disk is full" in error_line(done)
    assert run_statuses(uri) == {}  # not even the run's row could be written: nothing is RUNNING


def test_a_read_only_tracking_location_is_one_line(tmp_path, subprocess_env):
    raw = write_fake_dataset(tmp_path / "raw")
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        env = {**subprocess_env, "MLFLOW_TRACKING_URI": f"sqlite:///{ro / 'store' / 'mlflow.db'}"}
        done = run_cli(env, "prepare", "--data-dir", raw, "--val-size", "100")
        line = error_line(done)
        assert "cannot be written" in line and str(ro) in line
        assert not (ro / "store").exists()


def test_the_filler_really_fills_the_disk(tmp_path):
    # The oracle for the tests above: after fill() the disk takes not one more byte.
    with tmpfs(tmp_path / "disk", "1m") as disk:
        fill(disk)
        with pytest.raises(OSError) as caught, open(disk / "more", "wb") as f:
            f.write(bytes(4096))
            f.flush()
            os.fsync(f.fileno())
        assert caught.value.errno == errno.ENOSPC


def test_a_read_only_working_folder_ends_in_a_failed_run(tmp_path, subprocess_env, mlflow_store):
    # The store is writable; the cache (./data) and the artifacts (./mlruns) are not.
    raw = write_fake_dataset(tmp_path / "raw")
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        done = run_cli(subprocess_env, "prepare", "--data-dir", raw, "--val-size", "100", cwd=ro)
    assert "Read-only file system" in error_line(done)
    assert run_statuses(mlflow_store) == {"prepare": ["FAILED"]}

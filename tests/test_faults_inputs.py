"""Bad inputs, each through the real CLI in a subprocess, on a real sqlite store: one line, non-zero exit,
and a FAILED run (or, where the command fails before it opens one, no run at all: never RUNNING/FINISHED).
"""

import gzip
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pytest

from pipeline.config import DataConfig, TrainConfig
from pipeline.core.idx import read_idx
from pipeline.core.splits import PREPARED_FILE, Splits, prepare_splits
from pipeline.errors import PipelineError
from pipeline.steps.train import train
from pipeline.support.tracking import load_data
from tests.fault_helpers import error_line, run_in_process, run_statuses
from tests.helpers import write_fake_dataset, write_idx

AS_ROOT = os.geteuid() == 0
# Root reads any file whatever its mode; without these two capabilities it obeys the mode like anyone.
WITHOUT_ROOT_READ = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if AS_ROOT else []


@pytest.fixture
def fake(tmp_path):
    return write_fake_dataset(tmp_path / "raw")


def prepared_fake(fake, tmp_path, **cfg) -> tuple:
    return prepare_splits(DataConfig(data_dir=str(fake), val_size=100, **cfg), cache_root=tmp_path / "cache")


# ---------------------------------------------------------------------------------------------------
# Splits that are empty or too small


@pytest.mark.parametrize("n_test, options, expected", [
    (0, ["--val-size", "100"], "the test split holds no images"),
    (200, ["--val-size", "599"], "the train split holds 1 image"),
    (200, ["--val-size", "100", "--limit", "1"], "the train split holds 1 image"),
])
def test_prepare_refuses_empty_splits_and_a_one_image_training_set(mlflow_store, tmp_path, n_test, options,
                                                                   expected):
    raw = write_fake_dataset(tmp_path / "raw", n_train=600, n_test=n_test)
    done = run_in_process("prepare", "--data-dir", raw, *options)
    assert expected in error_line(done)
    assert run_statuses(mlflow_store) == {"prepare": ["FAILED"]}


def test_a_prepared_file_with_an_empty_split_is_refused_not_scored_nan(mlflow_store, tmp_path):
    # A prepared file from elsewhere (an old version, a hand-made one) with no test images.
    arrays = {f"{s}_{k}": np.zeros((0, 28, 28) if k == "x" else 0, np.uint8 if k == "x" else np.int64)
              for s in ("train", "val", "test") for k in ("x", "y")}
    arrays.update(train_x=np.zeros((5, 28, 28), np.uint8), train_y=np.zeros(5, np.int64),
                  val_x=np.zeros((5, 28, 28), np.uint8), val_y=np.zeros(5, np.int64))
    np.savez(tmp_path / PREPARED_FILE, **arrays)
    done = run_in_process("train", "--data", tmp_path / PREPARED_FILE, "--epochs", "1")
    assert "the test split holds no images; run prepare again" in error_line(done)
    assert run_statuses(mlflow_store) == {"train": ["FAILED"]}


# ---------------------------------------------------------------------------------------------------
# A damaged cache


def test_a_truncated_prepared_cache_is_rebuilt(mlflow_store, fake):
    args = ["prepare", "--data-dir", fake, "--val-size", "100"]
    assert run_in_process(*args).returncode == 0
    (cached,) = Path("data/prepared").glob("*/" + PREPARED_FILE)  # the cache, under the test's folder
    good = Splits.load(cached)
    cached.write_bytes(cached.read_bytes()[: cached.stat().st_size // 2])
    # Reading it directly says what is wrong, in one line, and the run that tried is FAILED.
    done = run_in_process("train", "--data", cached, "--epochs", "1")
    assert "not a valid prepared split" in error_line(done)
    # prepare does not trust it: it prepares the split again, identical to the first.
    again = run_in_process(*args)
    assert again.returncode == 0 and "is damaged; preparing it again" in again.stderr, again.stderr
    rebuilt = Splits.load(cached)
    for name in Splits.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(rebuilt, name), getattr(good, name))
    assert run_statuses(mlflow_store) == {"prepare": ["FINISHED", "FINISHED"], "train": ["FAILED"]}


# ---------------------------------------------------------------------------------------------------
# Data files and folders that cannot be read


@pytest.mark.slow
@pytest.mark.parametrize("what", ["file", "folder"])
def test_unreadable_data_is_one_line_and_a_failed_run(mlflow_store, subprocess_env, fake, what):
    target = fake / "train-images-idx3-ubyte.gz" if what == "file" else fake
    target.chmod(0)
    try:
        done = subprocess.run([*WITHOUT_ROOT_READ, sys.executable, "-m", "pipeline", "prepare", "--data-dir",
                               str(fake), "--val-size", "100"], env=subprocess_env, capture_output=True, text=True,
                              timeout=300)
    finally:
        target.chmod(0o755)
    line = error_line(done)
    assert "Permission denied" in line and str(target) in line
    assert run_statuses(mlflow_store) == {"prepare": ["FAILED"]}


# ---------------------------------------------------------------------------------------------------
# Settings out of range: refused before anything runs (exit 2), no run opened


@pytest.mark.parametrize("args", [
    ["train", "--lr", "inf"], ["train", "--lr", "1e39"], ["train", "--weight-decay", "inf"],
    ["train", "--weight-decay", "4e38"], ["tune", "--lr-high", "inf"], ["tune", "--wd-high", "1e39"],
])
def test_infinite_or_beyond_float32_settings_are_refused(mlflow_store, args):
    done = run_in_process(*args)
    assert done.returncode == 2
    line = error_line(done)
    assert "must be a finite number within float32's range" in line and args[1][2:].replace("-", "_") in line
    assert run_statuses(mlflow_store) == {}


def test_divergence_from_weight_decay_names_it(mlflow_store, fake, tmp_path):
    _, path, _ = prepared_fake(fake, tmp_path)
    done = run_in_process("train", "--data", path, "--lr", "0.5", "--weight-decay", "100", "--epochs", "3",
                          "--batch-size", "10")
    line = error_line(done)
    assert "with lr 0.5 and weight decay 100" in line and "lower the weight decay" in line
    assert run_statuses(mlflow_store) == {"train": ["FAILED"]}


# ---------------------------------------------------------------------------------------------------
# Hostile or broken files


def test_an_idx_header_claiming_a_huge_shape_is_reported_exactly(tmp_path):
    huge = 2**32 - 1
    path = tmp_path / "huge-idx3-ubyte"
    header = bytes([0, 0, 8, 3]) + b"".join(huge.to_bytes(4, "big") for _ in range(3))
    path.write_bytes(header + bytes(100))
    with pytest.raises(PipelineError) as caught:
        read_idx(path)
    expected_bytes = 16 + huge**3  # exact: Python integers, no overflow
    assert caught.value.message == (f"{path}: file truncated: header says shape ({huge}, {huge}, {huge}) "
                                    f"({expected_bytes} bytes) but the file has 116 bytes")
    # the same claim inside a gzip file is read the same way
    gz = write_idx(tmp_path / "small-idx1-ubyte", np.zeros(3, np.uint8))
    gz.write_bytes(gzip.compress(bytes([0, 0, 8, 1]) + huge.to_bytes(4, "big")))
    with pytest.raises(PipelineError, match=rf"shape \({huge},\) \({8 + huge} bytes\) but the file has 8 bytes"):
        read_idx(gz)


def test_a_python_tag_in_an_experiment_file_is_one_line_and_never_run(mlflow_store, tmp_path):
    marker = tmp_path / "pwned"
    spec = tmp_path / "hostile.yaml"
    spec.write_text("experiment: x\nentry_point: train\nparams:\n"
                    f"  lr: !!python/object/apply:os.system ['touch {marker}']\n")
    line = error_line(run_in_process("experiment", spec))
    assert "hostile.yaml line 4: params.lr" in line and "python/object/apply:os.system" in line
    assert not marker.exists() and run_statuses(mlflow_store) == {}


# ---------------------------------------------------------------------------------------------------
# Leaks


@pytest.mark.slow
def test_fetching_the_prepared_artifact_leaves_no_copy_behind(mlflow_store, fake, tmp_path, monkeypatch):
    assert run_in_process("prepare", "--data-dir", fake, "--val-size", "100").returncode == 0
    (run_id,) = mlflow.search_runs(search_all_experiments=True)["run_id"]
    (cached,) = Path("data/prepared").glob("*/" + PREPARED_FILE)
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # where every temporary folder now goes
    fetched = load_data(f"runs:/{run_id}/prepared")
    assert list(temp.iterdir()) == []  # the downloaded copy is gone ...
    np.testing.assert_array_equal(fetched.train_x, Splits.load(cached).train_x)  # ... its arrays in memory


@pytest.mark.slow
def test_predict_on_test_images_without_data_opens_no_run(mlflow_store, fake, tmp_path):
    splits, _, _ = prepared_fake(fake, tmp_path)
    with mlflow.start_run(run_name="train"):
        _, info = train(TrainConfig(epochs=1), splits, progress=False)
    before = run_statuses(mlflow_store)
    done = run_in_process("predict", "--model-uri", info.model_uri, "--test", "2")  # prepares the default split
    assert done.returncode == 0 and done.stdout.count("test[") == 2, done.stdout + done.stderr
    assert run_statuses(mlflow_store) == before == {"train": ["FINISHED"]}

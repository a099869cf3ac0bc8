"""Bad inputs, each through the real CLI in a subprocess, on a real sqlite store: one line, non-zero exit,
and a FAILED run (or, where the command fails before it opens one, no run at all: never RUNNING/FINISHED).
"""

import gzip
import io
import os
import re
import subprocess
import sys
import tempfile
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from pipeline.config import DataConfig, TrainConfig
from pipeline.core.idx import read_idx
from pipeline.core.splits import PREPARED_FILE, Splits, prepare_splits
from pipeline.errors import PipelineError
from pipeline.tracking.datasets import load_data
from pipeline.tracking.training import train
from tests.fault_helpers import error_line, run_in_process, run_statuses
from tests.helpers import REPO, write_fake_dataset, write_idx

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
    # the same claim inside a gzip file: more than its bytes can decompress to, refused before decompressing
    gz = write_idx(tmp_path / "small-idx1-ubyte", np.zeros(3, np.uint8))
    gz.write_bytes(gzip.compress(bytes([0, 0, 8, 1]) + huge.to_bytes(4, "big")))
    size = gz.stat().st_size
    with pytest.raises(PipelineError, match=rf"shape \({huge},\) \({8 + huge} bytes\) but the file has {size} "
                                            rf"bytes of gzip, which decompress to at most {size * 1032} bytes"):
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


def test_predict_refuses_a_negative_test_count_in_one_line(mlflow_store):
    done = run_in_process("predict", "--model-uri", "models:/m-none", "--test", "-3")
    assert done.returncode == 2
    assert [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error:")] == \
           ["Error: Invalid value for '--test': -3 is not in the range x>=0."]
    assert run_statuses(mlflow_store) == {}  # refused before any model is loaded or run opened


# ---------------------------------------------------------------------------------------------------
# Hostile experiment files: refused in one line, naming the file and the line, before any run


def experiment_file(path: Path, fake: Path, text: bytes | str, name: str = "hostile") -> Path:
    """An experiment file on the fake data, 1 epoch a run (what runs, if it is not refused, costs little);
    ``text`` follows the fixed lines 1-4."""
    head = (f"experiment: {name!r}\nentry_point: train\ndata: {{data_dir: '{fake}', val_size: 100}}\n"
            "params: {epochs: 1}\n").encode()
    path.write_bytes(head + (text.encode() if isinstance(text, str) else text))
    return path


def billion_laughs(levels: int = 9) -> str:
    """Each level a list of ten aliases of the one below: a few lines that expand to 10**levels strings."""
    lists = ["&l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lists += [f"&l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "description: [" + ", ".join(lists) + "]\n"


HOSTILE_FILES = {  # id: (text after line 4, the error line's words)
    "alias bomb": (billion_laughs(), "line 5: anchors and aliases (&name, *name) are not read in this file"),
    "an alias": ("grid: {lr: &rates [0.1, 1.0], weight_decay: *rates}\n", "line 5: anchors and aliases"),
    "not UTF-8": (b"description: caf\xe9\n", "is not UTF-8 text (byte 0xe9 at offset"),
    "20,000 deep": ("description: " + "[" * 20_000 + "]" * 20_000 + "\n",
                    "line 5: lists and mappings nested more than 20 levels deep"),
    "a huge value": ("grid: {lr: [" + "x" * 1_000_000 + "]}\n", "line 5: grid.lr must be a number, got 'xxx"),
    "a huge list": ("seeds: [" + ", ".join(["7"] * 100_000) + "]\n",
                    "line 5: seeds must be a non-empty list of distinct integers, got [7, 7, 7, 7, 7, ...]"),
    "a 5,000-digit integer": ("grid: {batch_size: [" + "1" * 5000 + "]}\n",
                              "line 5: grid.batch_size cannot be read: 'Exceeds the limit (4300 digits)"),
    "a NUL character": ("description: a\0b\n", "is not valid YAML: 'unacceptable character #x0000: special "
                                                "characters are not allowed'"),
}


@pytest.mark.parametrize("text, expected", HOSTILE_FILES.values(), ids=HOSTILE_FILES)
def test_hostile_experiment_files_are_one_short_line_and_never_run(mlflow_store, fake, tmp_path, text, expected):
    path = experiment_file(tmp_path / "hostile.yaml", fake, text)
    line = error_line(run_in_process("experiment", path))
    assert f"Error: {path}" in line and expected in line
    assert len(line) < 400  # what the file holds is echoed cut short, never in full
    assert run_statuses(mlflow_store) == {}


@pytest.mark.parametrize("name", ["/etc/evil", "../../../tmp/x", ".hidden", "-h", "a/b", "x" * 101, "a b", ""])
def test_an_experiment_name_that_is_no_plain_folder_name_is_refused(mlflow_store, fake, tmp_path, name):
    path = experiment_file(tmp_path / "named.yaml", fake, "", name=name)
    line = error_line(run_in_process("experiment", path))
    assert f"{path} line 1: experiment {name[:27]!r}"[:-1] in line and "is not a usable name" in line
    assert run_statuses(mlflow_store) == {} and mlflow.get_experiment_by_name(name) is None


# ---------------------------------------------------------------------------------------------------
# The size of an experiment: counted before anything runs, refused past --max-runs


@pytest.mark.parametrize("text, expected", [
    ("grid: {" + ", ".join(f"{k}: [{', '.join(map(str, range(1, 11)))}]" for k in
                           ("lr", "weight_decay", "batch_size", "patience", "seed", "shuffle_offset")) + "}\n",
     "line 5: 1,000,000 runs (1,000,000 grid points x 1 seed) is more than --max-runs 1,000; shrink the grid or "
     "the seeds, or pass --max-runs 1000000 to run them all"),
    ("seeds: [" + ", ".join(map(str, range(100_000))) + "]\n",
     "line 5: 100,000 runs (1 grid point x 100,000 seeds) is more than --max-runs 1,000"),
], ids=["a million grid points", "100,000 seeds"])
def test_an_experiment_of_too_many_runs_is_refused_before_it_starts(mlflow_store, fake, tmp_path, text, expected):
    path = experiment_file(tmp_path / "big.yaml", fake, text)
    assert expected in error_line(run_in_process("experiment", path))
    assert run_statuses(mlflow_store) == {}


@pytest.mark.slow
def test_max_runs_raises_the_limit_and_the_runs_are_counted_first(mlflow_store, fake, tmp_path):
    path = experiment_file(tmp_path / "two.yaml", fake, "seeds: [0, 1]\n")
    assert "2 runs (1 grid point x 2 seeds) is more than --max-runs 1;" in error_line(
        run_in_process("experiment", path, "--max-runs", "1"))
    done = run_in_process("experiment", path, "--max-runs", "2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("[experiment hostile] 2 runs (1 grid point x 2 seeds)\n"), done.stdout
    assert run_statuses(mlflow_store) == {"two": ["FINISHED"], "seed=0": ["FINISHED"], "seed=1": ["FINISHED"]}


# ---------------------------------------------------------------------------------------------------
# `mlflow run` in one experiment, the file's runs in another: refused


def test_a_launched_run_in_another_experiment_is_refused_and_failed(mlflow_store, fake, tmp_path, monkeypatch):
    # What `mlflow run` without --experiment-name does: its run, in the Default experiment, then the command.
    launched = MlflowClient().create_run("0", run_name="launched")
    monkeypatch.setenv("MLFLOW_RUN_ID", launched.info.run_id)
    path = experiment_file(tmp_path / "elsewhere.yaml", fake, "")
    line = error_line(run_in_process("experiment", path))
    assert ("mlflow run recorded this run in experiment 'Default', but the file's runs go to 'hostile'; pass "
            "--experiment-name hostile to mlflow run") in line
    run = MlflowClient().get_run(launched.info.run_id)
    assert run.info.status == "FAILED" and "--experiment-name hostile" in run.data.tags["pipeline.failure"]
    assert run_statuses(mlflow_store) == {"launched": ["FAILED"]} and mlflow.get_experiment_by_name("hostile") is None


@pytest.mark.slow
def test_mlflow_run_without_the_files_experiment_name_is_refused(subprocess_env, mlflow_store, fake, tmp_path):
    path = experiment_file(tmp_path / "elsewhere.yaml", fake, "")
    done = subprocess.run([str(Path(sys.executable).parent / "mlflow"), "run", str(REPO), "-e", "experiment",
                           "--env-manager", "local", "-P", f"file={path}"],
                          env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "Error: mlflow run recorded this run in experiment 'Default', but the file's runs go to 'hostile'; " \
           "pass --experiment-name hostile to mlflow run" in done.stderr, done.stderr
    (launched,) = MlflowClient().search_runs(["0"])  # the run `mlflow run` made, in the Default experiment
    assert launched.data.tags["mlflow.project.entryPoint"] == "experiment" and launched.info.status == "FAILED"
    assert "--experiment-name hostile" in launched.data.tags["pipeline.failure"]
    assert len(run_statuses(mlflow_store)) == 1 and mlflow.get_experiment_by_name("hostile") is None


# ---------------------------------------------------------------------------------------------------
# `report` never writes outside its --out folder, whatever the experiment is called


def experiment_with_a_run(name: str) -> None:
    with mlflow.start_run(experiment_id=mlflow.create_experiment(name), run_name="r"):
        mlflow.log_param("lr", 0.1)
        mlflow.log_metric("best_val_accuracy", 0.8)


@pytest.mark.parametrize("name", ["{tmp}/evil", "../escaped", "deeper/../../../escaped", "."])
def test_report_refuses_a_name_that_leads_out_of_its_folder(mlflow_store, tmp_path, name):
    name = name.format(tmp=tmp_path)
    experiment_with_a_run(name)
    before = sorted(tmp_path.rglob("*"))
    line = error_line(run_in_process("report", name, "--out", "out"))
    assert "which is not inside out: the experiment's name or a link leads out of it" in line
    assert sorted(tmp_path.rglob("*")) == before  # nothing written anywhere
    assert run_statuses(mlflow_store) == {"r": ["FINISHED"]}  # and no report run


def test_report_refuses_links_that_lead_out_of_its_folder(mlflow_store, tmp_path):
    experiment_with_a_run("linked")
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "linked").symlink_to(outside)  # the report's folder is a link
    assert "which is not inside out" in error_line(run_in_process("report", "linked", "--out", "out"))
    (tmp_path / "out" / "linked").unlink()
    (tmp_path / "out" / "linked").mkdir()
    (tmp_path / "out" / "linked" / "leaderboard.md").symlink_to(outside / "victim")  # one of its files is
    line = error_line(run_in_process("report", "linked", "--out", "out"))
    assert f"the report would write '{outside / 'victim'}', which is not inside {tmp_path / 'out/linked'}" in line
    assert list(outside.iterdir()) == []
    assert run_statuses(mlflow_store) == {"r": ["FINISHED"]}


# ---------------------------------------------------------------------------------------------------
# Hostile prepared files (splits.npz): one line naming the file, "run prepare again", a FAILED run


def good_arrays() -> dict:
    rng = np.random.default_rng(0)
    return {f"{s}_{k}": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8) if k == "x"
            else np.arange(20, dtype=np.int64) % 10 for s in ("train", "val", "test") for k in ("x", "y")}


def claiming_a_billion_images(path: Path) -> None:
    """A splits.npz whose train_x header claims 10**9 images of 28x28 (730 GiB) but holds five."""
    arrays = good_arrays()
    with zipfile.ZipFile(path, "w") as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            if name == "train_x":
                np.lib.format.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False,
                                                              "shape": (10**9, 28, 28)})
                member.write(array[:5].tobytes())
            else:
                np.save(member, array)
            archive.writestr(name + ".npy", member.getvalue())


HOSTILE_SPLITS = {  # id: (change to good arrays, the error line's words)
    "label 99": ({"train_y": np.full(20, 99, np.int64)}, "the train split has label 99 at index 0, outside 0..9"),
    "label -1": ({"val_y": np.r_[np.zeros(19, np.int64), -1]}, "the val split has label -1 at index 19, outside 0..9"),
    "27x27 images": ({"test_x": np.zeros((20, 27, 27), np.uint8)},
                     "the test images are uint8 of shape (20, 27, 27); expected uint8 of shape (N, 28, 28)"),
    "float images": ({"train_x": np.zeros((20, 28, 28), np.float32)},
                     "the train images are float32 of shape (20, 28, 28); expected uint8"),
    "float labels": ({"test_y": np.zeros(20, np.float64)},
                     "the test labels are float64 of shape (20,); expected int64"),
    "a billion images": (None, "its arrays claim 784,000,031,840 bytes, the file has"),
}


@pytest.mark.parametrize("change, expected", HOSTILE_SPLITS.values(), ids=HOSTILE_SPLITS)
def test_hostile_prepared_files_are_one_line_and_a_failed_run(mlflow_store, tmp_path, change, expected):
    path = tmp_path / PREPARED_FILE
    if change is None:
        claiming_a_billion_images(path)
    else:
        np.savez(path, **{**good_arrays(), **change})
    line = error_line(run_in_process("train", "--data", path, "--epochs", "1"))
    assert line.startswith(f"Error: {path}: ") and expected in line and line.endswith("run prepare again")
    assert run_statuses(mlflow_store) == {"train": ["FAILED"]}


# ---------------------------------------------------------------------------------------------------
# Gzip bombs among the raw files: memory follows the header's claim, not what the bomb expands to


def gzip_bomb(path: Path, header: bytes, zeros: int = 64 << 20) -> Path:
    """A gzip file holding ``header`` and then ``zeros`` zero bytes: 64 MiB from about 64 KB."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: the gzip format
    chunk = bytes(1 << 20)
    path.write_bytes(packer.compress(header) + b"".join(packer.compress(chunk) for _ in range(zeros >> 20))
                     + packer.flush())
    return path


@pytest.mark.parametrize("images, expected", [
    (10, "header says shape (10, 28, 28) (7856 bytes) but the file has more"),
    (10**9, "header says shape (1000000000, 28, 28) (784000000016 bytes) but the file has"),
])
def test_a_gzip_bomb_is_refused_without_filling_memory(tmp_path, images, expected):
    header = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (images, 28, 28))
    bomb = gzip_bomb(tmp_path / "train-images-idx3-ubyte.gz", header)
    tracemalloc.start()
    try:
        with pytest.raises(PipelineError, match=re.escape(expected)):
            read_idx(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20  # the 64 MiB it expands to were never held


"""PyTorch's threads are the command's setting (`--threads`), set once at its start: the library's training
functions leave them as their caller set them."""

import contextlib

import mlflow
import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.config import ThreadsConfig, TrainConfig
from pipeline.core.models import build_model
from pipeline.core.stacked import fit_stacked
from pipeline.core.training import Tensors, fit
from pipeline.study_config import SearchSpace, TuneConfig
from pipeline.tuning.study import run_study

OTHER = ThreadsConfig().threads + 2  # a count no function of ours has a reason to choose


@contextlib.contextmanager
def threads_set_to(count: int):
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(ThreadsConfig().threads)  # what conftest set for the other tests


def test_training_functions_leave_the_threads_alone(data_slice):
    tensors, cfg = Tensors.from_splits(data_slice[0]), TrainConfig(epochs=1)
    with threads_set_to(OTHER):
        fit(build_model(cfg), tensors, cfg)
        assert torch.get_num_threads() == OTHER
        fit_stacked([cfg, TrainConfig(epochs=1, lr=0.2)], tensors)
        assert torch.get_num_threads() == OTHER


@pytest.mark.slow
def test_a_study_leaves_the_threads_alone(data_slice, mlflow_store, tmp_path):
    cfg = TuneConfig(trials=1, storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="s", test_best=False)
    with threads_set_to(OTHER):
        run_study(cfg, SearchSpace(epochs_low=1, epochs_high=1), str(data_slice[1]))
        assert torch.get_num_threads() == OTHER


def test_train_sets_and_records_the_threads_it_is_given(data_slice, mlflow_store):
    with threads_set_to(ThreadsConfig().threads):
        result = CliRunner().invoke(cli, ["train", "--data", str(data_slice[1]), "--epochs", "1",
                                          "--threads", str(OTHER)])
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == OTHER
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.data.params["threads"] == str(OTHER)


def test_threads_below_one_are_refused_in_one_line(data_slice, mlflow_store):
    result = CliRunner().invoke(cli, ["train", "--data", str(data_slice[1]), "--threads", "0"])
    assert result.exit_code != 0
    assert [line for line in result.output.splitlines() if line.startswith("Error:")] == \
           ["Error: threads must be >= 1, got 0"]
    assert not mlflow.search_runs(search_all_experiments=True, output_format="list")

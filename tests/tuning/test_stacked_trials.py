"""Trials side by side in a study: real sqlite MLflow stores and Optuna storages, real processes, a
real SIGINT and a real kill -9."""

import signal
import subprocess
import sys
from dataclasses import fields

import mlflow
import pytest
from optuna.trial import TrialState

from pipeline.config import TrainConfig
from pipeline.core.models import build_model
from pipeline.core.training import Tensors, fit
from pipeline.names import (
    FAIL_REASON_ATTR,
    FAILURE_TAG,
    INTERRUPTED_ATTR,
    MODEL_URI_ATTR,
    RUN_ID_ATTR,
    SIDE_BY_SIDE_TAG,
)
from pipeline.study_config import SearchSpace, TuneConfig
from pipeline.tuning.study import run_study
from tests.study_helpers import (
    SMALL_SPACE,
    assert_one_finished_run_per_trial,
    load,
    running_with_run,
    tune_command,
    wait_for_trials,
)

# ---------------------------------------------------------------------------------------------------
# The study: ask/tell, one MLflow run per trial, interrupts and kills


@pytest.mark.slow
def test_a_study_side_by_side_equals_the_study_one_at_a_time(data_slice, mlflow_store, tmp_path):
    """Same seed: the same trials with the same results, each with its own complete MLflow run. A trial
    that joined the stack late records where in the batch orders it started; trained alone from there,
    it gives its recorded result."""
    _, data = data_slice
    cfg = TuneConfig(trials=5, storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="one", pruner="none",
                     test_best=False, side_by_side=1)
    alone = run_study(cfg, SMALL_SPACE, str(data))
    together = run_study(TuneConfig(**{**cfg.__dict__, "study_name": "three", "side_by_side": 3}),
                         SMALL_SPACE, str(data))

    assert [t.state for t in together.trials] == [TrialState.COMPLETE] * 5
    assert [t.params for t in together.trials] == [t.params for t in alone.trials]
    assert [t.value for t in together.trials[:3]] == pytest.approx([t.value for t in alone.trials[:3]], abs=2e-3)
    assert_one_finished_run_per_trial(together)
    client = mlflow.MlflowClient()
    offsets = []
    for ours, theirs in zip(together.trials, alone.trials):
        run, reference = (mlflow.get_run(t.user_attrs[RUN_ID_ATTR]) for t in (ours, theirs))
        offsets.append(int(run.data.params["shuffle_offset"]))
        assert run.info.status == "FINISHED" and {**run.data.params, "shuffle_offset": "0"} == reference.data.params
        assert run.data.metrics.keys() == reference.data.metrics.keys()  # per-epoch, best_epoch, epochs_run...
        assert ours.user_attrs[MODEL_URI_ATTR].startswith("models:/")
        assert {a.path for a in client.list_artifacts(run.info.run_id)} == \
               {a.path for a in client.list_artifacts(reference.info.run_id)}
        if offsets[-1]:  # joined late: its recorded settings, trained alone, give its result
            cfg_used = config_from_params(run.data.params)
            assert fit(build_model(TrainConfig()), Tensors.from_splits(data_slice[0]), cfg_used).best_val_accuracy == \
                pytest.approx(ours.value, abs=2e-3)
            continue
        assert run.data.metrics["best_epoch"] == reference.data.metrics["best_epoch"]
        curve = [m.value for m in client.get_metric_history(run.info.run_id, "val_loss")]
        assert curve == pytest.approx([m.value for m in client.get_metric_history(reference.info.run_id, "val_loss")],
                                      rel=1e-3)
    assert all(mlflow.get_run(t.user_attrs[RUN_ID_ATTR]).data.tags[SIDE_BY_SIDE_TAG] == "3" for t in together.trials)
    assert offsets[:3] == [0, 0, 0] and all(offsets[3:])  # trials 3 and 4 took finished trials' places


def config_from_params(params: dict) -> TrainConfig:
    """The TrainConfig a run logged (MLflow keeps params as strings; another model's settings are not logged)."""
    return TrainConfig(**{f.name: params[f.name] == "True" if f.type is bool else f.type(params[f.name])
                          for f in fields(TrainConfig) if f.name in params})


@pytest.mark.slow
def test_a_diverging_trial_fails_alone_in_its_group(data_slice, mlflow_store, tmp_path):
    _, data = data_slice
    huge_lr = SearchSpace(lr_low=1e37, lr_high=1e38, epochs_low=1, epochs_high=2)  # loss becomes NaN
    cfg = TuneConfig(trials=3, storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="s", test_best=False,
                     side_by_side=3)
    with pytest.warns(UserWarning, match="out of range"):  # the seed recipe's lr lies outside this space
        study = run_study(cfg, huge_lr, str(data))

    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL]
    for trial in study.trials[1:]:
        assert "training diverged at epoch 1" in trial.user_attrs[FAIL_REASON_ATTR]
        run = mlflow.get_run(trial.user_attrs[RUN_ID_ATTR])
        assert run.info.status == "FAILED" and "diverged" in run.data.tags[FAILURE_TAG]
    assert_one_finished_run_per_trial(study)


def wait_for_group(storage: str, size: int) -> None:
    """Wait until the seed trial (10 epochs) has completed while the rest of its group still trains."""
    wait_for_trials(storage, lambda trials: len(trials) == size and trials[0].state == TrialState.COMPLETE
                    and all(map(running_with_run, trials[1:])),
                    f"no group of {size} with its seed trial complete")


LONG_TRIALS = ["--epochs-low", "300", "--epochs-high", "300", "--patience", "0", "--pruner", "none"]


@pytest.mark.slow
def test_ctrl_c_fails_every_running_trial_and_the_next_run_resumes(data_slice, subprocess_env, tmp_path):
    _, data = data_slice
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    process = subprocess.Popen(tune_command(data, storage, "--trials", "3", "--side-by-side", "3", *LONG_TRIALS),
                               env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_group(storage, 3)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0, output

    study = load(storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] + [TrialState.FAIL] * 2, output
    for trial in study.trials[1:]:
        assert trial.user_attrs[INTERRUPTED_ATTR] == "interrupted (SIGINT)"
        run = mlflow.get_run(trial.user_attrs[RUN_ID_ATTR])
        assert run.info.status == "KILLED" and "interrupted (SIGINT)" in run.data.tags[FAILURE_TAG], output

    # interrupted trials hold no place: the next run trains 2 new ones
    resume = subprocess.run(tune_command(data, storage, "--trials", "3", "--side-by-side", "3"), env=subprocess_env,
                            capture_output=True, text=True, timeout=300)
    assert resume.returncode == 0, resume.stdout + resume.stderr
    study = load(storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] + [TrialState.FAIL] * 2 + [TrialState.COMPLETE] * 2
    assert_one_finished_run_per_trial(study)


@pytest.mark.slow
def test_killed_worker_group_is_failed_and_the_next_run_goes_on(data_slice, subprocess_env, tmp_path):
    """kill -9 mid-group: each trial recorded its owner, so the next run on this host sees the process
    gone, fails them all and goes on (another host would see each trial's own heartbeat stop)."""
    _, data = data_slice
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    cfg = TuneConfig(trials=3, storage=storage, study_name="s", test_best=False, heartbeat_interval=1,
                     patience=0, pruner="none", side_by_side=3)
    long_trials = SearchSpace(epochs_low=300, epochs_high=300)
    script = f"import sys; from pipeline.tuning.study import *; run_study({cfg!r}, {long_trials!r}, sys.argv[1])"
    process = subprocess.Popen([sys.executable, "-c", script, str(data)], env=subprocess_env)
    wait_for_group(storage, 3)
    process.kill()
    process.wait()

    study = run_study(cfg, SMALL_SPACE, str(data))
    # without an owner or heartbeats of their own the two would stay RUNNING forever, holding their places
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] + [TrialState.FAIL] * 2 + [TrialState.COMPLETE] * 2
    for trial in study.trials[1:3]:
        killed = mlflow.get_run(trial.user_attrs[RUN_ID_ATTR])
        assert killed.info.status == "KILLED" and "died" in killed.data.tags[FAILURE_TAG]
    assert_one_finished_run_per_trial(study)

"""The Optuna study: real storages (sqlite, journal file, PostgreSQL), real MLflow stores, real processes.

Trials run on a 2,000-image slice of the real data with a few epochs, so each takes well under a second.
"""

import signal
import subprocess
import sys
import time
from dataclasses import replace

import mlflow
import optuna
import pytest
from click.testing import CliRunner
from optuna.trial import TrialState

from pipeline.cli import cli
from pipeline.config import TrainConfig
from pipeline.core.splits import array_digest
from pipeline.errors import PipelineError
from pipeline.names import (
    BEST_MODEL_TAG,
    FAIL_REASON_ATTR,
    INTERRUPTED_ATTR,
    MODEL_NAME,
    MODEL_URI_ATTR,
    RUN_ID_ATTR,
    SPLIT_CHAMPION,
)
from pipeline.study_config import SearchSpace, TuneConfig, is_journal
from pipeline.tuning.search import make_pruner, make_sampler
from pipeline.tuning.storage import open_storage
from pipeline.tuning.study import run_study
from tests.study_helpers import (
    SMALL_SPACE,
    assert_one_finished_run_per_trial,
    load,
    running_with_run,
    trial_runs,
    tune_command,
    wait_for_trials,
)

# ---------------------------------------------------------------------------------------------------
# Configuration errors: caught before any study or run exists


@pytest.mark.parametrize("space, message", [
    (SearchSpace(lr_low=0.5, lr_high=0.1), "--lr-low 0.5 is above --lr-high 0.1"),
    (SearchSpace(lr_low=0.0), "lr bounds are searched on a log scale"),
    (SearchSpace(wd_low=-1e-4), "wd bounds are searched on a log scale"),
    (SearchSpace(wd_low=0.1, wd_high=0.01), "--wd-low 0.1 is above --wd-high 0.01"),
    (SearchSpace(epochs_low=0), "--epochs-low must be >= 1"),
    (SearchSpace(epochs_low=20, epochs_high=10), "--epochs-low 20 is above --epochs-high 10"),
])
def test_bad_search_space_is_rejected(space, message):
    with pytest.raises(ValueError, match=message):
        space.validate()


@pytest.mark.parametrize("cfg, message", [
    (TuneConfig(trials=0), "trials must be >= 1"),
    (TuneConfig(workers=0), "workers must be >= 1"),
    (TuneConfig(sampler="grid"), "sampler must be one of tpe, random, gp"),
    (TuneConfig(storage="optuna.db"), "neither a database URL"),
])
def test_bad_tune_config_is_rejected(cfg, message):
    with pytest.raises(ValueError, match=message):
        cfg.validate()


def test_defaults_are_valid():
    SearchSpace().validate()
    TuneConfig().validate()


@pytest.mark.parametrize("name, cls", [("tpe", optuna.samplers.TPESampler), ("random", optuna.samplers.RandomSampler),
                                       ("gp", optuna.samplers.GPSampler)])
def test_samplers(name, cls):
    assert isinstance(make_sampler(name, seed=0), cls)


@pytest.mark.parametrize("name, cls", [("median", optuna.pruners.MedianPruner),
                                       ("hyperband", optuna.pruners.HyperbandPruner),
                                       ("none", optuna.pruners.NopPruner)])
def test_pruners(name, cls):
    assert isinstance(make_pruner(name, SearchSpace()), cls)


@pytest.mark.parametrize("bad", [["--lr-low", "1", "--lr-high", "0.01"], ["--wd-low", "0"], ["--trials", "0"]])
def test_cli_rejects_bad_options_before_a_study_starts(bad, new_mlflow_store, tmp_path):
    db = tmp_path / "optuna.db"
    result = CliRunner().invoke(cli, ["tune", "--storage", f"sqlite:///{db}", *bad])
    assert result.exit_code == 2, result.output
    assert "Invalid value" not in result.output and "Error:" in result.output
    assert not db.exists() and not (tmp_path / "mlflow.db").exists()  # no study, no run: nothing was created


def test_unreachable_database_is_a_clear_error():
    cfg = TuneConfig(storage="postgresql://someone:secret@127.0.0.1:1/nothing")
    with pytest.raises(PipelineError) as e:
        open_storage(cfg)
    assert "cannot open the Optuna storage postgresql://someone:***@127.0.0.1:1/nothing" in e.value.message
    assert "secret" not in e.value.message


@pytest.mark.parametrize("url, path", [("journal:///study.log", "study.log"),
                                       ("runs/study.journal", "runs/study.journal")])
def test_journal_file_storage_urls(url, path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    optuna.create_study(study_name="s", storage=open_storage(TuneConfig(storage=url)))
    assert (tmp_path / path).stat().st_size > 0
    assert load(url).study_name == "s"


def test_only_paths_and_journal_urls_are_journal_files():
    assert is_journal("journal:///optuna.log") and is_journal("/shared/study.journal")
    assert not is_journal("sqlite:///optuna.log")


# ---------------------------------------------------------------------------------------------------
# Studies on a slice of the real data


@pytest.mark.slow
def test_small_study_on_real_data(data_slice, mlflow_store, tmp_path):
    """A complete study: seed trial first, a child run per trial, the best model evaluated and registered."""
    _, data = data_slice
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    with mlflow.start_run() as parent:
        study = run_study(TuneConfig(trials=5, storage=storage, study_name="s"), SMALL_SPACE, str(data))

    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 5  # no pruning in 5 startup trials
    seed = TrainConfig()
    # the seed recipe, its epochs capped to the space's; no weight decay, so none drawn
    assert study.trials[0].params == {"lr": seed.lr, "epochs": min(seed.epochs, SMALL_SPACE.epochs_high),
                                      "use_weight_decay": False}
    assert_one_finished_run_per_trial(study)

    run = mlflow.get_run(parent.info.run_id)
    best = study.best_trial
    assert run.data.tags[BEST_MODEL_TAG] == best.user_attrs[MODEL_URI_ATTR] == study.user_attrs["best_model_uri"]
    assert run.data.tags[BEST_MODEL_TAG].startswith("models:/")
    assert run.data.metrics["best_val_accuracy"] == pytest.approx(best.value)
    assert float(run.data.params["best_lr"]) == pytest.approx(best.params["lr"])
    assert int(run.data.params["best_epochs"]) == best.params["epochs"]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "study")}
    assert {f"study/{name}.png" for name in ("optimization_history", "param_importances", "parallel_coordinate",
                                             "slice", "intermediate_values")} <= artifacts
    trials_csv = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/study/trials.csv")
    assert len(trials_csv.strip().splitlines()) == 1 + 5

    evaluation = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                    filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}' "
                                                  "and attributes.run_name = 'evaluate'")
    assert len(evaluation) == 1 and 0.5 < evaluation[0].data.metrics["test_accuracy"] <= 1
    assert run.data.metrics["best_test_accuracy"] == evaluation[0].data.metrics["test_accuracy"]
    for end in ("low", "high"):  # the best trial's 95% interval, beside its test accuracy
        assert run.data.metrics[f"best_test_accuracy_ci_{end}"] == evaluation[0].data.metrics[f"test_accuracy_ci_{end}"]
    # chosen on a slice, not the default split: the best of its split, never the champion make serve serves
    split_champion = SPLIT_CHAMPION.format(array_digest(data_slice[0].val_x, data_slice[0].val_y))
    registered = mlflow.MlflowClient().get_registered_model(MODEL_NAME)
    assert set(registered.aliases) == {split_champion}
    held = mlflow.models.get_model_info(f"models:/{MODEL_NAME}@{split_champion}")
    assert held.model_id == run.data.tags[BEST_MODEL_TAG].removeprefix("models:/")


@pytest.mark.slow
def test_resume_keeps_trials_and_same_seed_gives_same_study(data_slice, mlflow_store, tmp_path):
    _, data = data_slice
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    cfg = TuneConfig(trials=3, storage=storage, study_name="a", pruner="none", test_best=False,
                     side_by_side=1)  # one at a time: tests/tuning/test_stacked_trials.py covers groups
    first = run_study(cfg, SMALL_SPACE, str(data))
    before = [(t.number, t.params, t.value) for t in first.trials]

    resumed = run_study(replace(cfg, trials=5), SMALL_SPACE, str(data))
    assert len(resumed.trials) == 5
    assert [(t.number, t.params, t.value) for t in resumed.trials[:3]] == before  # resumed, not overwritten
    assert_one_finished_run_per_trial(resumed)

    again = run_study(replace(cfg, study_name="b", trials=5), SMALL_SPACE, str(data))
    assert [(t.params, t.value) for t in again.trials] == [(t.params, t.value) for t in resumed.trials]


@pytest.mark.slow
def test_diverging_trials_fail_and_the_study_goes_on(data_slice, mlflow_store, tmp_path):
    _, data = data_slice
    huge_lr = SearchSpace(lr_low=1e37, lr_high=1e38, epochs_low=1, epochs_high=2)  # loss becomes NaN
    cfg = TuneConfig(trials=3, storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="s", test_best=False)
    with pytest.warns(UserWarning, match="out of range"):  # the seed recipe's lr lies outside this space
        study = run_study(cfg, huge_lr, str(data))

    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL]
    assert study.best_trial.number == 0
    for trial in study.trials[1:]:
        assert "training diverged at epoch 1" in trial.user_attrs[FAIL_REASON_ATTR]
        run = mlflow.get_run(trial.user_attrs[RUN_ID_ATTR])
        assert run.info.status == "FAILED" and "diverged" in run.data.tags["pipeline.failure"]
    assert_one_finished_run_per_trial(study)


def wait_for_running_trial(storage: str, number: int) -> None:
    """Wait until trial ``number`` is running and has its MLflow run."""
    wait_for_trials(storage, lambda trials: len(trials) > number and running_with_run(trials[number]),
                    f"trial {number} did not start", timeout=120)


@pytest.mark.slow
def test_ctrl_c_fails_the_trial_and_the_next_run_resumes(data_slice, subprocess_env, tmp_path):
    _, data = data_slice
    storage = f"journal:///{tmp_path / 'optuna.log'}"  # any storage would do: this test covers journal files
    # Long trials (many epochs, no early stopping) so that trial 1 is surely running when we interrupt.
    long_trials = ["--epochs-low", "300", "--epochs-high", "300", "--patience", "0", "--pruner", "none",
                   "--side-by-side", "1"]  # one at a time: tests/tuning/test_stacked_trials.py covers groups
    process = subprocess.Popen(tune_command(data, storage, "--trials", "3", *long_trials), env=subprocess_env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_running_trial(storage, 1)
    time.sleep(0.5)  # into its training
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0, output

    study = load(storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL], output
    interrupted = mlflow.get_run(study.trials[1].user_attrs[RUN_ID_ATTR])
    assert interrupted.info.status == "KILLED", output
    assert "interrupted (SIGINT)" in interrupted.data.tags["pipeline.failure"]

    # The next run fills the interrupted trial's place: 3 trials with a result, plus the failed one.
    resume = subprocess.run(tune_command(data, storage, "--trials", "3"), env=subprocess_env,
                            capture_output=True, text=True, timeout=300)
    assert resume.returncode == 0, resume.stdout + resume.stderr
    study = load(storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL] + [TrialState.COMPLETE] * 2
    assert_one_finished_run_per_trial(study)


@pytest.mark.slow
def test_killed_worker_is_failed_at_once_by_the_next_run(data_slice, subprocess_env, tmp_path):
    """kill -9 leaves no chance to clean up: the next run sees the trial's owner process gone and closes it.

    (A worker on another host is found by its missing heartbeats instead: tests/faults/test_kills.py.)
    """
    _, data = data_slice
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    cfg = TuneConfig(trials=2, storage=storage, study_name="s", test_best=False, patience=0, pruner="none",
                     side_by_side=1)  # one at a time: tests/tuning/test_stacked_trials.py kills a group
    long_trials = SearchSpace(epochs_low=300, epochs_high=300)
    script = ("import sys; from pipeline.tuning.study import *; "
              f"run_study({cfg!r}, {long_trials!r}, sys.argv[1])")
    process = subprocess.Popen([sys.executable, "-c", script, str(data)], env=subprocess_env)
    wait_for_running_trial(storage, 1)
    process.kill()
    process.wait()

    study = run_study(cfg, SMALL_SPACE, str(data))  # at once: no waiting for missed heartbeats
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    killed = mlflow.get_run(study.trials[1].user_attrs[RUN_ID_ATTR])
    assert killed.info.status == "KILLED" and "died without ending it" in killed.data.tags["pipeline.failure"]
    assert_one_finished_run_per_trial(study)


@pytest.mark.slow
def test_workers_share_one_study(data_slice, subprocess_env, tmp_path):
    _, data = data_slice
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"  # the default storage, and the one most prone to locking
    result = subprocess.run(tune_command(data, storage, "--trials", "6", "--workers", "2"), env=subprocess_env,
                            capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Traceback" not in output and "locked" not in output
    study = load(storage)
    assert len(study.trials) == 6 and all(t.state.is_finished() for t in study.trials)
    assert_one_finished_run_per_trial(study)
    parents = {r.data.tags["mlflow.parentRunId"] for r in trial_runs("s")}
    assert len(parents) == 1  # one parent run for the invocation, whichever process ran the trial


# ---------------------------------------------------------------------------------------------------
# Two machines' worth of workers on one PostgreSQL database


@pytest.mark.slow
def test_two_machines_share_one_study_on_postgres(postgres_url, data_slice, subprocess_env):
    """The same command started twice at once, as on two machines: together they run the trials asked for."""
    _, data = data_slice
    mlflow.search_experiments()  # machines share a tracking store that exists: create it before they start
    command = tune_command(data, postgres_url, "--trials", "6")
    processes = [subprocess.Popen(command, env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    for p, output in zip(processes, outputs):
        assert p.returncode == 0, output
        assert "Traceback" not in output

    study = load(postgres_url)
    # two machines that ask at the same moment for the last place each get a trial: the later-numbered
    # one gives way untrained (FAIL, "not needed", no run), so the study holds the 6 trials asked for
    surplus = [t for t in study.trials if t.user_attrs.get(INTERRUPTED_ATTR, "").startswith("not needed")]
    assert all(t.state == TrialState.FAIL and RUN_ID_ATTR not in t.user_attrs for t in surplus)
    assert len(study.trials) - len(surplus) == 6 and all(t.state.is_finished() for t in study.trials)
    assert sum("recipe" in t.user_attrs for t in study.trials) == 1  # the seed trial was queued once
    assert_one_finished_run_per_trial(study)
    assert len({r.data.tags["mlflow.parentRunId"] for r in trial_runs("s")}) <= 2

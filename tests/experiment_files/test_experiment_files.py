"""Experiment files: every file in experiments/ is valid, bad files are refused with the line, and a
shortened (smoke) version of each file really runs on a slice of the data."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from pipeline.errors import PipelineError
from pipeline.experiment_files.spec import load_spec
from pipeline.names import ROLE_TAG
from pipeline.steps.experiment import SMOKE, SMOKE_SUFFIX, Caps, run_experiment, seeded_points
from tests.helpers import REPO

FILES = sorted((REPO / "experiments").glob("*.yaml"))
REQUIRED = {"seed_baseline", "overfitting", "remedies", "tune_softmax", "numerical_stability", "convex_optimum"}


def write(tmp_path, text: str):
    path = tmp_path / "exp.yaml"
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def test_the_required_experiment_files_exist():
    assert {f.stem for f in FILES} >= REQUIRED


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_every_experiment_file_is_valid(path):
    spec = load_spec(path)
    assert spec.name == path.stem  # the MLflow experiment is named after the file
    assert spec.description
    if spec.entry_point == "tune":
        assert spec.study and spec.grid == []
    else:
        assert spec.grid and not spec.study


def test_book_recipe_and_overfitting_settings():
    seed = load_spec(REPO / "experiments/seed_baseline.yaml")
    assert seed.params == {"lr": 0.1, "epochs": 10, "batch_size": 256, "weight_decay": 0.0, "patience": 0,
                           "log_test_curve": True}
    assert seed.seeds == (0, 1, 2)  # the reports' paired tests pair each run with the recipe's same seed
    overfitting = load_spec(REPO / "experiments/overfitting.yaml")
    assert overfitting.params["patience"] == 0 and overfitting.params["log_test_curve"]
    assert [p["lr"] for p in overfitting.grid] == [0.1, 1.0]
    remedies = load_spec(REPO / "experiments/remedies.yaml")
    assert overfitting.seeds == remedies.seeds == seed.seeds
    remedy_keys = {k for point in remedies.grid for k in point}
    assert {"patience", "weight_decay", "input_dropout"} <= remedy_keys
    assert remedies.params["epochs"] == overfitting.params["epochs"]  # the same budget


def test_grid_expansion_mapping_and_list_of_mappings(tmp_path):
    spec = load_spec(write(tmp_path, """
        experiment: e
        entry_point: train
        params: {epochs: 3}
        grid:
          - {lr: [0.1, 1.0], weight_decay: [1e-4, 0.001]}
          - {augment: [true]}
    """))
    assert spec.grid == [{"lr": 0.1, "weight_decay": 1e-4}, {"lr": 0.1, "weight_decay": 0.001},
                         {"lr": 1.0, "weight_decay": 1e-4}, {"lr": 1.0, "weight_decay": 0.001},
                         {"augment": True}]
    assert isinstance(spec.grid[0]["weight_decay"], float)  # PyYAML reads 1e-4 as text; it became a float
    single = load_spec(write(tmp_path, "experiment: e\nentry_point: train\n"))
    assert single.grid == [{}] and single.params == {}


def test_seeds_repeat_every_grid_point(tmp_path):
    from pipeline.steps.experiment import runs_of

    spec = load_spec(write(tmp_path, """
        experiment: e
        entry_point: train
        grid: {lr: [0.1, 1.0]}
        seeds: [3, 7]
    """))
    assert spec.seeds == (3, 7) and runs_of(spec) == 4
    assert seeded_points(spec) == [({"lr": 0.1}, {"lr": 0.1, "seed": 3}), ({"lr": 0.1}, {"lr": 0.1, "seed": 7}),
                                   ({"lr": 1.0}, {"lr": 1.0, "seed": 3}), ({"lr": 1.0}, {"lr": 1.0, "seed": 7})]


BAD_FILES = [
    ("experiment: e\nentry_point: train\nparams:\n  epochs: 3\n  lrr: 0.1\n",
     r"line 5: unknown key 'lrr' in params \(did you mean 'lr'\? known: lr, epochs"),
    ("experiment: e\nentry_point: train\nepochs: 3\n", r"line 3: unknown key 'epochs' in the file"),
    ("experiment: e\nentry_point: fit\n",
     r"line 2: unknown entry point 'fit' \(known: train, stability, tune, convex_optimum\)"),
    ("experiment: e\nentry_point: train\nparams: {lr: fast}\n", r"line 3: params.lr must be a number, got 'fast'"),
    ("experiment: e\nentry_point: train\nparams:\n  epochs: 2.5\n", r"line 4: params.epochs must be an integer"),
    ("experiment: e\nentry_point: train\nparams: {epochs: true}\n", r"line 3: params.epochs must be an integer"),
    ("experiment: e\nentry_point: train\nparams: {augment: 1}\n", r"line 3: params.augment must be true/false"),
    ("experiment: e\nentry_point: train\ngrid:\n  lr: 0.1\n", r"line 4: grid.lr must be a non-empty list"),
    ("experiment: e\nentry_point: train\ngrid:\n  lr: [0.1, x]\n", r"line 4: grid.lr must be a number, got 'x'"),
    ("experiment: e\nentry_point: train\nparams: {lr: 0.1}\ngrid: {lr: [1.0]}\n",
     r"line 4: lr set in both params and grid"),
    ("experiment: e\nentry_point: train\n\ngrid:\n  - {lr: [0.1]}\n  - {lr: [-1.0]}\n",
     r"line 6: invalid TrainConfig \(grid point lr=-1\): lr must be > 0"),
    ("experiment: e\nentry_point: train\nparams:\n  epochs: 3\n  patience: -1\n",
     r"line 5: invalid TrainConfig: patience"),
    ("experiment: e\nentry_point: train\nstudy: {trials: 3}\n", r"line 3: 'study' is for entry point tune only"),
    ("experiment: e\nentry_point: tune\ngrid: {lr: [0.1]}\n", r"line 3: entry point tune takes a 'study'"),
    ("experiment: e\nentry_point: tune\n", r"line 1: entry point tune needs a 'study' section"),
    ("experiment: e\nentry_point: tune\nstudy:\n  trials: 3\n  lr_lo: 0.1\n", r"line 5: unknown key 'lr_lo' in study"),
    ("experiment: e\nentry_point: tune\nstudy: {sampler: bayes}\n", r"line 3: invalid TuneConfig: sampler must be"),
    ("experiment: e\nentry_point: stability\nparams: {scales: 10}\n",
     r"line 3: params.scales must be a list of numbers"),
    ("experiment: e\nentry_point: train\ndata: {val_size: 0}\n", r"line 3: invalid DataConfig: val_size"),
    ("entry_point: train\n", r"line 1: missing required key 'experiment'"),
    ("experiment: e\nentry_point: train\nexperiment: f\n", r"line 3: duplicate key 'experiment'"),
    ("- a\n- b\n", r"line 1: the file must be a mapping"),
    ("experiment: [e\n", r"is not valid YAML"),
    ("", r"is empty"),
    ("experiment: e\nentry_point: train\nseeds: [0, 0]\n", r"line 3: seeds must be a non-empty list of distinct"),
    ("experiment: e\nentry_point: train\nseeds: []\n", r"line 3: seeds must be a non-empty list of distinct"),
    ("experiment: e\nentry_point: train\nseeds: [0, x]\n", r"line 3: seeds must be a list of integers"),
    ("experiment: e\nentry_point: train\nparams: {seed: 1}\nseeds: [0, 1]\n",
     r"line 4: seed is set in params or grid and seeds lists the seeds; keep one"),
    ("experiment: e\nentry_point: train\ngrid: {seed: [1, 2]}\nseeds: [0]\n", r"line 4: seed is set in params or grid"),
    ("experiment: e\nentry_point: tune\nstudy: {trials: 3}\nseeds: [0]\n", r"line 4: entry point tune takes a 'study'"),
    ("experiment: e\nentry_point: convex_optimum\nseeds: [0]\n", r"line 3: entry point convex_optimum has no seed"),
    ("experiment: e\nentry_point: convex_optimum\nparams: {weight_decays: [0.1, -1.0]}\n",
     r"line 3: invalid ConvexConfig: weight_decays must be a non-empty list of numbers >= 0"),
]


@pytest.mark.parametrize("text,message", BAD_FILES, ids=[m.split(":")[-1][:40] for _, m in BAD_FILES])
def test_bad_files_are_refused_with_key_and_line(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(PipelineError, match=message) as error:
        load_spec(path)
    assert str(path) in error.value.message


def test_cli_refuses_a_bad_file_before_any_run(tmp_path, subprocess_env, mlflow_store):
    path = write(tmp_path, "experiment: e\nentry_point: train\nparams:\n  lrr: 0.1\n")
    result = subprocess.run([sys.executable, "-m", "pipeline", "experiment", str(path)],
                            env=subprocess_env, capture_output=True, text=True)
    assert result.returncode != 0
    assert f"{path} line 4: unknown key 'lrr' in params" in result.stderr
    assert mlflow.get_experiment_by_name("e") is None  # nothing was created


def children(parent_run_id: str, experiment: str) -> list:
    exp = MlflowClient().get_experiment_by_name(experiment)
    return MlflowClient().search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                      order_by=["attributes.start_time ASC"])


@pytest.mark.slow
@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_every_experiment_file_runs_shortened(path, mlflow_store, real_data_dir):
    spec = load_spec(path)
    result = run_experiment(spec, SMOKE)
    assert result["experiment"] == spec.name + SMOKE_SUFFIX
    parent = MlflowClient().get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags[ROLE_TAG] == "experiment"
    assert parent.data.params["cap_limit"] == str(SMOKE.limit)
    runs = children(result["parent_run_id"], result["experiment"])
    assert [r.info.run_id for r in runs] == result["run_ids"]
    assert all(r.info.status == "FINISHED" for r in runs)
    if spec.entry_point == "tune":
        (tune_run,) = runs
        trials = children(tune_run.info.run_id, result["experiment"])
        assert len(trials) == SMOKE.max_trials
        assert all(t.data.metrics["epochs_run"] <= SMOKE.max_epochs for t in trials)  # the seed trial too
        assert "best_val_accuracy" in tune_run.data.metrics
        return
    expected = seeded_points(spec)  # every grid point, once per seed where the file lists seeds
    assert len(runs) == len(expected)
    for run, (grid_point, point) in zip(runs, expected):
        assert json.loads(run.data.tags["pipeline.grid_point"]) == grid_point
        assert run.data.params["limit"] == str(SMOKE.limit)
        if spec.entry_point == "train":
            assert int(run.data.metrics["epochs_run"]) <= SMOKE.max_epochs
            assert {"best_val_accuracy", "test_accuracy"} <= set(run.data.metrics)
            for key, value in {**spec.params, **point}.items():
                if key != "epochs":  # capped by the smoke option
                    assert run.data.params[key] == str(value)
        elif spec.entry_point == "convex_optimum":
            assert int(run.data.params["max_iter"]) == SMOKE.max_steps
            assert {"optimum_val_accuracy", "test_accuracy", "test_accuracy_ci_low"} <= set(run.data.metrics)
        else:
            assert run.data.metrics["stable_all_finite"] == 1.0
            assert int(run.data.params["steps"]) == SMOKE.max_steps


@pytest.mark.slow
def test_a_diverging_point_fails_alone_and_the_others_are_kept(tmp_path, mlflow_store, real_data_dir):
    spec = load_spec(write(tmp_path, """
        experiment: divergence
        entry_point: train
        description: one sane and one absurd learning rate
        params: {epochs: 2, patience: 0}
        grid: {lr: [0.1, 1.0e+38]}
    """))
    with pytest.raises(PipelineError, match=r"1 of 2 runs failed \(lr=1e\+38: training diverged"):
        run_experiment(spec, Caps(limit=300))
    runs = MlflowClient().search_runs([mlflow.get_experiment_by_name("divergence-smoke").experiment_id],
                                      "tags.`pipeline.grid_point` != ''", order_by=["attributes.start_time ASC"])
    assert [r.info.status for r in runs] == ["FINISHED", "FAILED"]
    assert "test_accuracy" in runs[0].data.metrics
    assert "diverged" in runs[1].data.tags["pipeline.failure"]


@pytest.mark.slow
def test_mlflow_run_entry_point_and_report_command(subprocess_env, mlflow_store, real_data_dir):
    """The MLproject entry point (which calls the experiment command) and the report command, as processes."""
    # Every process runs in the test's temporary folder (the fixtures chdir there): nothing lands in the repo.
    seed_file = str(REPO / "experiments/seed_baseline.yaml")
    project = subprocess.run(
        [str(Path(sys.executable).parent / "mlflow"), "run", str(REPO), "-e", "experiment", "--env-manager", "local",
         "--experiment-name", "seed_baseline-smoke", "-P", f"file={seed_file}", "-P", "smoke=true"],
        env=subprocess_env, capture_output=True, text=True)
    assert project.returncode == 0, project.stderr[-3000:]
    experiment = mlflow.get_experiment_by_name("seed_baseline-smoke")
    parents = MlflowClient().search_runs([experiment.experiment_id], f"tags.`{ROLE_TAG}` = 'experiment'")
    # the run `mlflow run` created became the parent (not a second, empty one)
    (parent,) = parents
    assert parent.data.tags["mlflow.project.entryPoint"] == "experiment" and parent.info.status == "FINISHED"
    kids = children(parent.info.run_id, "seed_baseline-smoke")
    assert [k.data.tags["pipeline.seed"] for k in kids] == ["0", "1", "2"]  # the file's seeds, one run each
    assert all(k.info.status == "FINISHED" and "test_accuracy_ci_low" in k.data.metrics for k in kids)

    report = subprocess.run([sys.executable, "-m", "pipeline", "report", "seed_baseline-smoke", "--out", "out"],
                            env=subprocess_env, capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    assert all(report.stdout.count(f"| seed={s} |") == 1 for s in range(3))  # the runs; their parent is left out
    assert (Path("out") / "seed_baseline-smoke" / "leaderboard.csv").is_file()

    missing = subprocess.run([sys.executable, "-m", "pipeline", "report", "no-such-experiment"],
                             env=subprocess_env, capture_output=True, text=True)
    assert missing.returncode != 0 and "no MLflow experiment named 'no-such-experiment'" in missing.stderr


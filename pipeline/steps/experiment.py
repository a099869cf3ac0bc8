"""Step ``experiment``: run an experiment file (``experiments/*.yaml``) into one MLflow experiment.

The file's format is checked by ``pipeline.experiment_files.spec`` before anything runs. Then the data
are prepared once; a parent run (tag ``pipeline.role=experiment``, the YAML file as its artifact) holds
one nested run per grid point, each trained in-process with ``pipeline.tracking.training.train`` and then
tested with ``pipeline.tracking.evaluation.evaluate_on_test``, so every run in the report has a test
accuracy; a tune file runs its study through ``pipeline.tuning.study.run_study``.
"""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import click
import mlflow
import torch
from mlflow import MlflowClient
from mlflow.environment_variables import MLFLOW_RUN_ID

from pipeline.config import DataConfig, ThreadsConfig, TrainConfig
from pipeline.core.splits import prepare_splits
from pipeline.core.training import DivergedError, Tensors
from pipeline.errors import PipelineError, short_repr
from pipeline.experiment_files.grids import point_name
from pipeline.experiment_files.spec import ExperimentSpec, load_spec, runs_text, split_study
from pipeline.names import FAILURE_TAG, FILE_TAG, POINT_TAG, ROLE_TAG, SEED_TAG, SMOKE_TAG
from pipeline.steps.options import make_config, options_from
from pipeline.steps.stability import run_stability
from pipeline.study_config import ConvexConfig, ExperimentOptions, SearchSpace, StabilityConfig, TuneConfig
from pipeline.tracking.datasets import log_datasets
from pipeline.tracking.evaluation import evaluate_on_test
from pipeline.tracking.experiments import experiment_named, mark_as_training
from pipeline.tracking.owners import end_runs_of_dead_processes
from pipeline.tracking.runs import log_new_params, runs_killed_at_safe_points
from pipeline.tracking.stores import open_tracking_store
from pipeline.tracking.training import train


@dataclass(frozen=True)
class Caps:
    """Limits for smoke runs (0 = none): CI runs every experiment file this way, in seconds."""

    max_epochs: int = 0  # caps TrainConfig.epochs, the tune search's epochs, StabilityConfig.fit_epochs
    limit: int = 0  # images per split (DataConfig.limit)
    max_trials: int = 0  # caps a study's trials
    max_steps: int = 0  # caps StabilityConfig.steps

    @property
    def active(self) -> bool:
        return any(dataclasses.astuple(self))


SMOKE = Caps(max_epochs=2, limit=500, max_trials=2, max_steps=20)
SMOKE_SUFFIX = "-smoke"  # capped runs go to their own MLflow experiment and Optuna study


def capped(config, caps: Caps, **fields_to_cap):
    """``config`` with each named field lowered to the cap (a cap of 0 leaves the field alone)."""
    changes = {name: min(getattr(config, name), cap) for name, cap in fields_to_cap.items() if cap}
    return dataclasses.replace(config, **changes)


def experiment_id(name: str) -> str:
    """The id of the MLflow experiment ``name``, created if needed.

    Deliberately not ``mlflow.set_experiment``: under ``mlflow run`` the parent run already exists in
    the experiment ``mlflow run`` chose, and MLflow refuses to resume it while another is "active".
    """
    experiment = experiment_named(name)
    mark_as_training(experiment)  # the UI opens it on its training runs
    return experiment.experiment_id


def refuse_a_launched_run_elsewhere(name: str) -> None:
    """Under ``mlflow run``, the parent run already exists in the experiment ``mlflow run`` was given; the
    runs of the file must not go to another one, away from their parent. MLflow cannot move a run to
    another experiment, so the launched run ends FAILED and the message names the option to pass.
    """
    run_id = MLFLOW_RUN_ID.get()
    if not run_id:
        return
    client = MlflowClient()
    launched_in = client.get_experiment(client.get_run(run_id).info.experiment_id).name
    if launched_in != name:
        reason = (f"mlflow run recorded this run in experiment {short_repr(launched_in)}, but the file's runs go "
                  f"to {short_repr(name)}; pass --experiment-name {name} to mlflow run")
        client.set_tag(run_id, FAILURE_TAG, reason)
        client.set_terminated(run_id, status="FAILED")
        raise PipelineError(reason)


def run_experiment(spec: ExperimentSpec, caps: Caps = Caps()) -> dict:
    """Run every grid point (or the study) of ``spec``; returns the parent run id and the child run ids.

    A grid point whose training diverges ends as a FAILED run and the others still run; the call
    raises at the end, naming the failed points, so the command exits non-zero. Ctrl-C and SIGTERM end
    the parent run and the point's run KILLED at the next safe point (``pipeline.runtime.signals``): after the
    epoch under way, or when a convex-optimum or stability point ends (they compute, then write).
    """
    name = spec.name + (SMOKE_SUFFIX if caps.active else "")
    refuse_a_launched_run_elsewhere(name)
    if spec.entry_point != "tune":  # a study says how many trials it runs itself
        print(f"[experiment {spec.name}] {runs_text(len(spec.grid), len(spec.seeds))}")
    exp_id = experiment_id(name)
    limits = [n for n in (spec.data.limit, caps.limit) if n]  # 0 means "all images" in both
    data_cfg = dataclasses.replace(spec.data, limit=min(limits, default=0))
    splits, prepared_path, info = prepare_splits(data_cfg)
    with (mlflow.start_run(experiment_id=exp_id, run_name=Path(spec.path).stem, description=spec.description,
                           tags={ROLE_TAG: "experiment", FILE_TAG: spec.path, SMOKE_TAG: caps.active}) as parent,
          runs_killed_at_safe_points() as interrupted):
        mlflow.log_artifact(spec.path)
        log_new_params({"experiment_file": spec.path, "entry_point": spec.entry_point, "runs": runs_of(spec),
                        "threads": torch.get_num_threads(),
                        **{f"cap_{k}": v for k, v in dataclasses.asdict(caps).items()}})
        if spec.entry_point == "tune":
            children, failed = [run_tune(spec, caps, exp_id, prepared_path)], []
        else:
            children, failed = run_grid(spec, caps, exp_id, splits, data_cfg, info["source"], interrupted)
        mlflow.log_metrics({"runs_finished": len(children) - len(failed), "runs_failed": len(failed)})
    if failed:
        raise PipelineError(f"{len(failed)} of {len(children)} runs failed ({'; '.join(failed)}); the "
                            f"others are recorded in experiment '{name}'")
    return {"experiment": name, "parent_run_id": parent.info.run_id, "run_ids": children}


def runs_of(spec: ExperimentSpec) -> int:
    return 1 if spec.entry_point == "tune" else len(spec.grid) * max(1, len(spec.seeds))


def seeded_points(spec: ExperimentSpec) -> list[tuple[dict, dict]]:
    """(grid point, the point with its seed) for every run: seed by seed within each point.

    The grid point alone is the run's ``pipeline.grid_point`` tag, so the report groups a point's seeds.
    """
    return [(point, {**point, "seed": seed}) for point in spec.grid for seed in spec.seeds] if spec.seeds \
        else [(point, point) for point in spec.grid]


def run_grid(spec: ExperimentSpec, caps: Caps, exp_id: str, splits, data_cfg: DataConfig, source: str,
             interrupted=lambda: None):
    """One nested run per grid point (and seed); returns the run ids and a description of each failed one.

    ``interrupted``: the safe point (``tracking.runs.runs_killed_at_safe_points``), checked before each point
    and after each epoch."""
    tensors = Tensors.from_splits(splits)  # converted once, shared by every run
    run_ids, failed = [], []
    runs = seeded_points(spec)
    for i, (grid_point, point) in enumerate(runs, start=1):
        interrupted()
        name = point_name(point) or spec.name
        print(f"[experiment {spec.name}] run {i}/{len(runs)}: {name}")
        tags = {FILE_TAG: spec.path, POINT_TAG: json.dumps(grid_point)}
        if spec.seeds:
            tags[SEED_TAG] = point["seed"]
        try:
            with (mlflow.start_run(experiment_id=exp_id, run_name=name, nested=True, tags=tags) as run,
                  runs_killed_at_safe_points()):
                run_ids.append(run.info.run_id)
                log_new_params(dataclasses.asdict(data_cfg))
                log_datasets(splits, source)
                if spec.entry_point == "convex_optimum":
                    run_convex(spec, point, caps, splits, tensors)
                elif spec.entry_point == "stability":
                    cfg = capped(StabilityConfig(**spec.params, **point), caps,
                                 fit_epochs=caps.max_epochs, steps=caps.max_steps)
                    run_stability(cfg, splits, tensors)
                else:
                    cfg = capped(TrainConfig(**spec.params, **point), caps, epochs=caps.max_epochs)
                    _, model_info = train(cfg, splits, tensors=tensors, on_epoch=lambda metrics: interrupted())
                    evaluate_on_test(model_info.model_uri, splits)  # the kept (best val) model on test
        except DivergedError as e:  # the run has ended FAILED with the reason as a tag; go on
            failed.append(f"{name}: {e.message}")
    return run_ids, failed


def run_convex(spec: ExperimentSpec, point: dict, caps: Caps, splits, tensors) -> None:
    """The convex optimum; a smoke run compares with the smoke study, if there is one."""
    from pipeline.steps.convex_optimum import run_convex_optimum  # Optuna, only for this kind of file

    cfg = capped(ConvexConfig(**spec.params, **point), caps, max_iter=caps.max_steps)
    if caps.active and cfg.study_name:
        cfg = dataclasses.replace(cfg, study_name=cfg.study_name + SMOKE_SUFFIX)
    run_convex_optimum(cfg, splits, tensors, missing_study_ok=caps.active)


def run_tune(spec: ExperimentSpec, caps: Caps, exp_id: str, prepared_path: Path) -> str:
    """The study, through the tune module, in a nested run that becomes the trials' parent."""
    from pipeline.tuning.study import run_study  # Optuna, only for tune files

    tune_values, space_values = split_study(spec.study)
    tune_cfg = capped(TuneConfig(**tune_values), caps, trials=caps.max_trials).resolved()
    space = capped(SearchSpace(**space_values), caps, epochs_high=caps.max_epochs, epochs_low=caps.max_epochs)
    if caps.active:
        # A study on a data slice must neither join the real study nor register its model as champion.
        tune_cfg = dataclasses.replace(tune_cfg, study_name=tune_cfg.study_name + SMOKE_SUFFIX, test_best=False)
    with mlflow.start_run(experiment_id=exp_id, run_name="tune", nested=True, tags={FILE_TAG: spec.path}) as run:
        run_study(tune_cfg, space, str(prepared_path))
    return run.info.run_id


@click.command("experiment")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@options_from(ExperimentOptions, ThreadsConfig)
def experiment_command(file, **options):
    """Every grid point (and seed) of the file is one nested run under a parent run; a tune file runs its study."""
    opts = make_config(ExperimentOptions, options)
    torch.set_num_threads(make_config(ThreadsConfig, options).threads)
    spec = load_spec(file, opts.max_runs)  # a bad file fails here, naming the line, before anything runs
    open_tracking_store()
    end_runs_of_dead_processes()
    result = run_experiment(spec, SMOKE if opts.smoke else Caps())
    click.echo(f"{len(result['run_ids'])} run(s) in experiment '{result['experiment']}' (parent run "
               f"{result['parent_run_id']}); compare them: python -m pipeline report {result['experiment']}")

"""Step ``main``: prepare -> train (or tune) -> evaluate -> register, as one parent run with child runs.

This follows MLflow's ``multistep_workflow`` example: each step is an MLproject entry point launched
with ``mlflow.projects.run`` inside the parent run (which makes it a child run), and a step that already
finished with the same entry point, parameters and code is reused instead of run again; ``prepare`` also
on the same raw files, by their contents' digest, as DVC's run cache keys a stage on its inputs' hashes.
Steps hand data to each other through run URIs (``runs:/<prepare run>/prepared``, ``models:/<model id>``),
which are themselves parameters of the next step: a re-run upstream step gives a new URI, so everything
downstream re-runs too.

Steps run in the project folder (``mlflow run`` starts them there), so ``main`` hands them absolute paths:
the raw data's folder, as found from where ``main`` was started, and the storage's and tracking store's
files.
"""

import contextlib
import functools
import getpass
import hashlib
import json
import os
import shlex
import subprocess
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import click
import filelock
import mlflow
import yaml
from click.core import ParameterSource
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import ExecutionException

from pipeline.config import (
    JOURNAL_SCHEME,
    MAIN_STUDY_ONLY,
    MAIN_TRAIN_ONLY,
    DataConfig,
    MainConfig,
    ThreadsConfig,
    TrainConfig,
    acting_settings,
    is_journal,
)
from pipeline.core.idx import locate_raw_files, raw_digest
from pipeline.core.stats import TEST_METRICS, format_interval
from pipeline.errors import PipelineError
from pipeline.names import (
    BEST_MODEL_TAG,
    CODE_VERSION_TAG,
    FAILURE_TAG,
    MODEL_URI_TAG,
    PREPARED_ARTIFACT,
    RAW_DIGEST_TAG,
    REGISTERED_MODEL,
    STEP_TAG,
    STUDY_TAG,
)
from pipeline.runtime.signals import interrupt_reason
from pipeline.steps.options import make_config, options_from
from pipeline.tracking.delivery import record_delivered
from pipeline.tracking.experiments import runs_url, study_filter
from pipeline.tracking.owners import end_runs_of_dead_processes
from pipeline.tracking.registry import promote_if_better
from pipeline.tracking.runs import log_new_params, runs_killed_at_once
from pipeline.tracking.stores import open_tracking_store

PROJECT_DIR = Path(__file__).resolve().parents[2]
# Where a new file not yet committed is code that the steps run; elsewhere are the stores, their journals
# and the data that commands write and remove as they run, which must not change the code version.
CODE_PATHS = ("pipeline", "MLproject", "conda.yaml", "experiments")


def code_version() -> str:
    """The git commit, with a hash of uncommitted changes to the code when there are some.

    Two runs with the same code version ran the same code, which is what makes reusing a finished
    step safe. Changes: edits to tracked files, and new files under ``CODE_PATHS``. Outside a git
    checkout, a hash of the package's source files stands in.
    """
    root = PROJECT_DIR
    try:
        git = functools.partial(subprocess.run, cwd=root, capture_output=True, check=True)
        commit = git(["git", "rev-parse", "HEAD"]).stdout.decode().strip()
        changes = git(["git", "diff", "HEAD"]).stdout  # edits to tracked files
        untracked = git(["git", "ls-files", "--others", "--exclude-standard", "-z", "--", *CODE_PATHS]).stdout
        h, dirty = hashlib.sha256(changes), bool(changes)
        for name in filter(None, untracked.split(b"\0")):  # new files not yet committed count as changes too
            try:
                content = (root / os.fsdecode(name)).read_bytes()
            except FileNotFoundError:  # removed since git listed it: not part of the code any more
                continue
            h.update(name + b"\0" + content)
            dirty = True
        return f"{commit}-dirty-{h.hexdigest()[:12]}" if dirty else commit
    except (OSError, subprocess.CalledProcessError):
        h = hashlib.sha256()
        for path in sorted((root / "pipeline").rglob("*.py")):
            h.update(path.read_bytes())
        return f"nogit-{h.hexdigest()[:12]}"


def entry_point_defaults(entry_point: str) -> dict[str, str]:
    """The parameters an entry point declares in MLproject, with their defaults as strings."""
    spec = yaml.safe_load((PROJECT_DIR / "MLproject").read_text())["entry_points"]
    if entry_point not in spec:
        raise PipelineError(f"MLproject has no entry point '{entry_point}'")
    return {name: str(p.get("default", "")) for name, p in spec[entry_point].get("parameters", {}).items()}


def step_parameters(entry_point: str, overrides: dict) -> dict[str, str]:
    """All of an entry point's parameters, as strings: the way MLflow stores and we compare them."""
    params = entry_point_defaults(entry_point)
    unknown = set(overrides) - set(params)
    if unknown:
        raise PipelineError(f"entry point '{entry_point}' has no parameter(s) {sorted(unknown)}")
    params.update({k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in overrides.items()})
    return params


def absolute_file_url(url: str) -> str:
    """A store's URL with a relative file path made absolute, from where main was started:
    sqlite:///optuna.db -> sqlite:////abs/optuna.db; journal:///optuna.log and optuna.log likewise.

    Steps run in the project folder, so a relative path would otherwise point there instead.
    """
    for prefix in ("sqlite:///", JOURNAL_SCHEME):
        if url.startswith(prefix) and not url.startswith(prefix + "/"):
            return prefix + str(Path(url[len(prefix):]).resolve())
    if is_journal(url) and not url.startswith(JOURNAL_SCHEME):  # a plain path
        return str(Path(url).resolve())
    return url


def located_data(data: DataConfig) -> tuple[DataConfig, str]:
    """``data`` with ``data_dir`` the absolute folder of the raw files, found from where main was started
    (--data-dir, $FASHION_MNIST_DIR, ./data, the Debian package), and the digest of their contents."""
    raw = locate_raw_files(data.data_dir)
    return replace(data, data_dir=str(raw["train_images"].parent.resolve())), raw_digest(raw)


def find_finished_run(experiment_id: str, entry_point: str, params: dict, tags: dict) -> Run | None:
    """The newest finished run of ``entry_point`` with exactly these parameters and tags (code version, and
    for prepare the raw files' digest)."""
    wanted = " ".join(f"and tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = MlflowClient().search_runs(
        [experiment_id],
        filter_string=(f"tags.`mlflow.project.entryPoint` = '{entry_point}' {wanted} "
                       "and attributes.status = 'FINISHED'"),
        order_by=["attributes.start_time DESC"],
    )
    # MLflow shell-quotes each value for the entry point's command and logs it quoted ("" -> "''")
    expected = {k: shlex.quote(v) for k, v in params.items()}
    for run in runs:
        if all(run.data.params.get(k) == v for k, v in expected.items()):
            return run
    return None


@contextlib.contextmanager
def identical_steps_one_at_a_time(experiment_id: str, entry_point: str, params: dict, tags: dict):
    """Hold a lock named after the step (store, experiment, entry point, parameters, tags).

    Two identical ``main`` runs started together would otherwise both miss a finished step, and both
    train and register twins: now the second waits for the first's step, then reuses it. The lock
    lives in a temporary folder of the user's: this holds for one user's ``main`` runs on one machine.
    """
    key = json.dumps([mlflow.get_tracking_uri(), experiment_id, entry_point, params, tags], sort_keys=True)
    folder = Path(tempfile.gettempdir()) / f"fashion-mnist-pipeline-steps-{getpass.getuser()}"
    folder.mkdir(exist_ok=True)
    lock = filelock.FileLock(folder / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.lock")
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        print(f"[main] waiting for an identical {entry_point} step that another main is running")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def run_step(entry_point: str, params: dict, force: bool, tags: dict | None = None) -> Run:
    """Reuse a finished identical step, or launch it as a child run of the active run.

    Identical: the same entry point, parameters and code version, and the ``tags`` the step itself
    records about its inputs (prepare: the raw files' digest).
    """
    parent = mlflow.active_run()
    tags = {CODE_VERSION_TAG: code_version(), **(tags or {})}
    experiment_id = parent.info.experiment_id
    with identical_steps_one_at_a_time(experiment_id, entry_point, params, tags):
        return reuse_or_launch(entry_point, params, force, experiment_id, tags)


def reuse_or_launch(entry_point: str, params: dict, force: bool, experiment_id: str, tags: dict) -> Run:
    reused = None if force else find_finished_run(experiment_id, entry_point, params, tags)
    if reused is not None:
        print(f"[main] reusing {entry_point} run {reused.info.run_id}")
        run_id = reused.info.run_id
    else:
        print(f"[main] running {entry_point} with {params}")
        try:
            submitted = mlflow.projects.run(str(PROJECT_DIR), entry_point, parameters=params,
                                            env_manager="local", experiment_id=experiment_id)
        except ExecutionException as e:
            raise PipelineError(f"step '{entry_point}' failed: {e}; its output is above")
        except KeyboardInterrupt as e:
            step_run_killed(experiment_id, entry_point, interrupt_reason(e))
            raise
        run_id = submitted.run_id
        MlflowClient().set_tag(run_id, CODE_VERSION_TAG, tags[CODE_VERSION_TAG])
    step = STEP_TAG.format(entry_point)
    mlflow.set_tags({step: run_id, step + ".reused": reused is not None})
    return MlflowClient().get_run(run_id)


def step_run_killed(experiment_id: str, entry_point: str, reason: str) -> None:
    """End the interrupted step's run KILLED, as the step itself did (or would have, had it started).

    MLflow, having stopped the step, marks its run FAILED over what the step recorded (mlflow.projects
    compares the run's status, a string, with RunStatus's numbers, so it never sees that the run ended).
    """
    client = MlflowClient()
    for run in client.search_runs([experiment_id], filter_string=(
            f"tags.`mlflow.parentRunId` = '{mlflow.active_run().info.run_id}' and "
            f"tags.`mlflow.project.entryPoint` = '{entry_point}' and attributes.status != 'FINISHED'")):
        if FAILURE_TAG not in run.data.tags:  # stopped before it could say why
            client.set_tag(run.info.run_id, FAILURE_TAG, reason)
        client.set_terminated(run.info.run_id, status="KILLED")


def run_main(data: DataConfig, train: TrainConfig, cfg: MainConfig, threads: int = ThreadsConfig().threads) -> dict:
    """Run the whole pipeline inside the active (parent) run and return its headline figures."""
    located, digest = located_data(data)
    prepare = run_step("prepare", step_parameters("prepare", asdict(located)), cfg.force, {RAW_DIGEST_TAG: digest})
    data_uri = f"runs:/{prepare.info.run_id}/{PREPARED_ARTIFACT}"
    # main's params: the settings that act in this mode (storage is on the tune run, password hidden)
    acted = {**asdict(data), "trials": cfg.trials, "force": cfg.force, "model": train.model, "seed": train.seed,
             "batch_size": train.batch_size, "threads": threads}
    if cfg.trials > 0:
        # one study per prepared split by default: trials on other data must not mix into it
        study_name = cfg.study_name or f"main-{prepare.info.run_id}"
        log_new_params({**acted, "study_name": study_name})
        mlflow.set_tag(STUDY_TAG, study_name)  # the study's trials carry the same tag
        print(f"[main] study {study_name!r}; its trials: {study_filter(study_name)}")
        # the study keeps its own patience (see TuneConfig): SGD's noisy val accuracy needs a longer one
        # the storage URL holds no password (MainConfig refuses one): as a step's parameter, it is recorded
        overrides = {"study_name": study_name, "data": data_uri,
                     "trials": cfg.trials, "test_best": False, "storage": absolute_file_url(cfg.storage),
                     "model": train.model, "seed": train.seed, "batch_size": train.batch_size, "threads": threads}
        model_run = run_step("tune", step_parameters("tune", overrides), cfg.force)
        model_uri = model_run.data.tags.get(BEST_MODEL_TAG)
    else:
        log_new_params({**acted, **acting_settings(train)})
        model_run = run_step("train", step_parameters("train", {**asdict(train), "data": data_uri, "threads": threads}),
                             cfg.force)
        model_uri = model_run.data.tags.get(MODEL_URI_TAG)
    if not model_uri:
        raise PipelineError(f"run {model_run.info.run_id} finished without recording a model URI")
    evaluation = run_step("evaluate", step_parameters("evaluate", {"model_uri": model_uri, "data": data_uri}),
                          cfg.force)
    val_accuracy = model_run.data.metrics["best_val_accuracy"]
    delivered = record_delivered(model_run)  # delivered_lr, ...: what trained the model, in both modes
    # the names a trial and a train run use: best_* is the kept (best validation) epoch's
    headline = {"best_val_accuracy": val_accuracy, "best_epoch": delivered["best_epoch"],
                **{k: evaluation.data.metrics[k] for k in TEST_METRICS}}
    mlflow.log_metrics(headline)
    mlflow.set_tag(MODEL_URI_TAG, model_uri)
    # one registration at a time: two mains that reach here together would both register (or both set
    # an alias: MLflow's alias insert is not atomic, the second fails with a UNIQUE constraint)
    experiment_id = mlflow.active_run().info.experiment_id
    registered = REGISTERED_MODEL.format(train.model)
    with identical_steps_one_at_a_time(experiment_id, "register", {"model": registered}, {}):
        decision = promote_if_better(model_uri, val_accuracy, delivered["val_digest"],
                                     default_split=data == DataConfig(data_dir=data.data_dir))
    study = {"study_name": study_name} if cfg.trials > 0 else {}
    return {**headline, "model_uri": model_uri, "registry": decision, **study}


def refuse_idle_settings(given: set[str], trials: int) -> None:
    """Refuse settings given for a mode they do not act in, rather than ignore them silently."""
    if trials > 0 and given & set(MAIN_TRAIN_ONLY):
        idle = ", ".join(sorted(given & set(MAIN_TRAIN_ONLY)))
        raise click.UsageError(
            f"{idle} would not act with trials={trials}: the study chooses lr, epochs and weight decay itself. "
            "Pass trials=0 to train once with these settings, or run the tune entry point (mlflow run . -e "
            "tune) with its search-space options (lr_low/lr_high, epochs_low/epochs_high, wd_low/wd_high, patience)")
    if trials == 0 and given & set(MAIN_STUDY_ONLY):
        idle = ", ".join(sorted(given & set(MAIN_STUDY_ONLY)))
        raise click.UsageError(f"{idle} would not act with trials=0 (no study runs): drop it, or pass trials > 0")


@click.command("main")
@options_from(DataConfig, TrainConfig, MainConfig, ThreadsConfig, undeclared=MAIN_TRAIN_ONLY + MAIN_STUDY_ONLY)
def main_command(**options):
    """A step that already finished with the same parameters and code is reused (prepare: on raw files of the
    same contents). Relative paths (--data-dir, sqlite and journal storages) are taken from here."""
    context = click.get_current_context()
    given = {name for name in options if context.get_parameter_source(name) == ParameterSource.COMMANDLINE}
    data, train = make_config(DataConfig, options), make_config(TrainConfig, options)
    cfg, threads = make_config(MainConfig, options), make_config(ThreadsConfig, options).threads
    refuse_idle_settings(given, cfg.trials)
    mlflow.set_tracking_uri(absolute_file_url(mlflow.get_tracking_uri()))  # the steps get it, and run elsewhere
    open_tracking_store()
    end_runs_of_dead_processes()
    # SIGTERM acts like Ctrl-C, at once: MLflow then stops the running step (which ends its run KILLED),
    # and main's run ends KILLED, instead of leaving the step running as an orphan and both runs RUNNING.
    with mlflow.start_run(run_name="main") as run, runs_killed_at_once():
        result = run_main(data, train, cfg, threads)
    click.echo(f"best val accuracy {result['best_val_accuracy']:.4f}, test accuracy {format_interval(result)}; "
               f"model {result['model_uri']}; registry: {result['registry']['reason']}")
    click.echo(f"runs: {runs_url(run.info.experiment_id)}")
    if cfg.trials > 0:
        click.echo(f"the study's runs: {runs_url(run.info.experiment_id, result['study_name'])}")

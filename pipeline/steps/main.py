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

from dataclasses import asdict, replace
from pathlib import Path

import click
import mlflow
from click.core import ParameterSource

from pipeline.config import JOURNAL_SCHEME, DataConfig, ThreadsConfig, TrainConfig, acting_settings
from pipeline.core.idx import locate_raw_files, raw_digest
from pipeline.core.stats import TEST_METRICS, format_interval
from pipeline.errors import PipelineError
from pipeline.names import BEST_MODEL_TAG, MODEL_URI_TAG, PREPARED_ARTIFACT, RAW_DIGEST_TAG, REGISTERED_MODEL, STUDY_TAG
from pipeline.steps.options import make_config, options_from
from pipeline.steps.step_runs import identical_steps_one_at_a_time, run_step, step_parameters
from pipeline.study_config import MAIN_STUDY_ONLY, MAIN_TRAIN_ONLY, MainConfig, is_journal
from pipeline.tracking.delivery import record_delivered
from pipeline.tracking.experiments import runs_url, study_filter
from pipeline.tracking.owners import end_runs_of_dead_processes
from pipeline.tracking.registry import promote_if_better
from pipeline.tracking.runs import log_new_params, runs_killed_at_once
from pipeline.tracking.stores import open_tracking_store


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

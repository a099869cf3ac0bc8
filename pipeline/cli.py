"""Command line: one sub-command per pipeline step (``python -m pipeline --help``).

Options become typed config objects (``pipeline.config``) here, are checked before anything runs, and
flow into the steps. Every MLproject entry point calls one of these commands.

The modules that need PyTorch are imported inside the commands that use them: ``main`` only launches
the other steps, and without torch in it (about 500 MB resident) the whole pipeline stays small.
"""

import dataclasses
import sys
from pathlib import Path

import click
import mlflow
import numpy as np

from pipeline.config import PRUNERS, SAMPLERS, DataConfig, SearchSpace, TrainConfig, TuneConfig
from pipeline.errors import PipelineError


def make_config(cls, options: dict):
    """Build a config dataclass from the CLI options that name its fields, and check it."""
    names = {f.name for f in dataclasses.fields(cls)}
    cfg = cls(**{k: options.pop(k) for k in list(options) if k in names})
    try:
        cfg.validate()
    except ValueError as e:
        raise click.UsageError(str(e))
    return cfg


def data_options(f):
    defaults = DataConfig()
    for option in reversed([
        click.option("--data-dir", default=None, help="Folder with the four raw IDX files (.gz or not); "
                     "default: $FASHION_MNIST_DIR, ./data, the Debian package, then download."),
        click.option("--val-size", type=int, default=defaults.val_size, show_default=True,
                     help="Training images held out for validation (stratified)."),
        click.option("--split-seed", type=int, default=defaults.split_seed, show_default=True),
        click.option("--limit", type=int, default=defaults.limit, show_default=True,
                     help="Keep at most this many images per split (0 = all): quick smoke runs."),
    ]):
        f = option(f)
    return f


def train_options(f):
    d = TrainConfig()
    for option in reversed([
        click.option("--lr", type=float, default=d.lr, show_default=True, help="SGD learning rate."),
        click.option("--epochs", type=int, default=d.epochs, show_default=True,
                     help="Maximum epochs (early stopping may stop sooner)."),
        click.option("--weight-decay", type=float, default=d.weight_decay, show_default=True,
                     help="L2 penalty (SGD weight_decay)."),
        click.option("--batch-size", type=int, default=d.batch_size, show_default=True),
        click.option("--patience", type=int, default=d.patience, show_default=True,
                     help="Stop after this many epochs without a better val accuracy; 0 = never."),
        click.option("--seed", type=int, default=d.seed, show_default=True),
        click.option("--log-test-curve", type=bool, default=d.log_test_curve, show_default=True,
                     help="Also log test accuracy each epoch (the book's plot; never used to choose)."),
        click.option("--input-dropout", type=float, default=d.input_dropout, show_default=True,
                     help="Fraction of input pixels dropped while training (overfitting remedy)."),
        click.option("--augment", type=bool, default=d.augment, show_default=True,
                     help="Random flips and shifts of whole batches (overfitting remedy)."),
    ]):
        f = option(f)
    return f


@click.group()
def cli():
    """Fashion-MNIST softmax regression (d2l §3.7) as a tracked, tunable MLflow pipeline."""


@cli.command("locate-data")
@click.option("--data-dir", default=None, help="Folder to check first.")
def locate_data(data_dir):
    """Find the raw files (downloading them if possible) and print where they are."""
    from pipeline.data import locate_raw_files

    found = locate_raw_files(data_dir)
    click.echo(f"Fashion-MNIST raw files: {found['train_images'].parent}")


@cli.command()
@data_options
def prepare(**options):
    """Find, validate and split the data; log it to MLflow."""
    from pipeline import steps

    cfg = make_config(DataConfig, options)
    with mlflow.start_run(run_name="prepare") as run:
        splits = steps.prepare(cfg)
    sizes = ", ".join(f"{s} {len(splits.arrays(s)[1])}" for s in ("train", "val", "test"))
    click.echo(f"prepared {sizes}; data URI: runs:/{run.info.run_id}/prepared")


@cli.command()
@train_options
@click.option("--data", default="", help="Prepared data: runs:/<id>/prepared or a folder; "
              "empty = prepare the default split in this run.")
def train(data, **options):
    """Train the softmax regression and log curves and the model."""
    from pipeline import steps, tracking

    cfg = make_config(TrainConfig, options)
    with mlflow.start_run(run_name="train") as run:
        tracking.log_new_params({"data": data})
        splits = steps.load_data(data)
        result, model_info = steps.train(cfg, splits)
    click.echo(f"best epoch {result.best_epoch}: val accuracy {result.best_val_accuracy:.4f}; "
               f"model: {model_info.model_uri} (runs:/{run.info.run_id}/model)")


@cli.command()
@click.option("--model-uri", required=True,
              help="runs:/<id>/model, models:/<name>@<alias>, models:/<name>/<version> or models:/<model_id>.")
@click.option("--data", default="", help="Prepared data URI (runs:/<id>/prepared); empty = default split.")
def evaluate(model_uri, data):
    """Evaluate a logged model on the untouched test split."""
    from pipeline import steps, tracking
    from pipeline.evaluate import evaluate_step, load_model

    model = load_model(model_uri)  # a bad URI fails here, before a run is opened
    with mlflow.start_run(run_name="evaluate"):
        tracking.log_new_params({"model_uri": model_uri, "data": data})
        result = evaluate_step(model_uri, steps.load_data(data), model)
    click.echo(f"test accuracy {result['test_accuracy']:.4f}, test loss {result['test_loss']:.4f}")
    click.echo(result["per_class"].to_string(index=False, float_format="%.3f"))


@cli.command()
@data_options
@train_options
@click.option("--trials", type=click.IntRange(min=0), default=20, show_default=True,
              help="Optuna trials; 0 = train the seed recipe (the train options) instead of a study.")
@click.option("--study-name", default="", help="Optuna study to create or resume; default: one per prepared split.")
@click.option("--storage", default="sqlite:///optuna.db", show_default=True, help="Optuna storage URL.")
@click.option("--force", type=bool, default=False, show_default=True,
              help="Re-run every step even if an identical finished run exists.")
def main(trials, study_name, storage, force, **options):
    """Run prepare -> train/tune -> evaluate -> register, reusing finished steps."""
    from pipeline.workflow import MainConfig, run_main

    data_cfg, train_cfg = make_config(DataConfig, options), make_config(TrainConfig, options)
    # the study keeps its own patience (see TuneConfig): SGD's noisy val accuracy needs a longer one
    tune = {"storage": storage, "seed": train_cfg.seed, "batch_size": train_cfg.batch_size,
            **({"study_name": study_name} if study_name else {})}
    cfg = MainConfig(prepare={k: "" if v is None else v for k, v in dataclasses.asdict(data_cfg).items()},
                     train=train_cfg.as_params(), tune=tune, trials=trials, force=force)
    with mlflow.start_run(run_name="main"):
        result = run_main(cfg)
    click.echo(f"val accuracy {result['val_accuracy']:.4f}, test accuracy {result['test_accuracy']:.4f}; "
               f"model {result['model_uri']}; registry: {result['registry']['reason']}")


@cli.command()
@click.option("--model-uri", required=True, help="Any model URI, e.g. models:/fashion-mnist-softmax@champion.")
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option("--test", "test_count", type=int, default=0, help="Also predict the first N test images.")
@click.option("--data", default="", help="Prepared data URI for --test; empty = default split.")
def predict(model_uri, images, test_count, data):
    """Print the most likely classes for image files (PNG/JPEG) or test images."""
    from pipeline.config import CLASS_NAMES
    from pipeline.evaluate import load_model
    from pipeline import steps
    from pipeline.predict import image_to_array, top_k

    if not images and not test_count:
        raise click.UsageError("give image files and/or --test N")
    model = load_model(model_uri)
    names, arrays, failures = [], [], 0
    for path in images:
        try:
            arrays.append(image_to_array(path))
            names.append(str(path))
        except PipelineError as e:
            click.echo(f"error: {e.message}", err=True)
            failures += 1
    if test_count:
        splits = steps.load_data(data)
        arrays.extend(splits.test_x[:test_count])
        names.extend(f"test[{i}] (true: {CLASS_NAMES[y]})" for i, y in enumerate(splits.test_y[:test_count]))
    if arrays:
        for name, top in zip(names, top_k(model, np.stack(arrays))):
            click.echo(f"{name}: " + ", ".join(f"{c} {p:.3f}" for c, p in top))
    if failures:
        sys.exit(1)


def tune_options(f):
    d, space = TuneConfig(), SearchSpace()
    for option in reversed([
        click.option("--trials", type=int, default=d.trials, show_default=True,
                     help="Trials the study holds when done; its finished trials (earlier runs, other "
                     "machines) count."),
        click.option("--workers", type=int, default=d.workers, show_default=True,
                     help="Processes on this machine working on the study."),
        click.option("--storage", default=d.storage, show_default=True,
                     help="Optuna storage: a database URL (sqlite:///optuna.db, postgresql://user@host/db, "
                     "mysql+pymysql://user@host/db) or a journal file (journal:///optuna.log or a path "
                     "ending in .log/.journal)."),
        click.option("--study-name", default=d.study_name, show_default=True,
                     help="Created if new, resumed if it exists (never overwritten)."),
        click.option("--sampler", type=click.Choice(SAMPLERS), default=d.sampler, show_default=True),
        click.option("--pruner", type=click.Choice(PRUNERS), default=d.pruner, show_default=True,
                     help="Stops unpromising trials early, from their per-epoch val accuracy."),
        click.option("--seed", type=int, default=d.seed, show_default=True,
                     help="Seeds the sampler and every trial's training."),
        click.option("--patience", type=int, default=d.patience, show_default=True,
                     help="Early stopping inside each trial; 0 = never."),
        click.option("--batch-size", type=int, default=d.batch_size, show_default=True),
        click.option("--lr-low", type=float, default=space.lr_low, show_default=True,
                     help="Learning rate range (log scale)."),
        click.option("--lr-high", type=float, default=space.lr_high, show_default=True),
        click.option("--epochs-low", type=int, default=space.epochs_low, show_default=True,
                     help="Range of the maximum epochs of a trial."),
        click.option("--epochs-high", type=int, default=space.epochs_high, show_default=True),
        click.option("--wd-low", type=float, default=space.wd_low, show_default=True,
                     help="Weight decay range (log scale); 0 is always reachable as well."),
        click.option("--wd-high", type=float, default=space.wd_high, show_default=True),
        click.option("--evaluate", type=bool, default=d.evaluate, show_default=True,
                     help="Evaluate the best model on test and register it."),
    ]):
        f = option(f)
    return f


@cli.command()
@tune_options
@click.option("--data", default="", help="Prepared data: runs:/<id>/prepared or a folder; "
              "empty = prepare the default split in this run.")
def tune(data, **options):
    """Search lr, epochs and weight decay with Optuna; evaluate and register the best model."""
    from pipeline.tune import describe, run_study

    space, cfg = make_config(SearchSpace, options), make_config(TuneConfig, options)
    with mlflow.start_run(run_name=f"tune {cfg.study_name}"):
        study = run_study(cfg, space, data)
    click.echo(describe(study))


@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--smoke", type=bool, default=False, show_default=True,
              help="Cap epochs, data, trials and steps (see pipeline.experiments.SMOKE) for a quick check; "
              "the runs go to the experiment '<name>-smoke'.")
def experiment(file, smoke):
    """Run an experiment file (experiments/*.yaml): every grid point or the study, as MLflow runs."""
    from pipeline.experiments import SMOKE, Caps, load_spec, run_experiment

    spec = load_spec(file)  # a bad file fails here, naming the line, before anything runs
    result = run_experiment(spec, SMOKE if smoke else Caps())
    click.echo(f"{len(result['run_ids'])} run(s) in experiment '{result['experiment']}' (parent run "
               f"{result['parent_run_id']}); compare them: python -m pipeline report {result['experiment']}")


@cli.command()
@click.argument("experiment_name")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("reports"),
              show_default=True, help="The report goes to OUT/EXPERIMENT_NAME/.")
def report(experiment_name, out):
    """Leaderboard (markdown, CSV) and accuracy curves of all runs of an MLflow experiment."""
    from pipeline.report import write_report

    result = write_report(experiment_name, out)
    click.echo(result["markdown"])
    click.echo(f"written to {result['directory']} and logged to run {result['run_id']}")

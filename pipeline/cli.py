"""Command line: one sub-command per pipeline step (``python -m pipeline --help``).

Options become typed config objects (``pipeline.config``) here, are checked before anything runs, and
flow into the steps. Every MLproject entry point calls one of these commands.
"""

import dataclasses

import click
import mlflow

from pipeline import steps, tracking
from pipeline.config import DataConfig, TrainConfig


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
    cfg = make_config(TrainConfig, options)
    with mlflow.start_run(run_name="train") as run:
        tracking.log_new_params({"data": data})
        splits = steps.load_data(data)
        result, model_info = steps.train(cfg, splits)
    click.echo(f"best epoch {result.best_epoch}: val accuracy {result.best_val_accuracy:.4f}; "
               f"model: {model_info.model_uri} (runs:/{run.info.run_id}/model)")

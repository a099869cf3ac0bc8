"""Command ``train``: the model trained once with the given settings, in one MLflow run
(``pipeline.tracking.training``); Ctrl-C and SIGTERM end the run KILLED after the epoch under way."""

import click
import mlflow
import torch

from pipeline.config import DataInput, ThreadsConfig, TrainConfig
from pipeline.steps.options import make_config, options_from
from pipeline.tracking.datasets import load_data
from pipeline.tracking.owners import end_runs_of_dead_processes
from pipeline.tracking.runs import log_new_params, runs_killed_at_safe_points
from pipeline.tracking.stores import open_tracking_store
from pipeline.tracking.training import train


@click.command("train")
@options_from(TrainConfig, DataInput, ThreadsConfig)
def train_command(data, **options):
    cfg, threads = make_config(TrainConfig, options), make_config(ThreadsConfig, options).threads
    torch.set_num_threads(threads)
    open_tracking_store()
    end_runs_of_dead_processes()
    with mlflow.start_run(run_name="train") as run, runs_killed_at_safe_points() as interrupted:
        log_new_params({"data": data, "threads": threads})
        splits = load_data(data)
        result, model_info = train(cfg, splits, on_epoch=lambda metrics: interrupted())
    click.echo(f"best epoch {result.best_epoch}: val accuracy {result.best_val_accuracy:.4f}; "
               f"model: {model_info.model_uri} (runs:/{run.info.run_id}/{model_info.name})")

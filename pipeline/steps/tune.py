"""Command ``tune``: an Optuna study of learning rate, epochs, weight decay and the model's own settings
(``pipeline.tuning.study``)."""


import click
import mlflow
import torch

from pipeline.config import DataInput, ThreadsConfig
from pipeline.steps.options import make_config, options_from
from pipeline.study_config import SearchSpace, TuneConfig
from pipeline.tracking.experiments import runs_url
from pipeline.tracking.owners import end_runs_of_dead_processes
from pipeline.tracking.runs import log_new_params
from pipeline.tracking.stores import open_tracking_store
from pipeline.tuning.record import describe
from pipeline.tuning.study import run_and_test_study


@click.command("tune")
@options_from(TuneConfig, SearchSpace, DataInput, ThreadsConfig)
def tune_command(data, **options):
    space, cfg = make_config(SearchSpace, options), make_config(TuneConfig, options).resolved()
    threads = make_config(ThreadsConfig, options).threads
    torch.set_num_threads(threads)  # and each --workers process, at its start
    open_tracking_store()
    end_runs_of_dead_processes()
    # system metrics (CPU, memory, disk, network: system/* every 10 s, psutil) show what a long study used
    with mlflow.start_run(run_name=f"tune {cfg.study_name}", log_system_metrics=True) as run:
        log_new_params({"threads": threads})
        study, tested = run_and_test_study(cfg, space, data)
    click.echo(describe(study, tested, runs_url(run.info.experiment_id, cfg.study_name)))

"""Command ``tune``: an Optuna study of learning rate, epochs, weight decay and the model's own settings
(``pipeline.tuning.study``)."""


import click
import mlflow

from pipeline.config import DataInput, SearchSpace, TuneConfig
from pipeline.steps.options import make_config, options_from
from pipeline.tracking.owners import end_runs_of_dead_processes
from pipeline.tracking.stores import open_tracking_store
from pipeline.tuning.record import describe
from pipeline.tuning.study import run_study


@click.command("tune")
@options_from(TuneConfig, SearchSpace, DataInput)
def tune_command(data, **options):
    space, cfg = make_config(SearchSpace, options), make_config(TuneConfig, options).resolved()
    open_tracking_store()
    end_runs_of_dead_processes()
    # system metrics (CPU, memory, disk, network: system/* every 10 s, psutil) show what a long study used
    with mlflow.start_run(run_name=f"tune {cfg.study_name}", log_system_metrics=True):
        study = run_study(cfg, space, data)
    click.echo(describe(study))

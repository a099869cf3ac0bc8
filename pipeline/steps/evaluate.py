"""Command ``evaluate``: a logged model on the untouched test split, in one MLflow run
(``pipeline.tracking.evaluation``)."""

import click
import mlflow

from pipeline.config import DataInput, ModelInput
from pipeline.core.stats import format_interval
from pipeline.steps.options import options_from
from pipeline.tracking.datasets import load_data
from pipeline.tracking.evaluation import evaluate_on_test
from pipeline.tracking.runs import log_new_params, runs_killed_at_once
from pipeline.tracking.safe_loading import load_model
from pipeline.tracking.stores import open_tracking_store


@click.command("evaluate")
@options_from(ModelInput, DataInput)
def evaluate_command(model_uri, data):
    """Logs accuracy with its 95% interval, loss, a per-class table and figures."""
    open_tracking_store()
    model = load_model(model_uri)  # a bad URI fails here, before a run is opened
    with mlflow.start_run(run_name="evaluate"), runs_killed_at_once():
        log_new_params({"model_uri": model_uri, "data": data})
        result = evaluate_on_test(model_uri, load_data(data), model)
    accuracy = format_interval(result)
    click.echo(f"test accuracy {accuracy} on {len(result['predictions'])} images, "
               f"test loss {result['test_loss']:.4f}")
    click.echo(result["per_class"].to_string(index=False, float_format="%.3f"))

"""Command ``ui-url``: the address of the experiment's runs in the MLflow UI, for ``make ui`` / ``make server``.

The UI's own start page lists the experiments, and an experiment opened from there lands on MLflow 3's
GenAI overview; the link printed here opens the runs table. The experiment is read from the store, and
made (empty, marked as model training) if the store has none yet, so the link works before the first run.
``make server`` runs this beside the server it starts, against the server (``--wait``): an experiment
the server creates keeps its artifacts on the server.
"""

import socket
import time
import urllib.request

import click
import mlflow

from pipeline.config import UiConfig
from pipeline.errors import PipelineError
from pipeline.steps.options import make_config, options_from
from pipeline.tracking.experiments import chosen_experiment, runs_url
from pipeline.tracking.stores import open_tracking_store


def wait_for_server(seconds: int) -> None:
    """Wait until the tracking server at MLFLOW_TRACKING_URI answers its health check (a store that is
    not a server answers at once)."""
    uri = mlflow.get_tracking_uri().rstrip("/")
    if not uri.startswith(("http://", "https://")):
        return
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=5)
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise PipelineError(f"no MLflow server answered at {uri} within {seconds} s ({e}); start it "
                                    "(make server) or give it longer (--wait)") from None
            time.sleep(1)


@click.command("ui-url")
@options_from(UiConfig)
def ui_url_command(**options):
    """Reads the store at MLFLOW_TRACKING_URI (default sqlite:///mlflow.db)."""
    ui = make_config(UiConfig, options)
    wait_for_server(ui.wait)
    open_tracking_store()
    experiment = chosen_experiment()
    # a server listening on every address (HOST=0.0.0.0) is reached from other machines by this one's name
    host = socket.gethostname() if ui.host in ("0.0.0.0", "::") else ui.host
    click.echo(f"Open {runs_url(experiment.experiment_id, ui=f'http://{host}:{ui.port}')}  "
               f"(experiment {experiment.name!r})")

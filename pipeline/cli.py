"""Command line: one sub-command per pipeline step (``python -m pipeline --help``).

Each command lives in its step's module (``pipeline/steps/<step>.py``); MLproject's entry points call
these commands. A command's module is imported only when the command runs (click's lazy-group recipe):
``--help`` and the light commands start without PyTorch, and ``main``, which only launches the other
steps, stays small.

Around every command, in one place:

- SIGTERM acts like Ctrl-C, and an interrupted command says so in one line (``pipeline.runtime.signals``);
- a ``PipelineError``, or a fault of the machine (a full disk, a store that cannot be written or
  reached: ``pipeline.faults.environment_problem``), is one line ``Error: ...``, not a traceback;
  ``--debug`` prints the traceback behind it too;
- a command whose runs go to the project's MLflow experiment gets it by default, marked as a
  model-training experiment (``pipeline.tracking.experiments``).
"""

import contextlib
import functools
import importlib
import os

import click

from pipeline.config import MLFLOW_HTTP_DEFAULTS, MLFLOW_PICKLE_SWITCH, MLFLOW_SWITCH_DEFAULTS
from pipeline.errors import DEBUG_ENV, PipelineError, show_traceback_when_debugging
from pipeline.faults import environment_problem, quiet_store_tracebacks

COMMANDS = {  # name -> (the module of the step that defines it, what it does in one line)
    "locate-data": ("pipeline.steps.locate_data", "Find the raw Fashion-MNIST files and print where they are."),
    "prepare": ("pipeline.steps.prepare", "Find, check and split the data; log it to MLflow."),
    "train": ("pipeline.steps.train", "Train the model once and log its curves and the model."),
    "evaluate": ("pipeline.steps.evaluate", "Evaluate a logged model on the untouched test split."),
    "tune": ("pipeline.steps.tune", "Search the settings with Optuna; test and register the best."),
    "main": ("pipeline.steps.main", "Run prepare -> train or tune -> evaluate -> register, reusing finished steps."),
    "experiment": ("pipeline.steps.experiment", "Run an experiment file (experiments/*.yaml) as MLflow runs."),
    "report": ("pipeline.steps.report", "Leaderboard and accuracy curves of an MLflow experiment's runs."),
    "promote": ("pipeline.steps.promote", "Make a registered model version its family's champion, by hand."),
    "predict": ("pipeline.steps.predict", "The most likely classes of image files or test images."),
    "serve": ("pipeline.steps.serve", "Serve a logged model over HTTP (MLflow's scoring protocol)."),
    "create-store": ("pipeline.steps.store", "Create the MLflow store and experiment (before several `mlflow run`)."),
    "ui-url": ("pipeline.steps.ui", "Print the link to the experiment's runs in the MLflow UI."),
}
# Commands whose runs go to the project's MLflow experiment (``experiment`` and ``report`` name their own)
IN_PROJECT_EXPERIMENT = {"prepare", "train", "evaluate", "tune", "main", "create-store", "ui-url"}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def format_commands(self, ctx, formatter):
        # the one-line summaries without importing any command (and PyTorch with it)
        with formatter.section("Commands"):
            formatter.write_dl([(name, summary) for name, (_, summary) in COMMANDS.items()])

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, summary = COMMANDS[name]
        command = getattr(importlib.import_module(module), name.replace("-", "_") + "_command")
        if not getattr(command, "prepared", False):
            command.help = summary + (f"\n\n{command.help}" if command.help else "")
            command.short_help = summary
            if name in IN_PROJECT_EXPERIMENT:
                command.callback = in_project_experiment(command.callback)
            command.prepared = True
        return command

    def invoke(self, ctx):
        # SIGTERM acts like Ctrl-C from before the command imports anything heavy; an interrupted command
        # has ended its runs KILLED and says so in one line
        from pipeline.runtime import signals

        with signals.interrupts_raise_keyboard_interrupt():
            try:
                return super().invoke(ctx)
            except KeyboardInterrupt as e:
                raise one_line(signals.stopped_by(e)) from None
            except click.ClickException:
                raise
            except PipelineError as e:
                show_traceback_when_debugging(e)
                raise one_line(e) from None
            except Exception as e:  # a fault of the machine is one line too; anything else keeps its traceback
                problem = environment_problem(e)
                if problem is None:
                    raise
                show_traceback_when_debugging(e)
                raise one_line(PipelineError(problem)) from None


def one_line(error: PipelineError) -> click.ClickException:
    """What click prints as ``Error: <message>``, exiting with the error's status."""
    shown = click.ClickException(error.message)
    shown.exit_code = error.exit_code
    return shown


def in_project_experiment(callback):
    """Wrap a command whose runs go to the project's experiment (unless MLFLOW_EXPERIMENT_NAME / _ID name
    another): chosen before the command runs, marked as a model-training experiment once it has run
    (MLflow creates the experiment at the command's first run)."""
    @functools.wraps(callback)
    def run(*args, **kwargs):
        from pipeline.tracking import experiments

        experiments.default_to_project_experiment()
        try:
            result = callback(*args, **kwargs)
        except click.UsageError:
            raise  # bad settings: nothing was recorded
        except BaseException as e:
            # best effort, and not on a store that failed, which would only fail (or hang) again: the
            # command's own error is what the user must see
            if environment_problem(e) is None:
                with contextlib.suppress(Exception):
                    experiments.mark_chosen_experiment()
            raise
        experiments.mark_chosen_experiment()
        return result
    return run


@click.group(cls=LazyGroup)
@click.option("--debug", is_flag=True, envvar=DEBUG_ENV,
              help=f"Also print the traceback behind a one-line error (or set {DEBUG_ENV}=1).")
def cli(debug):
    """Fashion-MNIST softmax regression (d2l §3.7) as a tracked, tunable MLflow pipeline."""
    if debug:
        os.environ[DEBUG_ENV] = "1"  # for this process and the steps and workers it starts
    quiet_store_tracebacks()
    for name, value in MLFLOW_HTTP_DEFAULTS.items():  # wait less for a tracking server that does not answer,
        os.environ.setdefault(name, value)  # unless the user set MLflow's variables; steps inherit them
    for name, value in MLFLOW_SWITCH_DEFAULTS.items():
        os.environ.setdefault(name, value)
    os.environ[MLFLOW_PICKLE_SWITCH] = "false"  # always: see pipeline.tracking.safe_loading

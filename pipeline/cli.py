"""Command line: one sub-command per pipeline step (``python -m pipeline --help``).

Each command lives in its step's module (``pipeline/steps/<step>.py``), next to the code it runs; MLproject's
entry points call these commands. Options are generated from the config dataclasses of
``pipeline.config`` (``options_from``), and turned back into checked config objects (``make_config``)
before anything runs.

Commands are imported only when called (click's lazy-group recipe): ``main`` only launches the other
steps, and without PyTorch in its process (about 500 MB resident) the whole pipeline stays small.
"""

import dataclasses
import functools
import importlib
import os
import sys

import click

from pipeline.errors import (
    DEBUG_ENV,
    DEFAULT_TRACKING_URI,
    PipelineError,
    environment_problem,
    quiet_store_tracebacks,
    show_traceback_when_debugging,
    unwritable_sqlite_store,
)

COMMANDS = {  # command name -> the module of the step that defines it
    "locate-data": "pipeline.steps.prepare",
    "prepare": "pipeline.steps.prepare",
    "train": "pipeline.steps.train",
    "evaluate": "pipeline.steps.evaluate",
    "predict": "pipeline.steps.predict",
    "serve": "pipeline.steps.serve",
    "tune": "pipeline.steps.tune",
    "main": "pipeline.steps.main",
    "experiment": "pipeline.steps.experiment",
    "report": "pipeline.steps.report",
    "create-store": "pipeline.steps.store",
}
# Commands whose runs go to the project's MLflow experiment (``experiment`` names its own, per file)
RECORD_IN_PROJECT_EXPERIMENT = {"prepare", "train", "evaluate", "tune", "main", "create-store"}


class LazyGroup(click.Group):
    def invoke(self, ctx):
        # SIGTERM acts like Ctrl-C, from before the command imports anything heavy; an interrupted
        # command has ended its runs KILLED, and says so in one line (pipeline.runtime.signals)
        from pipeline.runtime import signals

        with signals.interrupts_raise_keyboard_interrupt():
            try:
                return self.invoke_command(ctx)
            except KeyboardInterrupt as e:
                raise signals.stopped_by(e) from None

    def invoke_command(self, ctx):
        # A full disk or an unwritable store is the machine's fault, not a bug: one line, not a traceback.
        # (Raised inside ``mlflow.start_run``, it has already ended the run FAILED if the store could.)
        # --debug prints the traceback behind every such line; anything else keeps its own traceback.
        try:
            return super().invoke(ctx)
        except PipelineError as e:
            show_traceback_when_debugging(e)
            raise
        except Exception as e:
            problem = None if isinstance(e, click.ClickException) else environment_problem(e)
            if problem is None:
                raise
            show_traceback_when_debugging(e)
            raise PipelineError(problem) from e

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module = importlib.import_module(COMMANDS[name])
        command = getattr(module, name.replace("-", "_") + "_command")
        if name in RECORD_IN_PROJECT_EXPERIMENT and not getattr(command.callback, "records_runs", False):
            # after parsing (so --help and bad options touch no server), before the command's first run
            from pipeline.tracking.experiments import records_in_project_experiment
            command.callback = records_in_project_experiment(command.callback)
        return after_options_are_parsed(command)


def after_options_are_parsed(command: click.Command) -> click.Command:
    """Before the command runs (its options parsed): mark the runs of this process as its own (the run
    ``mlflow run`` created for it, and each run it creates), and end the runs that killed processes
    left RUNNING (``pipeline.runtime.processes``)."""
    if getattr(command, "cleans_up_first", False):
        return command
    callback = command.callback

    @functools.wraps(callback)
    def run(*args, **kwargs):
        from pipeline.runtime import processes as owners

        owners.tag_new_runs_with_their_owner()
        owners.claim_launched_run()
        owners.end_runs_of_dead_processes()
        return callback(*args, **kwargs)

    command.callback, command.cleans_up_first = run, True
    return command


@click.group(cls=LazyGroup)
@click.option("--debug", is_flag=True, envvar=DEBUG_ENV,
              help=f"Also print the traceback behind a one-line error (or set {DEBUG_ENV}=1).")
@click.pass_context
def cli(ctx, debug):
    """Fashion-MNIST softmax regression (d2l §3.7) as a tracked, tunable MLflow pipeline."""
    if debug:
        os.environ[DEBUG_ENV] = "1"  # for this process and the steps and workers it starts
    quiet_store_tracebacks()
    # Every command but locate-data records runs; asking for --help needs no store.
    if ctx.invoked_subcommand != "locate-data" and "--help" not in sys.argv:
        problem = unwritable_sqlite_store(os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI))
        if problem:
            raise PipelineError(problem)
    # Every command passes here first: several commands started at once on a new store must not
    # race to create it (nothing is opened yet: --help and bad options leave no store behind).
    from pipeline.runtime import store_files as stores

    stores.open_mlflow_stores_under_a_lock()
    stores.bounded_tracking_server_waits()


def option_for(field: dataclasses.Field, only: tuple[str, ...] = ()):
    """``--field-name`` with the field's type, default and help; a field without a default is required.

    The fields named in ``only`` also answer to ``--field_name``: MLflow passes a -P parameter that an
    entry point does not declare as ``--<name as typed> <value>`` (see MLproject's ``main``).
    """
    meta = field.metadata
    kind = click.Choice(meta["choices"]) if "choices" in meta else field.type
    required = field.default is dataclasses.MISSING
    names = ["--" + field.name.replace("_", "-")]
    if field.name in only and "_" in field.name:
        names.append("--" + field.name)
    return click.option(*names, field.name, type=kind, required=required,
                        default=None if required else field.default, show_default=not required,
                        help=meta.get("help"))


def options_from(*classes, undeclared: tuple[str, ...] = ()):
    """Decorate a command with one option per field of each config dataclass, in field order.

    ``undeclared``: fields its MLproject entry point leaves out; they also take MLflow's spelling.
    """
    def decorate(command):
        for cls in reversed(classes):
            for field in reversed(dataclasses.fields(cls)):
                command = option_for(field, undeclared)(command)
        return command
    return decorate


def make_config(cls, options: dict):
    """Build a config dataclass from the options that name its fields, and check it."""
    names = {f.name for f in dataclasses.fields(cls)}
    config = cls(**{k: v for k, v in options.items() if k in names})
    try:
        config.validate()
    except ValueError as e:
        raise click.UsageError(str(e))
    return config

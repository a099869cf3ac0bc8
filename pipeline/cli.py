"""Command line: one sub-command per pipeline step (``python -m pipeline --help``).

Each command lives in its step's module (``pipeline/steps/<step>.py``), next to the code it runs; MLproject's
entry points call these commands. Options are generated from the config dataclasses of
``pipeline.config`` (``options_from``), and turned back into checked config objects (``make_config``)
before anything runs.

Commands are imported only when called (click's lazy-group recipe): ``main`` only launches the other
steps, and without PyTorch in its process (about 500 MB resident) the whole pipeline stays small.
"""

import dataclasses
import importlib

import click

COMMANDS = {  # command name -> the module of the step that defines it
    "locate-data": "pipeline.steps.prepare",
    "prepare": "pipeline.steps.prepare",
    "train": "pipeline.steps.train",
    "evaluate": "pipeline.steps.evaluate",
    "predict": "pipeline.steps.predict",
    "tune": "pipeline.steps.tune",
    "main": "pipeline.steps.main",
    "experiment": "pipeline.steps.experiment",
    "report": "pipeline.steps.report",
}
# Commands whose runs go to the project's MLflow experiment (``experiment`` names its own, per file)
RECORD_IN_PROJECT_EXPERIMENT = {"prepare", "train", "evaluate", "tune", "main"}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module = importlib.import_module(COMMANDS[name])
        command = getattr(module, name.replace("-", "_") + "_command")
        if name in RECORD_IN_PROJECT_EXPERIMENT and not getattr(command.callback, "records_runs", False):
            # after parsing (so --help and bad options touch no server), before the command's first run
            from pipeline.support.experiments import records_in_project_experiment
            command.callback = records_in_project_experiment(command.callback)
        return command


@click.group(cls=LazyGroup)
def cli():
    """Fashion-MNIST softmax regression (d2l §3.7) as a tracked, tunable MLflow pipeline."""


def option_for(field: dataclasses.Field):
    """``--field-name`` with the field's type, default and help; a field without a default is required."""
    meta = field.metadata
    kind = click.Choice(meta["choices"]) if "choices" in meta else field.type
    required = field.default is dataclasses.MISSING
    return click.option("--" + field.name.replace("_", "-"), field.name, type=kind, required=required,
                        default=None if required else field.default, show_default=not required,
                        help=meta.get("help"))


def options_from(*classes):
    """Decorate a command with one option per field of each config dataclass, in field order."""
    def decorate(command):
        for cls in reversed(classes):
            for field in reversed(dataclasses.fields(cls)):
                command = option_for(field)(command)
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

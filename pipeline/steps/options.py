"""Command-line options made from the config dataclasses (``pipeline.config``), and checked configs back.

Every setting is written once, as a dataclass field with its type, default and help; each command's
options are generated from those fields (``options_from``) and turned back into checked config objects
(``make_config``) before anything runs. ``tests/steps/test_cli.py`` checks MLproject against the same fields.
"""

import dataclasses

import click


def option_for(field: dataclasses.Field, only: tuple[str, ...] = ()):
    """``--field-name`` with the field's type, default and help; a field without a default is required.

    The fields named in ``only`` also answer to ``--field_name``: MLflow passes a -P parameter that an
    entry point does not declare as ``--<name as typed> <value>`` (see MLproject's ``main``).
    """
    meta = field.metadata
    # a fixed list of choices is click's to check; a dict of them (config.MODELS) may gain entries after this
    # option is made (a model defined in a test), so the config's own check (field_problems) reads it live
    fixed = "choices" in meta and not isinstance(meta["choices"], dict)
    kind = click.Choice(meta["choices"]) if fixed else field.type
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
        raise click.UsageError(str(e)) from None
    return config

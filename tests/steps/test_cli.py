"""Every setting is written once: MLproject's entry points are exactly the commands' options.

The options come from the config dataclasses (``pipeline.cli.options_from``), so this checks MLproject
against the single source: same names, same types, same defaults, and each passed on the command line.
"""

import math
import shlex
import subprocess
import sys

import click
import pytest
import yaml

from pipeline.cli import cli
from pipeline.config import TrainConfig
from pipeline.steps.options import option_for
from pipeline.study_config import MAIN_STUDY_ONLY, MAIN_TRAIN_ONLY
from tests.helpers import REPO

ENTRY_POINTS = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]
MLPROJECT_TYPES = {click.INT: "int", click.FLOAT: "float"}  # anything else travels as a string


def command_of(entry_point: str) -> tuple[click.Command, list[str]]:
    argv = shlex.split(ENTRY_POINTS[entry_point]["command"])
    assert argv[:3] == ["python", "-m", "pipeline"], "an entry point calls one command of the CLI"
    return cli.get_command(click.Context(cli), argv[3]), argv[4:]


def as_mlproject_default(param: click.Parameter) -> str | float | int:
    return str(param.default).lower() if isinstance(param.default, bool) else param.default


def test_every_entry_point_is_a_command():
    assert set(ENTRY_POINTS) == {"prepare", "train", "evaluate", "tune", "main", "experiment"}
    for entry_point in ENTRY_POINTS:
        command, _ = command_of(entry_point)
        assert command is not None and command.name == entry_point


@pytest.mark.parametrize("entry_point", sorted(ENTRY_POINTS))
def test_entry_point_parameters_are_the_commands_options(entry_point):
    command, argv = command_of(entry_point)
    declared = ENTRY_POINTS[entry_point]["parameters"]
    undeclared = set(MAIN_TRAIN_ONLY + MAIN_STUDY_ONLY) if entry_point == "main" else set()
    assert set(declared) == {p.name for p in command.params} - undeclared, \
        "MLproject and the command name the same settings"
    for param in command.params:
        if param.name in undeclared:  # passed by MLflow as --<name> <value> when given
            assert "--" + param.name in param.opts and f"{{{param.name}}}" not in argv, param.name
            continue
        spec = declared[param.name]
        if isinstance(param, click.Argument):
            assert spec["type"] == "string" and f"{{{param.name}}}" in argv  # see MLproject: not MLflow's path
            continue
        assert spec["type"] == MLPROJECT_TYPES.get(param.type, "string"), param.name
        assert argv[argv.index(param.opts[0]) + 1] == f"{{{param.name}}}", f"{param.opts[0]} is passed on"
        if param.required:
            assert "default" not in spec, f"{param.name} is required by the command, so MLproject gives no default"
        elif isinstance(param.default, float):
            assert math.isclose(float(spec["default"]), param.default), param.name
        else:
            assert spec["default"] == as_mlproject_default(param), param.name


def test_options_carry_the_dataclass_help_and_default():
    lr = option_for(TrainConfig.__dataclass_fields__["lr"])(lambda **_: None).__click_params__[0]
    assert lr.opts == ["--lr"] and lr.default == TrainConfig().lr and lr.help == "SGD learning rate."
    assert lr.type is click.FLOAT


@pytest.mark.parametrize("args", [["--help"], ["report", "--help"], ["locate-data"]])
def test_help_and_the_light_commands_start_without_pytorch(args):
    """``--help`` lists the commands without importing them; report and locate-data need no PyTorch."""
    code = ("import sys\nfrom click.testing import CliRunner\nfrom pipeline.cli import cli\n"
            f"result = CliRunner().invoke(cli, {args!r})\n"
            "assert result.exit_code == 0, result.output\n"
            "print(sorted(m for m in ('torch', 'optuna') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"

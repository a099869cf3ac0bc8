"""Experiments as small YAML files: one command runs a whole comparison into one MLflow experiment.

A file names the MLflow experiment, the entry point, its fixed parameters, and either a grid of values
(one MLflow run per combination) or an Optuna study spec (``experiments/*.yaml`` are the examples)::

    experiment: overfitting            # the MLflow experiment the runs go to
    entry_point: train                 # train | stability | tune
    description: why this experiment exists
    data: {val_size: 10000}            # optional: DataConfig fields
    params: {epochs: 100, patience: 0} # the entry point's config fields, the same for every run
    grid: {lr: [0.1, 1.0]}             # one run per combination; a list of such mappings is run one after
                                       # the other (scikit-learn's ParameterGrid convention)
    study: {trials: 20, lr_high: 3.0}  # tune only, instead of params/grid: TuneConfig + SearchSpace fields

Why the checking is hand-made: a typo such as ``lrr: 0.1`` must not silently train with the default.
PyYAML's node API (``yaml.compose``) keeps the line of every key and value, so each problem is reported
as ``experiments/x.yaml line 7: ...``; the allowed keys and their types come from the config dataclasses
themselves, so a new config field is accepted here without touching this module.

How a file runs (``run_experiment``): the data are prepared once; a parent run (tag
``pipeline.role=experiment``, the YAML file as its artifact) holds one nested run per grid point,
each trained in-process with ``pipeline.steps.train`` and then evaluated on test with
``pipeline.evaluate.evaluate_step``, so every run in the report has a test accuracy.
"""

import dataclasses
import difflib
import itertools
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import yaml
from mlflow import MlflowClient
from yaml.constructor import SafeConstructor

from pipeline import steps, tracking
from pipeline.config import DataConfig, SearchSpace, TrainConfig, TuneConfig
from pipeline.data import prepare_splits
from pipeline.errors import PipelineError
from pipeline.evaluate import evaluate_step
from pipeline.stability import StabilityConfig, run_stability
from pipeline.train import DivergedError, Tensors

TOP_LEVEL_KEYS = ("experiment", "entry_point", "description", "data", "params", "grid", "study")
ROLE_TAG = "pipeline.role"  # "experiment" on the parent run; the report skips it
FILE_TAG = "pipeline.experiment_file"
POINT_TAG = "pipeline.grid_point"


@dataclass(frozen=True)
class Caps:
    """Limits for smoke runs (0 = none): CI runs every experiment file this way, in seconds."""

    max_epochs: int = 0  # caps TrainConfig.epochs, the tune search's epochs, StabilityConfig.fit_epochs
    limit: int = 0  # images per split (DataConfig.limit)
    max_trials: int = 0  # caps a study's trials
    max_steps: int = 0  # caps StabilityConfig.steps

    @property
    def active(self) -> bool:
        return any(dataclasses.astuple(self))


SMOKE = Caps(max_epochs=2, limit=500, max_trials=2, max_steps=20)
SMOKE_SUFFIX = "-smoke"  # capped runs go to their own MLflow experiment and Optuna study


@dataclass(frozen=True)
class ExperimentSpec:
    """A checked experiment file."""

    path: str
    name: str  # the MLflow experiment
    entry_point: str
    description: str = ""
    data: DataConfig = DataConfig()
    params: dict = field(default_factory=dict)  # fixed config fields of every run
    grid: list[dict] = field(default_factory=lambda: [{}])  # one dict of field overrides per run
    study: dict = field(default_factory=dict)  # tune only: TuneConfig and SearchSpace fields


def tune_classes() -> tuple:
    return TuneConfig, SearchSpace


ENTRY_POINTS = ("train", "stability", "tune")


def entry_point_configs(entry_point: str) -> tuple:
    """The config dataclasses whose fields an entry point's params/grid (tune: study) may set."""
    if entry_point == "tune":
        return tune_classes()
    return ({"train": TrainConfig, "stability": StabilityConfig}[entry_point],)


def entry_point_fields(entry_point: str) -> dict[str, type]:
    return {f.name: f.type for cls in entry_point_configs(entry_point) for f in dataclasses.fields(cls)}


# ---------------------------------------------------------------------------------------------------
# Reading a file: nodes with line numbers, values with types


class FileProblem:
    """Builds the errors of one file, each naming the line."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, node: yaml.Node, message: str) -> PipelineError:
        return PipelineError(f"{self.path} line {node.start_mark.line + 1}: {message}")


def mapping_items(node: yaml.Node, problem: FileProblem, what: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    """A mapping node's items as {key: (key node, value node)}, refusing duplicate or non-text keys."""
    if not isinstance(node, yaml.MappingNode):
        raise problem(node, f"{what} must be a mapping of key: value")
    items = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            raise problem(key_node, f"{what} has a key that is not a plain name")
        if key_node.value in items:
            raise problem(key_node, f"duplicate key '{key_node.value}' in {what}")
        items[key_node.value] = (key_node, value_node)
    return items


def check_known(items: dict, known, problem: FileProblem, what: str) -> None:
    for key, (key_node, _) in items.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise problem(key_node, f"unknown key '{key}' in {what} ({hint}known: {', '.join(known)})")


def type_name(expected) -> str:
    if typing.get_origin(expected) is tuple:
        item = typing.get_args(expected)[0]
        return "a list of " + {float: "numbers", int: "integers", str: "texts", bool: "true/false values"}[item]
    if typing.get_origin(expected) is types.UnionType:
        return " or ".join(type_name(t) for t in typing.get_args(expected))
    return {bool: "true/false", int: "an integer", float: "a number", str: "text",
            type(None): "null"}[expected]


def coerce(value, expected):
    """``value`` as the dataclass field type ``expected``; TypeError if it is not one."""
    if typing.get_origin(expected) is types.UnionType:  # e.g. str | None
        for option in typing.get_args(expected):
            try:
                return coerce(value, option)
            except TypeError:
                pass
        raise TypeError
    if typing.get_origin(expected) is tuple:  # tuple[float, ...]: a YAML list
        if not isinstance(value, list):
            raise TypeError
        return tuple(coerce(v, typing.get_args(expected)[0]) for v in value)
    if expected is float:
        # PyYAML follows YAML 1.1, where a float needs a dot: it reads 1e-4 as the text "1e-4".
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise TypeError
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError
    if expected is int and isinstance(value, bool):  # bool is an int in Python, not in a config
        raise TypeError
    if expected is type(None) and value is None:
        return None
    if not isinstance(value, expected):
        raise TypeError
    return value


def typed_value(node: yaml.Node, expected, problem: FileProblem, what: str):
    value = SafeConstructor().construct_object(node, deep=True)
    try:
        return coerce(value, expected)
    except TypeError:
        raise problem(node, f"{what} must be {type_name(expected)}, got {value!r}")


def typed_mapping(node, fields: dict[str, type], problem: FileProblem, what: str) -> dict:
    """A mapping whose keys are config fields, with each value checked against the field's type."""
    items = mapping_items(node, problem, what)
    check_known(items, list(fields), problem, what)
    return {key: typed_value(value, fields[key], problem, f"{what}.{key}") for key, (_, value) in items.items()}


def grid_points(node: yaml.Node, fields: dict[str, type], problem: FileProblem) -> list[tuple[dict, yaml.Node]]:
    """Expand ``grid`` (a mapping of lists, or a list of them) into one (overrides, node) per run."""
    grids = node.value if isinstance(node, yaml.SequenceNode) else [node]
    if not grids:
        raise problem(node, "grid is an empty list; remove it for a single run")
    points = []
    for grid in grids:
        items = mapping_items(grid, problem, "grid")
        check_known(items, list(fields), problem, "grid")
        values = {}
        for key, (_, value_node) in items.items():
            if not isinstance(value_node, yaml.SequenceNode) or not value_node.value:
                raise problem(value_node, f"grid.{key} must be a non-empty list of values, e.g. [0.1, 1.0]")
            values[key] = [typed_value(v, fields[key], problem, f"grid.{key}") for v in value_node.value]
        points += [(dict(zip(values, combo)), grid) for combo in itertools.product(*values.values())]
    return points


# ---------------------------------------------------------------------------------------------------
# The whole file


def load_spec(path) -> ExperimentSpec:
    """Parse and check an experiment file; every problem names the file and the line."""
    path = Path(path)
    try:
        root = yaml.compose(path.read_text())
    except OSError as e:
        raise PipelineError(f"cannot read experiment file {path}: {e}")
    except yaml.YAMLError as e:
        raise PipelineError(f"{path} is not valid YAML: {e}")
    problem = FileProblem(path)
    if root is None:
        raise PipelineError(f"{path} is empty; see experiments/seed_baseline.yaml for the format")
    top = mapping_items(root, problem, "the file")
    check_known(top, TOP_LEVEL_KEYS, problem, "the file")
    for key in ("experiment", "entry_point"):
        if key not in top:
            raise problem(root, f"missing required key '{key}'")
    text = {k: typed_value(top[k][1], str, problem, k) for k in ("experiment", "entry_point", "description")
            if k in top}
    if not text["experiment"].strip():
        raise problem(top["experiment"][1], "experiment (the MLflow experiment name) must not be empty")
    entry_point = text["entry_point"]
    if entry_point not in ENTRY_POINTS:
        raise problem(top["entry_point"][1],
                      f"unknown entry point '{entry_point}' (known: {', '.join(ENTRY_POINTS)})")
    fields = entry_point_fields(entry_point)
    data = DataConfig()
    if "data" in top:
        data_fields = {f.name: f.type for f in dataclasses.fields(DataConfig)}
        data = validated(DataConfig, typed_mapping(top["data"][1], data_fields, problem, "data"),
                         problem, [top["data"][1]], top["data"][0])
    spec = ExperimentSpec(path=str(path), name=text["experiment"], entry_point=entry_point,
                          description=text.get("description", ""), data=data)
    if entry_point == "tune":
        return tune_spec(spec, top, fields, problem, root)
    return grid_spec(spec, top, fields, problem)


def grid_spec(spec: ExperimentSpec, top: dict, fields: dict, problem: FileProblem) -> ExperimentSpec:
    """train/stability: fixed params and an optional grid, every combination checked now, before any run."""
    if "study" in top:
        raise problem(top["study"][0], f"'study' is for entry point tune only; {spec.entry_point} takes "
                      "params and grid")
    params = typed_mapping(top["params"][1], fields, problem, "params") if "params" in top else {}
    points = grid_points(top["grid"][1], fields, problem) if "grid" in top else [({}, None)]
    (cls,) = entry_point_configs(spec.entry_point)
    params_nodes = top.get("params") or top["entry_point"]  # (key, value) where params problems point
    for point, node in points:
        both = set(point) & set(params)
        if both:
            raise problem(node, f"{', '.join(sorted(both))} set in both params and grid; keep one")
        context = f" (grid point {point_name(point)})" if point else ""
        validated(cls, {**params, **point}, problem, [node, params_nodes[1]], node or params_nodes[0], context)
    return dataclasses.replace(spec, params=params, grid=[point for point, _ in points])


def tune_spec(spec: ExperimentSpec, top: dict, fields: dict, problem: FileProblem, root) -> ExperimentSpec:
    for key in ("params", "grid"):
        if key in top:
            raise problem(top[key][0], f"entry point tune takes a 'study' section, not '{key}'")
    if "study" not in top:
        raise problem(root, "entry point tune needs a 'study' section (TuneConfig and SearchSpace fields)")
    study = typed_mapping(top["study"][1], fields, problem, "study")
    for cls, values in zip(tune_classes(), split_study(study)):
        validated(cls, values, problem, [top["study"][1]], top["study"][0])
    return dataclasses.replace(spec, study=study, grid=[])


def split_study(study: dict) -> tuple[dict, dict]:
    """The study section's keys for the tune module's TuneConfig and for its SearchSpace."""
    return tuple({k: v for k, v in study.items() if k in {f.name for f in dataclasses.fields(cls)}}
                 for cls in tune_classes())


def validated(cls, values: dict, problem: FileProblem, sections: list, fallback: yaml.Node, context: str = ""):
    """Build the config a run would get and run its own checks (lr > 0 and so on).

    The error points at the first key of ``sections`` (mapping nodes) that the check's message names,
    else at ``fallback``.
    """
    config = cls(**values)
    try:
        config.validate()
    except ValueError as e:
        named = [key for section in sections if isinstance(section, yaml.MappingNode)
                 for key, _ in section.value if re.search(rf"\b{re.escape(key.value)}\b", str(e))]
        raise problem(named[0] if named else fallback, f"invalid {cls.__name__}{context}: {e}")
    return config


def point_name(point: dict) -> str:
    """A grid point as a run name: ``lr=1, weight_decay=0.001``."""
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items())


# ---------------------------------------------------------------------------------------------------
# Running


def capped(config, caps: Caps, **fields_to_cap):
    """``config`` with each named field lowered to the cap (a cap of 0 leaves the field alone)."""
    changes = {name: min(getattr(config, name), cap) for name, cap in fields_to_cap.items() if cap}
    return dataclasses.replace(config, **changes)


def experiment_id(name: str) -> str:
    """The id of the MLflow experiment ``name``, created if needed.

    Deliberately not ``mlflow.set_experiment``: under ``mlflow run`` the parent run already exists in
    the experiment ``mlflow run`` chose, and MLflow refuses to resume it while another is "active".
    """
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)


def run_experiment(spec: ExperimentSpec, caps: Caps = Caps()) -> dict:
    """Run every grid point (or the study) of ``spec``; returns the parent run id and the child run ids.

    A grid point whose training diverges ends as a FAILED run and the others still run; the call
    raises at the end, naming the failed points, so the command exits non-zero.
    """
    name = spec.name + (SMOKE_SUFFIX if caps.active else "")
    exp_id = experiment_id(name)
    limits = [n for n in (spec.data.limit, caps.limit) if n]  # 0 means "all images" in both
    data_cfg = dataclasses.replace(spec.data, limit=min(limits, default=0))
    splits, prepared_path, info = prepare_splits(data_cfg)
    with mlflow.start_run(experiment_id=exp_id, run_name=Path(spec.path).stem, description=spec.description,
                          tags={ROLE_TAG: "experiment", FILE_TAG: spec.path, "pipeline.smoke": caps.active}) as parent:
        mlflow.log_artifact(spec.path)
        tracking.log_new_params({"experiment_file": spec.path, "entry_point": spec.entry_point,
                                 "runs": len(spec.grid) or 1, **{f"cap_{k}": v for k, v in
                                                                 dataclasses.asdict(caps).items()}})
        if spec.entry_point == "tune":
            children, failed = [run_tune(spec, caps, exp_id, prepared_path)], []
        else:
            children, failed = run_grid(spec, caps, exp_id, splits, data_cfg, info["source"])
        mlflow.log_metrics({"runs_finished": len(children) - len(failed), "runs_failed": len(failed)})
    if failed:
        raise PipelineError(f"{len(failed)} of {len(children)} runs failed ({'; '.join(failed)}); the "
                            f"others are recorded in experiment '{name}'")
    return {"experiment": name, "parent_run_id": parent.info.run_id, "run_ids": children}


def run_grid(spec: ExperimentSpec, caps: Caps, exp_id: str, splits, data_cfg: DataConfig, source: str):
    """One nested run per grid point; returns the run ids and a description of each failed point."""
    tensors = Tensors.from_splits(splits)  # converted once, shared by every run
    run_ids, failed = [], []
    for i, point in enumerate(spec.grid, start=1):
        name = point_name(point) or spec.name
        print(f"[experiment {spec.name}] run {i}/{len(spec.grid)}: {name}")
        tags = {FILE_TAG: spec.path, POINT_TAG: json.dumps(point)}
        try:
            with mlflow.start_run(experiment_id=exp_id, run_name=name, nested=True, tags=tags) as run:
                run_ids.append(run.info.run_id)
                tracking.log_new_params(dataclasses.asdict(data_cfg))
                tracking.log_datasets(splits, source)
                if spec.entry_point == "stability":
                    cfg = capped(StabilityConfig(**spec.params, **point), caps,
                                 fit_epochs=caps.max_epochs, steps=caps.max_steps)
                    run_stability(cfg, splits, tensors)
                else:
                    cfg = capped(TrainConfig(**spec.params, **point), caps, epochs=caps.max_epochs)
                    _, model_info = steps.train(cfg, splits, tensors=tensors)
                    evaluate_step(model_info.model_uri, splits)  # the kept (best val) model on test
        except DivergedError as e:  # the run has ended FAILED with the reason as a tag; go on
            failed.append(f"{name}: {e.message}")
    return run_ids, failed


def run_tune(spec: ExperimentSpec, caps: Caps, exp_id: str, prepared_path: Path) -> str:
    """The study, through the tune module, in a nested run that becomes the trials' parent."""
    from pipeline.tune import run_study

    TuneConfig, SearchSpace = tune_classes()
    tune_values, space_values = split_study(spec.study)
    tune_cfg = capped(TuneConfig(**tune_values), caps, trials=caps.max_trials)
    space = capped(SearchSpace(**space_values), caps, epochs_high=caps.max_epochs, epochs_low=caps.max_epochs)
    if caps.active:
        # A study on a data slice must neither join the real study nor register its model as champion.
        tune_cfg = dataclasses.replace(tune_cfg, study_name=tune_cfg.study_name + SMOKE_SUFFIX, evaluate=False)
    with mlflow.start_run(experiment_id=exp_id, run_name="tune", nested=True, tags={FILE_TAG: spec.path}) as run:
        run_study(tune_cfg, space, str(prepared_path))
    return run.info.run_id

"""The experiment-file format (``experiments/*.yaml``), checked line by line before anything runs.

A file names the MLflow experiment, the entry point, its fixed parameters, and either a grid of values
(one MLflow run per combination) or an Optuna study spec::

    experiment: overfitting            # the MLflow experiment the runs go to
    entry_point: train                 # train | stability | tune | convex_optimum
    description: why this experiment exists
    data: {val_size: 10000}            # optional: DataConfig fields
    params: {epochs: 100, patience: 0} # the entry point's config fields, the same for every run
    grid: {lr: [0.1, 1.0]}             # one run per combination; a list of such mappings is run one after
                                       # the other (scikit-learn's ParameterGrid convention)
    study: {trials: 20, lr_high: 3.0}  # tune only, instead of params/grid: TuneConfig + SearchSpace fields
    seeds: [0, 1, 2]                   # optional (train, stability): every grid point once per seed

Why the checking is hand-made: a typo such as ``lrr: 0.1`` must not silently train with the default.
Each problem is reported as ``experiments/x.yaml line 7: ...`` (``pipeline.experiment_files.yaml_nodes``); the
allowed keys and their types come from the config dataclasses themselves, so a new config field is
accepted here without touching this module.
"""

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.config import DataConfig, TrainConfig
from pipeline.errors import PipelineError, short_repr
from pipeline.experiment_files.grids import grid_points, grid_values, point_count, point_name
from pipeline.experiment_files.yaml_nodes import (
    FileProblem,
    check_known,
    compose_plain,
    mapping_items,
    typed_mapping,
    typed_value,
)
from pipeline.study_config import ConvexConfig, ExperimentOptions, SearchSpace, StabilityConfig, TuneConfig

TOP_LEVEL_KEYS = ("experiment", "entry_point", "description", "data", "params", "grid", "study", "seeds")
# The experiment's name becomes a folder (reports/<name>/) and a command-line argument (report NAME):
# letters, digits, '-', '_' and '.', never '/', never a leading '.' (no '..', no hidden folder) or '-' (an
# option), and not too long.
NAME_LENGTH = 100
NAME_PATTERN = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9_.-]{{0,{NAME_LENGTH - 1}}}")


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
    seeds: tuple[int, ...] = ()  # each grid point runs once per seed; () = once, with the config's seed


ENTRY_POINT_CONFIGS = {  # the config dataclasses whose fields an entry point's params/grid (tune: study) may set
    "train": (TrainConfig,),
    "stability": (StabilityConfig,),
    "tune": (TuneConfig, SearchSpace),
    "convex_optimum": (ConvexConfig,),
}
ENTRY_POINTS = tuple(ENTRY_POINT_CONFIGS)


def entry_point_fields(entry_point: str) -> dict[str, type]:
    return {f.name: f.type for cls in ENTRY_POINT_CONFIGS[entry_point] for f in dataclasses.fields(cls)}


# ---------------------------------------------------------------------------------------------------
# The whole file


def load_spec(path, max_runs: int = ExperimentOptions.max_runs) -> ExperimentSpec:
    """Parse and check an experiment file; every problem names the file and the line.

    A grid that makes more than ``max_runs`` runs (points times seeds) is refused before it is expanded.
    """
    path = Path(path)
    try:
        source = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise PipelineError(f"cannot read experiment file {path}: {e}")
    except UnicodeDecodeError as e:
        raise PipelineError(f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                            "save it as UTF-8")
    problem = FileProblem(path)
    try:
        root = compose_plain(source, problem)
    except yaml.YAMLError as e:  # the parser's own words, on one line, and where it stopped when it knows
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        said = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise PipelineError(f"{path}{where} is not valid YAML: {short_repr(said, 200)}")
    if root is None:
        raise PipelineError(f"{path} is empty; see experiments/seed_baseline.yaml for the format")
    top = mapping_items(root, problem, "the file")
    check_known(top, TOP_LEVEL_KEYS, problem, "the file")
    for key in ("experiment", "entry_point"):
        if key not in top:
            raise problem(root, f"missing required key '{key}'")
    text = {k: typed_value(top[k][1], str, problem, k) for k in ("experiment", "entry_point", "description")
            if k in top}
    if not NAME_PATTERN.fullmatch(text["experiment"]):
        raise problem(top["experiment"][1], f"experiment {short_repr(text['experiment'])} is not a usable name: "
                      f"it names the MLflow experiment and its report folder, so use up to {NAME_LENGTH} "
                      "letters, digits, '-', '_' and '.', starting with a letter, a digit or '_'")
    entry_point = text["entry_point"]
    if entry_point not in ENTRY_POINTS:
        raise problem(top["entry_point"][1],
                      f"unknown entry point {short_repr(entry_point)} (known: {', '.join(ENTRY_POINTS)})")
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
    return grid_spec(spec, top, fields, problem, max_runs)


def seeds_of(top: dict, params: dict, grids: list, fields: dict, problem: FileProblem) -> tuple[int, ...]:
    """The ``seeds`` list: distinct integers, and then no ``seed`` in params or grid (it would be ignored)."""
    if "seeds" not in top:
        return ()
    key_node, node = top["seeds"]
    if "seed" not in fields:
        raise problem(key_node, f"entry point {top['entry_point'][1].value} has no seed to vary; remove seeds")
    seeds = typed_value(node, tuple[int, ...], problem, "seeds")
    if not seeds or len(set(seeds)) != len(seeds):
        raise problem(node, f"seeds must be a non-empty list of distinct integers, got {short_repr(list(seeds))}")
    if "seed" in params or any("seed" in values for values, _ in grids):
        raise problem(key_node, "seed is set in params or grid and seeds lists the seeds; keep one")
    return seeds


def runs_text(points: int, seeds: int) -> str:
    """``6 runs (3 grid points x 2 seeds)``: each point runs once per seed, or once without seeds."""
    def count(n, noun):
        return f"{n:,} {noun}{'' if n == 1 else 's'}"
    return f"{count(points * max(1, seeds), 'run')} ({count(points, 'grid point')} x {count(max(1, seeds), 'seed')})"


def check_size(points: int, seeds: int, max_runs: int, top: dict, problem: FileProblem) -> None:
    """Refuse a file that makes more than ``max_runs`` runs, before its grid is expanded."""
    runs = points * max(1, seeds)
    if runs > max_runs:
        where = top["grid"][0] if "grid" in top else top["seeds"][0]
        raise problem(where, f"{runs_text(points, seeds)} is more than --max-runs {max_runs:,}; shrink the grid "
                             f"or the seeds, or pass --max-runs {runs} to run them all")


def grid_spec(spec: ExperimentSpec, top: dict, fields: dict, problem: FileProblem, max_runs: int) -> ExperimentSpec:
    """train/stability: fixed params and an optional grid, every combination checked now, before any run."""
    if "study" in top:
        raise problem(top["study"][0], f"'study' is for entry point tune only; {spec.entry_point} takes "
                      "params and grid")
    params = typed_mapping(top["params"][1], fields, problem, "params") if "params" in top else {}
    grids = grid_values(top["grid"][1], fields, problem) if "grid" in top else [({}, None)]
    seeds = seeds_of(top, params, grids, fields, problem)
    check_size(point_count(grids), len(seeds), max_runs, top, problem)
    points = grid_points(grids)
    (cls,) = ENTRY_POINT_CONFIGS[spec.entry_point]
    params_nodes = top.get("params") or top["entry_point"]  # (key, value) where params problems point
    for point, node in points:
        both = set(point) & set(params)
        if both:
            raise problem(node, f"{', '.join(sorted(both))} set in both params and grid; keep one")
        context = f" (grid point {point_name(point)})" if point else ""
        validated(cls, {**params, **point}, problem, [node, params_nodes[1]], node or params_nodes[0], context)
    return dataclasses.replace(spec, params=params, grid=[point for point, _ in points], seeds=seeds)


def tune_spec(spec: ExperimentSpec, top: dict, fields: dict, problem: FileProblem, root) -> ExperimentSpec:
    for key in ("params", "grid", "seeds"):
        if key in top:
            raise problem(top[key][0], f"entry point tune takes a 'study' section, not '{key}'")
    if "study" not in top:
        raise problem(root, "entry point tune needs a 'study' section (TuneConfig and SearchSpace fields)")
    study = typed_mapping(top["study"][1], fields, problem, "study")
    for cls, values in zip(ENTRY_POINT_CONFIGS["tune"], split_study(study)):
        validated(cls, values, problem, [top["study"][1]], top["study"][0])
    return dataclasses.replace(spec, study=study, grid=[])


def split_study(study: dict) -> tuple[dict, dict]:
    """The study section's keys for the tune module's TuneConfig and for its SearchSpace."""
    return tuple({k: v for k, v in study.items() if k in {f.name for f in dataclasses.fields(cls)}}
                 for cls in ENTRY_POINT_CONFIGS["tune"])


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



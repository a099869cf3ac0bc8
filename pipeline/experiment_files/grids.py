"""The ``grid`` of an experiment file: its mappings of values checked, counted without expanding them, and
expanded into one run per combination (as scikit-learn's ParameterGrid does)."""

import itertools
import math

import yaml

from pipeline.experiment_files.yaml_nodes import FileProblem, check_known, mapping_items, typed_value


def grid_values(node: yaml.Node, fields: dict[str, type], problem: FileProblem) -> list[tuple[dict, yaml.Node]]:
    """``grid`` (a mapping of lists, or a list of them) as (key -> checked list of values, node) per mapping."""
    grids = node.value if isinstance(node, yaml.SequenceNode) else [node]
    if not grids:
        raise problem(node, "grid is an empty list; remove it for a single run")
    checked = []
    for grid in grids:
        items = mapping_items(grid, problem, "grid")
        check_known(items, list(fields), problem, "grid")
        values = {}
        for key, (_, value_node) in items.items():
            if not isinstance(value_node, yaml.SequenceNode) or not value_node.value:
                raise problem(value_node, f"grid.{key} must be a non-empty list of values, e.g. [0.1, 1.0]")
            values[key] = [typed_value(v, fields[key], problem, f"grid.{key}") for v in value_node.value]
        checked.append((values, grid))
    return checked


def point_count(grids: list[tuple[dict, yaml.Node]]) -> int:
    """How many runs the grid makes (each mapping: every combination), counted without making them."""
    return sum(math.prod(len(v) for v in values.values()) for values, _ in grids)


def grid_points(grids: list[tuple[dict, yaml.Node]]) -> list[tuple[dict, yaml.Node]]:
    """One (overrides, node) per combination of each mapping's values (scikit-learn's ParameterGrid)."""
    return [(dict(zip(values, combo)), grid) for values, grid in grids
            for combo in itertools.product(*values.values())]


def point_name(point: dict) -> str:
    """A grid point as a run name: ``lr=1, weight_decay=0.001``."""
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items())

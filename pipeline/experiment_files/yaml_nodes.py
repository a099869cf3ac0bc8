"""Typed values from YAML nodes, every problem naming its file and line.

PyYAML's node API (``yaml.compose``) keeps the line of every key and value; these helpers read a mapping
node as config fields of known types, so a typo or a wrong type is reported as ``file line 7: ...``.
Only plain YAML is read: ``SafeConstructor`` builds no Python objects from tags such as ``!!python/...``,
and ``compose_plain`` refuses anchors and aliases (a few lines of them expand to billions of values:
"billion laughs") and deep nesting (composing recurses once per level) before anything is composed.
"""

import difflib
import types
import typing
from pathlib import Path

import yaml
from yaml.constructor import SafeConstructor

from pipeline.errors import PipelineError, short_repr

MAX_NESTING = 20  # levels of lists and mappings; an experiment file needs 4


class FileProblem:
    """Builds the errors of one file, each naming the line."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, node: yaml.Node | yaml.Event, message: str) -> PipelineError:
        return PipelineError(f"{self.path} line {node.start_mark.line + 1}: {message}")


def compose_plain(text: str, problem: FileProblem) -> yaml.Node | None:
    """The document's node tree, once its events show no anchor, no alias and no deep nesting.

    The events come from PyYAML's parser, which keeps its own stack: a 20,000-deep file is read here
    without recursion and refused, where composing it would exceed Python's recursion limit.
    """
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise problem(event, "anchors and aliases (&name, *name) are not read in this file; write each "
                                 "value out where it is used")
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_NESTING:
                raise problem(event, f"lists and mappings nested more than {MAX_NESTING} levels deep")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    return yaml.compose(text, Loader=yaml.SafeLoader)


def mapping_items(node: yaml.Node, problem: FileProblem, what: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    """A mapping node's items as {key: (key node, value node)}, refusing duplicate or non-text keys."""
    if not isinstance(node, yaml.MappingNode):
        raise problem(node, f"{what} must be a mapping of key: value")
    items = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            raise problem(key_node, f"{what} has a key that is not a plain name")
        if key_node.value in items:
            raise problem(key_node, f"duplicate key {short_repr(key_node.value)} in {what}")
        items[key_node.value] = (key_node, value_node)
    return items


def check_known(items: dict, known, problem: FileProblem, what: str) -> None:
    for key, (key_node, _) in items.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise problem(key_node, f"unknown key {short_repr(key)} in {what} ({hint}known: {', '.join(known)})")


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
    try:
        value = SafeConstructor().construct_object(node, deep=True)
    except yaml.constructor.ConstructorError as e:  # e.g. a !!python/object tag: never built, refused
        raise problem(node, f"{what}: {short_repr(e.problem, 200)}; only plain YAML values are read")
    except ValueError as e:  # e.g. an integer of thousands of digits, a date such as 2001-02-30
        raise problem(node, f"{what} cannot be read: {short_repr(str(e), 100)}")
    try:
        return coerce(value, expected)
    except TypeError:
        raise problem(node, f"{what} must be {type_name(expected)}, got {short_repr(value)}")


def typed_mapping(node, fields: dict[str, type], problem: FileProblem, what: str) -> dict:
    """A mapping whose keys are config fields, with each value checked against the field's type."""
    items = mapping_items(node, problem, what)
    check_known(items, list(fields), problem, what)
    return {key: typed_value(value, fields[key], problem, f"{what}.{key}") for key, (_, value) in items.items()}

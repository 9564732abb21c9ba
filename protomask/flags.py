"""Command-line flags derived from pydantic config fields: every field of a command's config is a flag
whose type, choices, help and shown default come from the field, so a new setting is one edit."""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from schemas.storage import Location


def _strip_optional(annotation: Any) -> Any:
    """The type of a field without ``| None`` and without ``Annotated`` (``StoragePath | None``: ``Location``)."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            annotation = args[0]
    if typing.get_origin(annotation) is typing.Annotated:
        return typing.get_args(annotation)[0]
    return annotation


def _shown_default(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    if value is PydanticUndefined:
        return "required"
    if value is None:
        return ""
    return f"default: {' '.join(map(str, value)) if isinstance(value, list) else value}"


def leaf_fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """Every leaf field of a config, depth first, as (dotted name, field); nested configs are walked."""
    for name, field in model.model_fields.items():
        kind = _strip_optional(field.annotation)
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            yield from leaf_fields(kind, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


PATH_METAVARS = {"out": "DIR", "shards": "DIR", "run-dir": "DIR", "root": "DIR"}  # folder flags; other paths: PATH


def _argument_options(dotted: str, field: FieldInfo, name: str) -> dict[str, Any]:
    """argparse options for a field's type: a --flag/--no-flag pair for bool, choices for Literal, several
    values for list, a string for a Location (a path or URL, parsed by the config), else the type with a short
    metavar."""
    kind = _strip_optional(field.annotation)
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        return {"choices": choices, "type": type(choices[0])}
    if typing.get_origin(kind) is list:
        return {"nargs": "+", **_value(dotted, _strip_optional(typing.get_args(kind)[0]), name)}
    return _value(dotted, kind, name)


def _value(dotted: str, kind: Any, name: str) -> dict[str, Any]:
    """``type`` and ``metavar`` of one value: a Location is read as a string (the config parses it)."""
    if kind not in (int, float, str, Path, Location):
        raise TypeError(f"{dotted}: no flag for a field of type {kind}")
    if kind in (Path, Location):
        return {"type": str if kind is Location else Path, "metavar": PATH_METAVARS.get(name, "PATH")}
    return {"type": kind, "metavar": {int: "N", float: "X"}.get(kind, "VALUE")}


def add_flags(parser: argparse.ArgumentParser, model: type[BaseModel], *,
              rename: dict[str, str] | None = None) -> dict[str, str]:
    """A ``--flag`` for every leaf field of ``model``, named by the field (``schedule.joint_epochs`` →
    ``--joint-epochs``; the shortest unique tail where sections share a field name, ``--sam-points-per-side``;
    ``rename`` maps dotted names
    to other flag names), grouped by section in ``--help``. Returns argparse dest → dotted name (see
    ``overrides``). Every flag defaults to None (not given), so a config file's value stands unless the
    flag is given."""
    rename = rename or {}
    fields = list(leaf_fields(model))
    short = _shortest_unique_suffixes([dotted for dotted, _ in fields])
    groups: dict[str, argparse._ArgumentGroup] = {}
    dests = {}
    for dotted, field in fields:
        section = dotted.rpartition(".")[0]
        name = (rename.get(dotted) or short[dotted]).replace("_", "-")
        if section not in groups:
            groups[section] = parser.add_argument_group(f"{section} (--set {section}.FIELD=...)" if section else
                                                        "settings")
        options = _argument_options(dotted, field, name)
        shown = _shown_default(field)
        help_text = "; ".join(t for t in (field.description or "", shown) if t)
        action = groups[section].add_argument(f"--{name}", default=None, help=help_text.replace("%", "%%"),
                                              **options)
        dests[action.dest] = dotted
    return dests


def _shortest_unique_suffixes(dotted_names: list[str]) -> dict[str, str]:
    """Each dotted name → its shortest tail of components that no other name ends with, joined by "-"
    (``segmenter.sam.points_per_side`` → ``sam-points_per_side`` beside ``segmenter.sam2.points_per_side``)."""
    parts = {dotted: dotted.split(".") for dotted in dotted_names}
    short = {}
    for dotted, mine in parts.items():
        k = next((k for k in range(1, len(mine)) if sum(other[-k:] == mine[-k:] for other in parts.values()) == 1),
                 len(mine))  # a name that is the tail of another keeps its full dotted form
        short[dotted] = "-".join(mine[-k:])
    return short


def overrides(args: argparse.Namespace, dests: dict[str, str]) -> dict[str, Any]:
    """The given flags as dotted config overrides."""
    return {dotted: getattr(args, dest) for dest, dotted in dests.items() if getattr(args, dest) is not None}

"""Command-line flags derived from pydantic config fields: a flag's type, choices, help and shown default
come from its field, so a new setting is one field plus its name in a command's flag list."""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

Flag = str | tuple[str, str]  # a dotted field name (flag = its last part), or (flag name, dotted field name)


def field_of(model: type[BaseModel], dotted: str) -> FieldInfo:
    """The field behind a dotted name (``schedule.joint_epochs``), through nested config models."""
    *parents, leaf = dotted.split(".")
    for part in parents:
        model = _strip_optional(model.model_fields[part].annotation)
    if leaf not in model.model_fields:
        raise KeyError(f"{model.__name__} has no field {leaf!r}")
    return model.model_fields[leaf]


def _strip_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _shown_default(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    if value is PydanticUndefined:
        return "required"
    if value is None:
        return ""
    return f"default: {' '.join(map(str, value)) if isinstance(value, list) else value}"


def add_flags(parser: argparse.ArgumentParser, model: type[BaseModel], flags: Iterable[Flag]) -> dict[str, str]:
    """One ``--flag`` per field; returns argparse dest → dotted field name (see ``overrides``). Every flag
    defaults to None (not given), so a config file's value stands unless the flag is given."""
    dests = {}
    for flag in flags:
        name, dotted = (flag, flag) if isinstance(flag, str) else flag
        name = name.rsplit(".", 1)[-1].replace("_", "-")
        field = field_of(model, dotted)
        kind = _strip_optional(field.annotation)
        options: dict[str, Any] = {}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is Literal:
            choices = typing.get_args(kind)
            options.update(choices=choices, type=type(choices[0]))
        elif typing.get_origin(kind) is list:
            options.update(nargs="+", type=typing.get_args(kind)[0])
        elif kind in (int, float, str, Path):
            options["type"] = kind
        else:
            raise TypeError(f"{dotted}: no flag for a field of type {kind}")
        if "choices" not in options and "action" not in options:
            kind = options["type"]
            options["metavar"] = ({"out": "DIR", "shards": "DIR", "run-dir": "DIR", "root": "DIR"}.get(name, "PATH")
                                  if kind is Path else {int: "N", float: "X"}.get(kind, "VALUE"))
        shown = _shown_default(field)
        help_text = "; ".join(t for t in (field.description or "", shown) if t)
        action = parser.add_argument(f"--{name}", default=None, help=help_text.replace("%", "%%"), **options)
        dests[action.dest] = dotted
    return dests


def overrides(args: argparse.Namespace, dests: dict[str, str]) -> dict[str, Any]:
    """The given flags as dotted config overrides."""
    return {dotted: getattr(args, dest) for dest, dotted in dests.items() if getattr(args, dest) is not None}

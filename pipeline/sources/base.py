"""What every source yields: one SourceItem per input image, in a deterministic order."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


class SourceError(ValueError):
    """A source that cannot be read; the message names the file and line or field."""


@dataclass(frozen=True)
class SourceItem:
    path: str  # posix path relative to the source root
    label: int  # index into the source's class list
    class_name: str
    split: str | None  # "train" | "val" | "test"; None: the source says nothing (the plan draws a test share)
    parts_path: str | None = None  # ground-truth part label map, relative to the root
    object_path: str | None = None  # ground-truth object mask image, relative to the root
    extra: dict = field(default_factory=dict)  # JSON-able source metadata


@dataclass(frozen=True)
class SourceListing:
    classes: list[str]
    items: list[SourceItem]


def inside_root(root: Path, relative: str, where: str) -> Path:
    """Resolve ``relative`` under ``root``; refuse paths (or symlinks) that leave the root."""
    root = root.resolve()
    full = (root / relative).resolve()
    if full != root and root not in full.parents:
        raise SourceError(f"{where}: path {relative!r} resolves outside the root {root}")
    return full

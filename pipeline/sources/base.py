"""What every source yields: one SourceItem per input image, in a deterministic order."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from pathlib import Path

from schemas.storage import Location


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


def inside_root(root: Location | Path, relative: str, where: str) -> Location:
    """``relative`` under ``root``; refuse paths that leave the root. A local path is resolved (a symlink that
    leaves the root is refused); below an s3:// URL, where keys have no symlinks, it is normalised as a POSIX
    path (``a/../b`` is ``b``)."""
    root = Location.parse(root)
    if root.is_local:
        base = root.local.resolve()
        full = (base / relative).resolve()
        if full != base and base not in full.parents:
            raise SourceError(f"{where}: path {relative!r} resolves outside the root {base}")
        return Location.parse(full)
    normal = posixpath.normpath(relative)
    if relative.startswith("/") or normal == ".." or normal.startswith("../"):
        raise SourceError(f"{where}: path {relative!r} resolves outside the root {root}")
    return root if normal == "." else root / normal

"""ImageFolder layout: ``root/<class>/<image>``, or the same under ``root/{train,val,test}/``; the root is a folder
or an s3:// prefix.

Without split folders the items carry no split (``None``): the plan draws a test share
(``SegmentConfig.test_fraction``)."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from pipeline.sources.base import SourceError, SourceItem, SourceListing, inside_root
from schemas.manifest import SPLITS
from schemas.storage import Location, is_dir, list_files

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def _is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def _class_folders(group: Location) -> dict[str, list[str]]:
    """Every class folder of ``group`` (a sub-folder whose name does not start with '.') → the image files below
    it, ``/``-separated and relative to it. Locally each folder is walked (a symlinked class folder too, and an
    empty one is a class); on S3 one LIST of ``group`` gives them all."""
    if group.is_local:
        folders = [d for d in group.local.iterdir() if d.is_dir() and not d.name.startswith(".")]
        return {d.name: [p.relative_to(d).as_posix() for p in d.rglob("*") if _is_image(p.name) and not p.is_dir()]
                for d in folders}
    found: dict[str, list[str]] = {}
    for name in list_files(group):
        folder, sep, below = name.partition("/")
        if sep and not folder.startswith("."):
            images = found.setdefault(folder, [])  # a folder holding other files only is a class too, as locally
            if _is_image(below):
                images.append(below)
    return found


def list_items(root: Location | Path) -> SourceListing:
    """Classes are the sorted sub-folder names; split folders are used when present, else no item has a split."""
    root = Location.parse(root)
    if not is_dir(root):
        raise SourceError(f"{root}: not a directory")
    split_dirs = [s for s in SPLITS if is_dir(root / s)]
    groups = [(s, f"{s}/", _class_folders(root / s)) for s in split_dirs] or [(None, "", _class_folders(root))]
    classes = sorted({name for _, _, folders in groups for name in folders})
    if not classes:
        raise SourceError(f"{root}: no class sub-folders found (expected root/<class>/<image>)")
    index = {name: i for i, name in enumerate(classes)}
    items = []
    for split, prefix, folders in groups:
        for name in sorted(folders):
            relative = sorted(f"{prefix}{name}/{image}" for image in folders[name])
            for rel in relative:
                inside_root(root, rel, f"{root}/{prefix}{name}")  # refuses symlinks that leave the root
            items += [SourceItem(path=rel, label=index[name], class_name=name, split=split) for rel in relative]
    if not items:
        raise SourceError(f"{root}: no image files found under the class folders")
    return SourceListing(classes=classes, items=items)

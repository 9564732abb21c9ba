"""ImageFolder layout: ``root/<class>/<image>``, or the same under ``root/{train,val,test}/``.

Without split folders the items carry no split (``None``): the plan draws a test share
(``SegmentConfig.test_fraction``)."""

from __future__ import annotations

from pathlib import Path

from pipeline.sources.base import SourceError, SourceItem, SourceListing, inside_root
from schemas.manifest import SPLITS

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def _images(class_dir: Path, root: Path) -> list[str]:
    files = [p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir()]
    relative = [p.relative_to(root).as_posix() for p in files]
    for rel in relative:
        inside_root(root, rel, f"{class_dir}")  # refuses symlinks that leave the root
    return sorted(relative)


def list_items(root: Path) -> SourceListing:
    """Classes are the sorted sub-folder names; split folders are used when present, else no item has a split."""
    if not root.is_dir():
        raise SourceError(f"{root}: not a directory")
    split_dirs = [s for s in SPLITS if (root / s).is_dir()]
    groups: list[tuple[str | None, Path]] = [(s, root / s) for s in split_dirs] or [(None, root)]
    classes = sorted({d.name for _, g in groups for d in g.iterdir() if d.is_dir() and not d.name.startswith(".")})
    if not classes:
        raise SourceError(f"{root}: no class sub-folders found (expected root/<class>/<image>)")
    index = {name: i for i, name in enumerate(classes)}
    items = [
        SourceItem(path=rel, label=index[d.name], class_name=d.name, split=split)
        for split, group in groups
        for d in sorted(group.iterdir())
        if d.is_dir() and d.name in index
        for rel in _images(d, root)
    ]
    if not items:
        raise SourceError(f"{root}: no image files found under the class folders")
    return SourceListing(classes=classes, items=items)

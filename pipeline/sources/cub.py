"""CUB-200-2011 layout: images.txt, image_class_labels.txt, train_test_split.txt, classes.txt
(1-based ids, space separated); bounding_boxes.txt and parts/ are optional and go into metadata.

The ground-truth object masks are a separate download that extracts to
``segmentations/<class dir>/<image name>.png`` (the image's path under ``images/``, ending in ``.png``).
It is optional and found next to ``images/`` or, in the usual layout, beside ``CUB_200_2011/`` at the
root (the first of the two that exists); an image with a mask file gets it as ``object_path``.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from pipeline.sources.base import SourceError, SourceItem, SourceListing, inside_root
from schemas.storage import Location, is_dir, list_files, read_text, size


def _table(path: Location, columns: int, *, required: bool = True) -> dict[int, list[str]] | None:
    try:
        text = read_text(path)
    except (FileNotFoundError, IsADirectoryError):
        if required:
            raise SourceError(f"{path}: missing (required by the CUB-200-2011 layout)") from None
        return None
    rows: dict[int, list[str]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(maxsplit=columns - 1) if columns == 2 else line.split()
        if len(fields) < columns or not fields[0].isdigit():
            raise SourceError(f"{path}:{number}: expected {columns} space-separated fields, got {line!r}")
        rows.setdefault(int(fields[0]), []).append(fields[1:] if columns > 2 else fields[1])
    return rows


def _parts(root: Location) -> tuple[dict[int, str], dict[int, list[list[float]]]] | None:
    names_file, locs_file = root / "parts/parts.txt", root / "parts/part_locs.txt"
    if size(names_file) is None or size(locs_file) is None:
        return None
    names = {part_id: rows[0] for part_id, rows in (_table(names_file, 2) or {}).items()}
    locs: dict[int, list[list[float]]] = {}
    for image_id, rows in (_table(locs_file, 5) or {}).items():
        # part_id x y visible -> keep visible parts as [part_id, x, y]
        locs[image_id] = [[float(p), float(x), float(y)] for p, x, y, v in rows if float(v) > 0]
    return names, locs


def _segmentations(root: Location, prefix: str) -> tuple[str, dict[str, int]] | None:
    """The ``segmentations/`` folder relative to ``root`` (with its ``/``) and the files below it (one listing,
    not a look-up per image: on S3 one LIST), or None when there is none."""
    for folder in dict.fromkeys((prefix + "segmentations/", "segmentations/")):
        if is_dir(found := inside_root(root, folder, f"{root}/{folder}")):
            return folder, list_files(found)
    return None


def list_items(root: Location | Path) -> SourceListing:
    """Read a CUB-200-2011 folder or s3:// prefix (``root`` or ``root/CUB_200_2011``)."""
    root = Location.parse(root)
    prefix = "CUB_200_2011/" if is_dir(root / "CUB_200_2011") else ""
    base = root / "CUB_200_2011" if prefix else root
    images = _table(base / "images.txt", 2)
    labels = _table(base / "image_class_labels.txt", 2)
    splits = _table(base / "train_test_split.txt", 2)
    classes_table = _table(base / "classes.txt", 2)
    boxes = _table(base / "bounding_boxes.txt", 5, required=False)
    parts = _parts(base)
    segmentations = _segmentations(root, prefix)
    class_ids = sorted(classes_table)
    class_index = {cid: i for i, cid in enumerate(class_ids)}
    classes = [classes_table[cid][0] for cid in class_ids]
    items = []
    for image_id in sorted(images):
        where = f"{base / 'images.txt'} id {image_id}"
        for table, name in ((labels, "image_class_labels.txt"), (splits, "train_test_split.txt")):
            if image_id not in table:
                raise SourceError(f"{base / name}: no entry for image id {image_id}")
        cid = int(labels[image_id][0])
        if cid not in class_index:
            raise SourceError(f"{base / 'image_class_labels.txt'}: image {image_id} has unknown class {cid}")
        relative = prefix + "images/" + images[image_id][0]
        inside_root(root, relative, where)
        object_path = None
        if segmentations is not None:
            folder, masks = segmentations
            mask = PurePosixPath(images[image_id][0]).with_suffix(".png").as_posix()
            inside_root(root, folder + mask, where)
            if mask in masks:
                object_path = folder + mask
        extra: dict = {"image_id": image_id}
        if boxes and image_id in boxes:
            x, y, w, h = (float(v) for v in boxes[image_id][0])
            extra["bbox_xywh"] = [x, y, w, h]
        if parts:
            extra["parts"] = parts[1].get(image_id, [])
            extra["part_names"] = [parts[0][k] for k in sorted(parts[0])]
        items.append(
            SourceItem(
                path=relative,
                label=class_index[cid],
                class_name=classes[class_index[cid]],
                split="train" if splits[image_id][0] == "1" else "test",
                object_path=object_path,
                extra=extra,
            )
        )
    return SourceListing(classes=classes, items=items)

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from pipeline.sources import SourceError
from pipeline.sources import cub, imagefolder, listing


def _img(path: Path, color=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), color).save(path)


def test_cub_mini_layout(cub_mini: Path) -> None:
    got = cub.list_items(cub_mini)
    assert len(got.classes) == 6 and got.classes[0] == "001.Blue_Jay"
    assert len(got.items) == 60
    assert sum(i.split == "train" for i in got.items) == 36
    assert sum(i.split == "test" for i in got.items) == 24
    assert all((cub_mini / i.path).is_file() for i in got.items)
    assert got.items[0].extra == {"image_id": 1}
    assert [i.path for i in got.items] == [i.path for i in cub.list_items(cub_mini).items]  # deterministic


def test_cub_optional_boxes_and_parts(tmp_path: Path) -> None:
    root = tmp_path / "CUB_200_2011"
    _img(root / "images" / "001.A" / "a.jpg")
    (root / "images.txt").write_text("1 001.A/a.jpg\n")
    (root / "image_class_labels.txt").write_text("1 1\n")
    (root / "train_test_split.txt").write_text("1 0\n")
    (root / "classes.txt").write_text("1 001.A\n")
    (root / "bounding_boxes.txt").write_text("1 1.0 2.0 10.0 8.0\n")
    (root / "parts").mkdir()
    (root / "parts" / "parts.txt").write_text("1 back\n2 left eye\n")
    (root / "parts" / "part_locs.txt").write_text("1 1 3.0 4.0 1\n1 2 0.0 0.0 0\n")
    item = cub.list_items(tmp_path).items[0]
    assert item.path == "CUB_200_2011/images/001.A/a.jpg" and item.split == "test"
    assert item.extra["bbox_xywh"] == [1.0, 2.0, 10.0, 8.0]
    assert item.extra["parts"] == [[1.0, 3.0, 4.0]]
    assert item.extra["part_names"] == ["back", "left eye"]


def _cub_root(cub: Path) -> None:
    """Two images of one class: 1 train, 2 test."""
    for name in ("a", "b"):
        _img(cub / "images" / "001.A" / f"{name}.jpg")
    (cub / "images.txt").write_text("1 001.A/a.jpg\n2 001.A/b.jpg\n")
    (cub / "image_class_labels.txt").write_text("1 1\n2 1\n")
    (cub / "train_test_split.txt").write_text("1 1\n2 0\n")
    (cub / "classes.txt").write_text("1 001.A\n")


@pytest.mark.parametrize("list_at, segmentations", [
    ("", "segmentations"),  # the usual layout: CUB_200_2011/ and segmentations/ side by side
    ("", "CUB_200_2011/segmentations"),  # next to images/
    ("CUB_200_2011", "CUB_200_2011/segmentations"),  # the root is the CUB folder itself
])
def test_cub_segmentations_become_object_paths(tmp_path: Path, list_at: str, segmentations: str) -> None:
    _cub_root(tmp_path / "CUB_200_2011")
    root = tmp_path / list_at
    assert [i.object_path for i in cub.list_items(root).items] == [None, None]  # no segmentations folder
    mask = tmp_path / segmentations / "001.A" / "a.png"  # b has no mask file: None, no error
    mask.parent.mkdir(parents=True)
    Image.new("L", (16, 12), 255).save(mask)
    items = cub.list_items(root).items
    assert [i.object_path for i in items] == [mask.relative_to(root).as_posix(), None]
    assert (root / items[0].object_path).is_file() and items[0].path.endswith("images/001.A/a.jpg")


def test_cub_segmentation_symlink_out_of_root_rejected(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _cub_root(root / "CUB_200_2011")
    outside = tmp_path / "secret.png"
    Image.new("L", (16, 12), 255).save(outside)
    (root / "segmentations" / "001.A").mkdir(parents=True)
    os.symlink(outside, root / "segmentations" / "001.A" / "b.png")
    with pytest.raises(SourceError, match=r"images.txt id 2: path 'segmentations/001.A/b.png' .*outside the root"):
        cub.list_items(root)


def test_cub_missing_file_named(tmp_path: Path) -> None:
    (tmp_path / "images.txt").write_text("1 a/b.jpg\n")
    with pytest.raises(SourceError, match="image_class_labels.txt"):
        cub.list_items(tmp_path)


def test_cub_malformed_line_named(tmp_path: Path) -> None:
    for name in ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt"):
        (tmp_path / name).write_text("1 x\n")
    (tmp_path / "train_test_split.txt").write_text("1 1\nbad\n")
    with pytest.raises(SourceError, match=r"train_test_split.txt:2"):
        cub.list_items(tmp_path)


def test_imagefolder_with_and_without_splits(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    _img(flat / "cat" / "1.png")
    _img(flat / "dog" / "2.jpg")
    (flat / "dog" / "notes.txt").write_text("not an image")
    got = imagefolder.list_items(flat)
    assert got.classes == ["cat", "dog"]
    # no split folders: no split (the plan draws a test share, tests/test_plan.py)
    assert [(i.path, i.label, i.split) for i in got.items] == [("cat/1.png", 0, None), ("dog/2.jpg", 1, None)]
    split = tmp_path / "split"
    _img(split / "train" / "cat" / "1.png")
    _img(split / "test" / "dog" / "2.png")
    _img(split / "val" / "cat" / "3.png")
    got = imagefolder.list_items(split)
    assert got.classes == ["cat", "dog"]
    assert {(i.path, i.split) for i in got.items} == {
        ("train/cat/1.png", "train"), ("test/dog/2.png", "test"), ("val/cat/3.png", "val")
    }


def test_imagefolder_symlink_out_of_root_rejected(tmp_path: Path) -> None:
    outside = tmp_path / "secret.png"
    _img(outside)
    root = tmp_path / "root"
    _img(root / "cat" / "ok.png")
    os.symlink(outside, root / "cat" / "link.png")
    with pytest.raises(SourceError, match="outside the root"):
        imagefolder.list_items(root)


def test_listing_csv_and_parquet(tmp_path: Path) -> None:
    _img(tmp_path / "a.png")
    _img(tmp_path / "sub" / "b.png")
    csv = tmp_path / "list.csv"
    csv.write_text("path,label,split\na.png,bird,train\nsub/b.png,cat,test\n")
    got = listing.list_items(tmp_path, csv)
    assert got.classes == ["bird", "cat"]
    assert [(i.path, i.label, i.split) for i in got.items] == [("a.png", 0, "train"), ("sub/b.png", 1, "test")]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"path": ["a.png", "sub/b.png"], "label": [10, 2]}), tmp_path / "l.parquet")
    got = listing.list_items(tmp_path, tmp_path / "l.parquet")
    assert got.classes == ["2", "10"] and [i.label for i in got.items] == [1, 0]
    assert {i.split for i in got.items} == {None}  # no split column
    csv.write_text("path,label,split\na.png,bird,\nsub/b.png,cat,test\n")
    assert [i.split for i in listing.list_items(tmp_path, csv).items] == [None, "test"]  # an empty value


@pytest.mark.parametrize("bad", ["../escape.png", "/etc/passwd", "sub/../../x.png"])
def test_listing_path_traversal_rejected(tmp_path: Path, bad: str) -> None:
    csv = tmp_path / "list.csv"
    csv.write_text(f"path,label\nok.png,a\n{bad},b\n")
    with pytest.raises(SourceError, match=r"list.csv row 3: path .* outside the root"):
        listing.list_items(tmp_path, csv)


def test_listing_bad_columns_and_split(tmp_path: Path) -> None:
    csv = tmp_path / "list.csv"
    csv.write_text("file,label\na.png,x\n")
    with pytest.raises(SourceError, match=r"missing column\(s\) \['path'\]"):
        listing.list_items(tmp_path, csv)
    csv.write_text("path,label,split\na.png,x,holdout\n")
    with pytest.raises(SourceError, match="row 2: split 'holdout'"):
        listing.list_items(tmp_path, csv)

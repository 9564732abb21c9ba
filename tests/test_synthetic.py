from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.sources import SourceError
from pipeline.sources import synthetic
from schemas.config import SyntheticConfig

SMALL = SyntheticConfig(num_classes=3, train_per_class=4, test_per_class=2, image_size=96, distractors=3, seed=7)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_counts_layout_and_order(tmp_path: Path) -> None:
    listing = synthetic.list_items(tmp_path, SMALL)
    assert listing.classes == ["red_circle", "green_square", "blue_triangle"]
    counts = Counter((i.split, i.class_name) for i in listing.items)
    assert counts == {(s, c): n for s, n in (("train", 4), ("test", 2)) for c in listing.classes}
    keys = [(i.split, i.label, i.path) for i in listing.items]
    assert keys == sorted(keys)
    first = listing.items[0]
    assert first.path == "images/red_circle/test_0000.png" and first.parts_path == "parts/red_circle/test_0000.png"
    assert first.object_path == "objects/red_circle/test_0000.png"
    assert first.extra == {} and first.label == 0
    for item in listing.items:
        assert listing.classes[item.label] == item.class_name
        with Image.open(tmp_path / item.path) as im:
            assert im.mode == "RGB" and im.size == (96, 96)
        with Image.open(tmp_path / item.parts_path) as im:
            assert im.mode == "L" and im.size == (96, 96)
            parts = np.asarray(im)
        with Image.open(tmp_path / item.object_path) as im:  # the object: the discriminative part (id 1)
            assert im.mode == "L" and im.size == (96, 96)
            assert np.array_equal(np.asarray(im), np.where(parts == 1, 255, 0)) and (parts == 1).any()
    marker = json.loads((tmp_path / "synthetic.json").read_text())
    assert marker["config"] == SMALL.model_dump(mode="json")
    assert marker["classes"] == listing.classes
    names = ["discriminative", "distractor_1", "distractor_2", "distractor_3"]
    assert marker["part_names"] == synthetic.part_names(SMALL) == names


def test_deterministic_and_idempotent(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    synthetic.generate(a, SMALL)
    synthetic.generate(b, SMALL)
    files = _files(a)
    assert files == _files(b) and len(files) == 3 * 3 * 6 + 1  # image, part map, object map; the marker
    mtime = (a / "images/red_circle/train_0000.png").stat().st_mtime_ns
    synthetic.generate(a, SMALL)  # finished with the same config: nothing is rewritten
    assert (a / "images/red_circle/train_0000.png").stat().st_mtime_ns == mtime
    other = synthetic.render(SMALL.model_copy(update={"seed": 8}), "train", 0, 0)[0]
    assert not np.array_equal(other, synthetic.render(SMALL, "train", 0, 0)[0])


def test_a_root_without_object_maps_gets_them_from_its_part_maps(tmp_path: Path) -> None:
    """A root generated before object maps existed (marker, images, part maps) gets them on the next
    generate; nothing else is rewritten and the marker stays as it was."""
    fresh, old = tmp_path / "fresh", tmp_path / "old"
    synthetic.generate(fresh, SMALL)
    synthetic.generate(old, SMALL)
    shutil.rmtree(old / "objects")
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(old.rglob("*")) if p.is_file()}
    listing = synthetic.list_items(old, SMALL)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in before} == before
    assert _files(old) == _files(fresh)  # the derived object maps are the ones generation writes
    assert all((old / item.object_path).is_file() for item in listing.items)
    (old / listing.items[0].object_path).unlink()
    (old / listing.items[0].parts_path).write_bytes(b"not a png")
    with pytest.raises(SourceError, match=r"parts/red_circle/test_0000.png: unreadable part map"):
        synthetic.generate(old, SMALL)


def test_different_config_refused(tmp_path: Path) -> None:
    synthetic.generate(tmp_path, SMALL)
    before = _files(tmp_path)
    with pytest.raises(SourceError, match="synthetic.json"):
        synthetic.list_items(tmp_path, SMALL.model_copy(update={"seed": 1}))
    assert _files(tmp_path) == before


def test_class_and_distractor_pairs() -> None:
    for n in range(2, 9):
        classes = synthetic.class_pairs(n)
        assert len(set(classes)) == n
        assert len(set(synthetic.class_names(n))) == n
        distractors = synthetic.distractor_pairs(n)
        assert distractors and not set(distractors) & set(classes)
        # neither a colour nor a shape alone identifies a class: each appears in a distractor too
        assert {s for s, _ in classes} == {s for s, _ in distractors}
        assert {c for _, c in classes} == {c for _, c in distractors}


def _part_colours(image: np.ndarray, labels: np.ndarray) -> dict[int, np.ndarray]:
    return {int(i): image[labels == i].mean(axis=0) for i in np.unique(labels) if i}


def test_part_map_matches_drawn_parts() -> None:
    config = SyntheticConfig(num_classes=8, distractors=4, seed=3, image_size=128)
    palette = {name: np.array(rgb, float) for name, rgb in synthetic.PALETTE.items()}
    for label, (_, colour) in enumerate(synthetic.class_pairs(config.num_classes)):
        for index in range(3):
            image, labels = synthetic.render(config, "train", label, index)
            assert image.shape == (128, 128, 3) and image.dtype == np.uint8 and labels.dtype == np.uint8
            assert labels.max() <= 1 + config.distractors
            area = (labels == 1).sum()
            assert area > 0.02 * labels.size  # the discriminative part is drawn last, never hidden
            colours = _part_colours(image, labels)
            assert np.abs(colours[1] - palette[colour]).max() < 20
            for part_id, mean in colours.items():  # every visible part is one palette colour
                assert min(np.abs(mean - p).max() for p in palette.values()) < 20, part_id
            background = image[labels == 0].astype(float)
            assert (background.max(axis=1) - background.min(axis=1)).mean() < 60  # muted, not saturated


def test_parts_are_segmentable_by_slic() -> None:
    slic = pytest.importorskip("skimage.segmentation").slic
    config = SyntheticConfig()
    hits = 0
    for n in range(20):
        image, labels = synthetic.render(config, "train", n % config.num_classes, n)
        segments = slic(image, n_segments=48, compactness=10, start_label=0)
        part = labels == 1
        best = max(
            (part & (segments == s)).sum() / (part | (segments == s)).sum() for s in np.unique(segments[part])
        )
        hits += best >= 0.5
    assert hits >= 16

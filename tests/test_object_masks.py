"""Ground-truth object masks from the source to the shard: ``K.object.png`` (255 = object) and
``has_object``, the > 127 threshold of soft masks, unreadable mask files, and verify's member check."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import segment_without_ray
from pipeline.manifest import _check_sample, verify
from pipeline.masks import select_masks
from pipeline.segmenters.base import Proposal
from pipeline.shards import encode_sample, iter_samples
from schemas.config import SegmentConfig
from schemas.manifest import shard_glob
from schemas.shard import OBJECT_MEMBER, PARTS_MEMBER, SampleRecord


def _samples(out: Path) -> list[tuple[dict, dict[str, bytes]]]:
    """(record, members) of every sample in the shard directory."""
    return [(json.loads(members["json"]), members)
            for tar in sorted(out.glob(shard_glob())) for _, members in iter_samples(tar)]


def _png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "L"  # single channel
        return np.asarray(im)


def test_synthetic_job_stores_the_discriminative_part_as_the_object(tmp_path: Path) -> None:
    out = segment_without_ray(SegmentConfig.model_validate(dict(
        source="synthetic", root=tmp_path / "synth", out=tmp_path / "shards", shard_size=4, masks_per_image=2,
        segmenter={"name": "grid", "grid": 2},
        synthetic={"num_classes": 2, "train_per_class": 2, "test_per_class": 1, "image_size": 48})))
    samples = _samples(out)
    assert len(samples) == 6
    for record, members in samples:
        assert record["has_object"] and OBJECT_MEMBER in members
        obj, parts = _png(members[OBJECT_MEMBER]), _png(members[PARTS_MEMBER])
        assert obj.shape == (record["height"], record["width"]) == (48, 48)
        assert np.array_equal(obj, np.where(parts == 1, 255, 0)) and (parts == 1).any() and (parts > 1).any()
    assert verify(out) == []


def _cub(root: Path) -> None:
    """A CUB root with soft greyscale segmentations beside CUB_200_2011/: a (same size as the image),
    b (twice the stored size: the image is downscaled to max_side), c (no mask file), d (not a PNG)."""
    cub = root / "CUB_200_2011"
    sizes = {"a": (40, 30), "b": (80, 60), "c": (40, 30), "d": (40, 30)}
    masks = root / "segmentations" / "001.A"
    masks.mkdir(parents=True)
    (cub / "images" / "001.A").mkdir(parents=True)
    for name, size in sizes.items():
        Image.new("RGB", size, (90, 120, 60)).save(cub / "images" / "001.A" / f"{name}.jpg")
    soft = np.zeros((30, 40), np.uint8)
    soft[:, 10:20], soft[:, 20:30], soft[:, 30:] = 127, 128, 204  # 204: 4 of 5 annotators
    Image.fromarray(soft, "L").save(masks / "a.png")
    half = np.zeros((60, 80), np.uint8)
    half[:, :40] = 153
    Image.fromarray(half, "L").save(masks / "b.png")
    (masks / "d.png").write_bytes(b"not a png")
    (cub / "images.txt").write_text("".join(f"{i} 001.A/{n}.jpg\n" for i, n in enumerate(sizes, 1)))
    (cub / "image_class_labels.txt").write_text("".join(f"{i} 1\n" for i in range(1, 5)))
    (cub / "train_test_split.txt").write_text("1 1\n2 1\n3 0\n4 0\n")
    (cub / "classes.txt").write_text("1 001.A\n")


def test_soft_cub_masks_are_object_above_127_and_a_bad_mask_is_an_error_row(tmp_path: Path) -> None:
    _cub(tmp_path / "cub")
    out = segment_without_ray(SegmentConfig.model_validate(dict(
        source="cub", root=tmp_path / "cub", out=tmp_path / "shards", shard_size=4, masks_per_image=2,
        max_side=40, segmenter={"name": "grid", "grid": 2})))
    samples = {Path(record["source_path"]).stem: (record, members) for record, members in _samples(out)}
    assert set(samples) == {"a", "b", "c"}

    record, members = samples["a"]
    assert record["has_object"] and (record["width"], record["height"]) == (40, 30)
    expected = np.zeros((30, 40), np.uint8)
    expected[:, 20:] = 255  # 128 and 204 are object, 127 is not
    assert np.array_equal(_png(members[OBJECT_MEMBER]), expected)

    record, members = samples["b"]  # 80x60 mask, bilinear to the stored 40x30, then thresholded
    obj = _png(members[OBJECT_MEMBER])
    assert record["has_object"] and obj.shape == (30, 40) and set(np.unique(obj)) == {0, 255}
    assert (obj[:, :18] == 255).all() and (obj[:, 22:] == 0).all()

    record, members = samples["c"]
    assert not record["has_object"] and OBJECT_MEMBER not in members

    rows = {Path(r["source_path"]).stem: r for p in out.glob(shard_glob(part="parquet"))
            for r in pq.read_table(p).to_pylist()}
    assert rows["d"]["status"] == "error"
    assert rows["d"]["error_message"] == (f"object mask {tmp_path / 'cub' / 'segmentations/001.A/d.png'}: "
                                          "not an image (format not recognised)")
    assert verify(out) == []


def _encoded(has_object: bool, object_mask: np.ndarray | None):
    masks = np.zeros((1, 12, 16), bool)
    masks[0, 2:8, 3:9] = True
    chosen = select_masks(Proposal(masks, np.ones(1, np.float32)), k=2)
    record = SampleRecord(
        key="0000000", label=0, class_name="b", split="train", source_path="x.png", width=16, height=12,
        original_width=16, original_height=12, masks_per_image=2, n_masks=1, boxes=chosen.boxes.tolist(),
        areas=chosen.areas.tolist(), scores=[1.0], crop_size=None, has_object=has_object,
    )
    return encode_sample(record, np.zeros((12, 16, 3), np.uint8), chosen, None, 90, object_mask=object_mask)


def test_verify_expects_object_png_exactly_when_has_object() -> None:
    mask = np.where(np.arange(16)[None, :] < 8, 255, 0).astype(np.uint8).repeat(12, axis=0)
    sample = _encoded(True, mask)
    assert np.array_equal(_png(sample.members[OBJECT_MEMBER]), mask)
    assert _check_sample(sample.key, sample.members) is None
    missing = {ext: data for ext, data in sample.members.items() if ext != OBJECT_MEMBER}
    assert _check_sample(sample.key, missing) == (
        "sample 0000000: members ['jpg', 'json', 'masks.npy.gz'] differ from "
        "['jpg', 'json', 'masks.npy.gz', 'object.png']")
    without = _encoded(False, None)
    assert OBJECT_MEMBER not in without.members and _check_sample(without.key, without.members) is None
    stray = {**without.members, OBJECT_MEMBER: sample.members[OBJECT_MEMBER]}  # stored but not announced
    assert "differ" in _check_sample(without.key, stray)
    with pytest.raises(ValueError, match="has_object is True but the object mask is missing"):
        _encoded(True, None)
    with pytest.raises(ValueError, match="has_object is False but the object mask is given"):
        _encoded(False, mask)

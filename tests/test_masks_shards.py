"""Mask selection, bit-packing, and the shard writer/reader."""

from __future__ import annotations

import fnmatch
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.masks import crop_boxes, mask_boxes, pack_masks, select_masks, unpack_masks
from pipeline.segmenters.base import Proposal
from pipeline.shards import ShardError, encode_sample, iter_samples, read_stats, write_shard
from schemas.manifest import SHARD_FILE, SHARD_TMP, ShardStats, shard_file, shard_glob, shard_stem
from schemas.shard import SampleRecord


def _mask(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_select_drops_degenerate_sorts_and_keeps_k() -> None:
    masks = np.stack([
        _mask(10, 10, 0, 2, 0, 2),  # 4 px
        _mask(10, 10, 0, 10, 5, 6),  # 1 px wide: degenerate
        _mask(10, 10, 0, 5, 0, 5),  # 25 px
        _mask(10, 10, 3, 4, 0, 9),  # 1 px tall: degenerate
        _mask(10, 10, 2, 5, 2, 5),  # 9 px
        np.zeros((10, 10), bool),  # empty
    ])
    chosen = select_masks(Proposal(masks, np.arange(6, dtype=np.float32)), k=2)
    assert chosen.areas.tolist() == [25, 9]
    assert chosen.scores.tolist() == [2.0, 4.0]
    assert chosen.boxes.tolist() == [[0, 0, 4, 4], [2, 2, 4, 4]]  # inclusive maxima
    assert len(select_masks(Proposal(masks, np.ones(6)), k=10).masks) == 3


def test_select_drops_masks_whose_box_covers_the_image() -> None:
    ring = ~_mask(10, 10, 1, 9, 1, 9)  # 36 px, its box the whole image
    masks = np.stack([ring, _mask(10, 10, 1, 9, 1, 9), _mask(10, 10, 2, 5, 2, 5)])  # 64 px (box 0.64), 9 px
    assert select_masks(Proposal(masks, np.ones(3)), k=2).areas.tolist() == [64, 36]
    assert select_masks(Proposal(masks, np.ones(3)), k=2, max_box_fraction=0.9).areas.tolist() == [64, 9]
    assert select_masks(Proposal(masks, np.ones(3)), k=2, max_box_fraction=0.64).areas.tolist() == [64, 9]
    assert select_masks(Proposal(masks, np.ones(3)), k=2, max_box_fraction=0.5).areas.tolist() == [9]
    whole = np.ones((1, 10, 10), bool)  # nothing else: the largest over the limit stays, the image keeps a mask
    assert select_masks(Proposal(np.concatenate([whole, ring[None]]), np.ones(2)), k=2,
                        max_box_fraction=0.5).areas.tolist() == [100]


def test_boxes_inclusive_and_crop_covers_box() -> None:
    m = _mask(20, 30, 5, 8, 10, 20)
    assert mask_boxes(m[None]).tolist() == [[10, 5, 19, 7]]
    image = np.zeros((20, 30, 3), np.uint8)
    image[5:8, 10:20] = 255  # exactly the box: the crop must be all white (no dropped row/column)
    (grown,) = crop_boxes(image, mask_boxes(m[None]).tolist(), 16)
    (shrunk,) = crop_boxes(image, mask_boxes(m[None]).tolist(), 2)
    assert grown.shape == (16, 16, 3) and grown.min() == 255 and shrunk.shape == (2, 2, 3) and shrunk.min() == 255


def test_pack_roundtrip_odd_width() -> None:
    masks = np.random.default_rng(0).random((3, 7, 13)) > 0.5
    packed = pack_masks(masks)
    assert packed.shape == (3, 7, 2) and packed.dtype == np.uint8
    assert np.array_equal(unpack_masks(packed, 13), masks)


def _sample(key: str, label: int = 1):
    image = np.full((12, 16, 3), 100, np.uint8)
    masks = np.stack([_mask(12, 16, 0, 6, 0, 8), _mask(12, 16, 6, 12, 8, 16)])
    chosen = select_masks(Proposal(masks, np.ones(2, np.float32)), k=4)
    record = SampleRecord(
        key=key, label=label, class_name="b", split="train", source_path=f"{key}.png", width=16, height=12,
        original_width=16, original_height=12, masks_per_image=4, n_masks=2, boxes=chosen.boxes.tolist(),
        areas=chosen.areas.tolist(), scores=[1.0, 1.0], crop_size=8,
    )
    return encode_sample(record, image, chosen, None, 90)


def _rows(keys):
    return [{"key": k, "shard": 0, "source_path": f"{k}.png", "label": 1, "class_name": "b", "split": "train",
             "status": "ok", "error_message": None, "width": 16, "height": 12, "original_width": 16,
             "original_height": 12, "n_masks": 2, "sample_bytes": 1} for k in keys]


def test_write_shard_reproducible_and_readable(tmp_path: Path) -> None:
    keys = ["0000001", "0000000"]
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    stats = write_shard(a, 0, [_sample(k) for k in keys], _rows(keys), "h", 1.0)
    write_shard(b, 0, [_sample(k) for k in reversed(keys)], _rows(list(reversed(keys))), "h", 2.0)
    assert (a / "_webdataset/train-00000.tar").read_bytes() == (b / "_webdataset/train-00000.tar").read_bytes()
    assert (a / "train-00000.parquet").read_bytes() == (b / "train-00000.parquet").read_bytes()
    assert stats.ok == 2 and stats.tar_members == 2 * 5 and read_stats(a, "train", 0) == stats
    assert (stats.split, stats.name) == ("train", "train-00000") and read_stats(a, "test", 0) is None
    assert not list(a.rglob(".*tmp"))
    with tarfile.open(a / "_webdataset/train-00000.tar") as tar:  # plain tar: sorted, adjacent members, fixed metadata
        names = tar.getnames()
        assert names[:5] == ["0000000.crop_00.jpg", "0000000.crop_01.jpg", "0000000.jpg",
                             "0000000.json", "0000000.masks.npy.gz"]
        assert {m.mtime for m in tar.getmembers()} == {946684800}
    samples = list(iter_samples(a / "_webdataset/train-00000.tar"))
    assert [k for k, _ in samples] == ["0000000", "0000001"]
    meta = json.loads(samples[0][1]["json"])
    assert meta["n_masks"] == 2 and meta["boxes"] == [[0, 0, 7, 5], [8, 6, 15, 11]]


def test_shard_file_names_one_place() -> None:
    assert [shard_file("train", 0, p) for p in ("tar", "parquet", "stats")] == [
        "_webdataset/train-00000.tar", "train-00000.parquet", "_job/train-00000_stats.json"]
    assert shard_file("test", 3, "tar", flat=True) == "test-00003.tar" and shard_stem("val", 12) == "val-00012"
    assert shard_file(None, 7, "tar", flat=True) == "00007.tar"  # format 3 directories
    flat = ShardStats(shard=3, name="test-00003", split="test", count=1, ok=1, failed=0, tar_members=3, tar_bytes=1,
                      tar_sha256="", parquet_sha256="", duration_s=0, config_hash="", format_version="5")
    assert [flat.file(p) for p in ("tar", "stats")] == ["test-00003.tar", "test-00003_stats.json"]  # formats 3-5
    assert flat.model_copy(update={"format_version": "6"}).file("tar") == "_webdataset/test-00003.tar"
    match = SHARD_FILE.match("test-00003_stats.json")
    assert match and match["split"] == "test" and int(match["shard"]) == 3
    assert SHARD_FILE.match("00003.parquet") and not SHARD_FILE.match("holdout-00003.tar")
    assert not SHARD_FILE.match("train-0003.tar") and not SHARD_FILE.match("train-00003.tar.tmp")
    assert SHARD_TMP.match(".train-00001.tar.1a2b3c4d.tmp") and not SHARD_TMP.match(".manifest.json.tmp")
    assert fnmatch.filter(["_webdataset/train-00000.tar", "_webdataset/test-00001.tar", "train-00000.parquet"],
                          shard_glob("train")) == ["_webdataset/train-00000.tar"]
    with pytest.raises(ValueError, match="holdout"):
        shard_file("holdout", 0, "tar")


def test_write_shard_refuses_two_splits(tmp_path: Path) -> None:
    rows = _rows(["0000000", "0000001"])
    rows[1]["split"] = "test"
    with pytest.raises(ValueError, match=r"shard 0: .*one split.*\['test', 'train'\]"):
        write_shard(tmp_path, 0, [_sample("0000000"), _sample("0000001")], rows, "h", 1.0)
    assert list(tmp_path.iterdir()) == []


def test_webdataset_library_reads_shard(tmp_path: Path) -> None:
    import webdataset as wds

    write_shard(tmp_path, 0, [_sample("0000000")], _rows(["0000000"]), "h", 1.0)
    ds = wds.WebDataset(str(tmp_path / "_webdataset/train-00000.tar"), shardshuffle=False).decode("rgb8")
    (sample,) = list(ds)
    assert sample["jpg"].shape == (12, 16, 3) and sample["crop_01.jpg"].shape == (8, 8, 3)
    assert sample["masks.npy.gz"].shape == (2, 12, 2) and sample["json"]["label"] == 1


def test_reader_refuses_traversal_member(tmp_path: Path) -> None:
    import io

    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("../../etc/x.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(ShardError, match=r"evil.tar: unexpected member '../../etc/x.json'"):
        list(iter_samples(path))


def test_reader_names_truncated_tar(tmp_path: Path) -> None:
    write_shard(tmp_path, 0, [_sample("0000000")], _rows(["0000000"]), "h", 1.0)
    data = (tmp_path / "_webdataset/train-00000.tar").read_bytes()
    (tmp_path / "_webdataset/train-00000.tar").write_bytes(data[: len(data) // 3])
    with pytest.raises(ShardError, match="train-00000.tar"):
        list(iter_samples(tmp_path / "_webdataset/train-00000.tar"))


def test_crop_members_only_when_crop_size_is_set() -> None:
    sample = _sample("0000000")
    without = encode_sample(SampleRecord.model_validate({**json.loads(sample.members["json"]), "crop_size": None}),
                            np.full((12, 16, 3), 100, np.uint8), select_masks(Proposal(
                                np.stack([_mask(12, 16, 0, 6, 0, 8), _mask(12, 16, 6, 12, 8, 16)]),
                                np.ones(2, np.float32)), k=4), None, 90, image_jpeg=b"\xff\xd8 the file")
    assert sorted(without.members) == ["jpg", "json", "masks.npy.gz"]
    assert without.members["jpg"] == b"\xff\xd8 the file"  # the input's own bytes, not re-encoded
    assert sorted(m for m in sample.members if m.startswith("crop_")) == ["crop_00.jpg", "crop_01.jpg"]


@pytest.mark.parametrize("cut", ["header", "member_boundary", "end_marker"])
def test_reader_names_tar_truncated_where_tarfile_stays_quiet(tmp_path: Path, cut: str) -> None:
    """Python's tarfile ends without error at a header cut short or missing; the reader must not."""
    write_shard(tmp_path, 0, [_sample("0000000")], _rows(["0000000"]), "h", 1.0)
    path = tmp_path / "_webdataset/train-00000.tar"
    with tarfile.open(path) as tar:
        offset = tar.getmembers()[2].offset  # the third member's header
        end = tar.offset
    data = path.read_bytes()
    path.write_bytes(data[: {"header": offset + 100, "member_boundary": offset, "end_marker": end + 512}[cut]])
    with pytest.raises(ShardError, match=r"train-00000.tar: unreadable tar: no end-of-archive marker .*\(truncated\)"):
        list(iter_samples(path))

"""The segmentation job end to end on local Ray: counts, verify, resume, config guard, bad inputs."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.job import JobError, run_segment
from pipeline.manifest import inspect, verify
from schemas.config import SegmentConfig
from schemas.manifest import CONFIG_FILE, JOB_FILE, MANIFEST, PLAN_FILE, SHARD_FILE, shard_file, shard_glob

pytestmark = pytest.mark.ray


def _shard_files(out: Path) -> dict[str, int]:
    """mtime of every shard file (tar, parquet, stats marker) in ``out``."""
    return {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in out.rglob("*") if SHARD_FILE.match(p.name)}


def _config(tmp_path: Path, **kw) -> SegmentConfig:
    base = dict(
        source="synthetic", root=tmp_path / "synth", out=tmp_path / "shards", shard_size=8, crop_size=32,
        masks_per_image=4, num_workers=2, cpus_per_worker=0.5,
        synthetic={"num_classes": 2, "train_per_class": 6, "test_per_class": 3, "image_size": 64},
    )
    base.update(kw)
    return SegmentConfig.model_validate(base)


def test_synthetic_job_resume_and_guard(ray_local, tmp_path: Path) -> None:
    config = _config(tmp_path)
    card = run_segment(config, progress=False)
    assert card.counts == {"inputs": 18, "ok": 18, "failed": 0}
    # 12 train inputs in shards 0-1, then 6 test inputs in shard 2: a shard holds one split
    assert [(s.name, s.split, s.count) for s in card.shards] == [
        ("train-00000", "train", 8), ("train-00001", "train", 4), ("test-00002", "test", 6)]
    assert card.shuffle_seed == 0 and card.format_version == "6"
    assert card.per_split == {"test": {"ok": 6, "failed": 0}, "train": {"ok": 12, "failed": 0}}
    assert sum(card.masks_hist.values()) == 18 and max(card.masks_hist) <= 4
    assert verify(config.out.local) == []
    summary = inspect(config.out.local)
    assert summary["samples"]["ok"] == 18 and summary["segmenter"]["name"] == "superpixel"
    (sample,) = [m for m in tarfile.open(config.out.local / "_webdataset/train-00000.tar").getnames()
                 if m == "000000.json"]
    assert (config.out.local / CONFIG_FILE).is_file() and (config.out.local / PLAN_FILE).is_file()
    # the folder is one parquet dataset (one row per input) and _webdataset/ holds the tars only
    assert sorted(p.name for p in config.out.local.iterdir() if not p.name.startswith("_")) == [
        "test-00002.parquet", "train-00000.parquet", "train-00001.parquet"]
    assert sorted(p.name for p in (config.out.local / "_webdataset").iterdir()) == [
        "test-00002.tar", "train-00000.tar", "train-00001.tar"]

    before = _shard_files(config.out.local)
    assert len(before) == 9
    card2 = run_segment(config, progress=False)  # everything finished: no shard is rewritten
    assert card2.counts == card.counts
    assert _shard_files(config.out.local) == before

    other = _config(tmp_path, masks_per_image=3)
    with pytest.raises(JobError, match="different configuration"):
        run_segment(other, progress=False)
    with pytest.raises(JobError, match="different configuration"):  # another seed is another plan
        run_segment(_config(tmp_path, shuffle_seed=1), progress=False)
    assert _shard_files(config.out.local) == before


def test_rerun_redoes_only_unfinished_shards_with_identical_bytes(ray_local, tmp_path: Path) -> None:
    config = _config(tmp_path)
    run_segment(config, progress=False)
    reference = {p.name: p.read_bytes() for p in config.out.local.glob("_webdataset/*.tar")}
    # simulate a crash: shard 1 never got its marker and left a temp file; shard 2 is gone
    (config.out.local / "_job/train-00001_stats.json").unlink()
    (config.out.local / "_webdataset/.train-00001.tar.dead.tmp").write_bytes(b"partial")
    (config.out.local / "notes").mkdir()
    (config.out.local / "notes/.train-00001.tar.mine.tmp").write_bytes(b"not ours")  # another folder: kept
    for name in ("_webdataset/test-00002.tar", "test-00002.parquet", "_job/test-00002_stats.json", MANIFEST):
        (config.out.local / name).unlink()
    kept = (config.out.local / "_job/train-00000_stats.json").stat().st_mtime_ns
    run_segment(config, progress=False)
    assert (config.out.local / "_job/train-00000_stats.json").stat().st_mtime_ns == kept
    assert not (config.out.local / "_webdataset/.train-00001.tar.dead.tmp").exists()
    assert (config.out.local / "notes/.train-00001.tar.mine.tmp").read_bytes() == b"not ours"
    assert {p.name: p.read_bytes() for p in config.out.local.glob("_webdataset/*.tar")} == reference
    assert verify(config.out.local) == []


def test_grid_segmenter_and_overwrite(ray_local, tmp_path: Path) -> None:
    card = run_segment(_config(tmp_path), progress=False)
    out = tmp_path / "shards"
    # the layout of formats 3-5: every file at the top (the plan and job hash stay in _job/, as in format 5)
    for stats in card.shards:
        for part in ("tar", "stats"):
            (out / stats.file(part)).rename(out / shard_file(stats.split, stats.shard, part, flat=True))
    (out / MANIFEST).rename(out / "manifest.json")
    (out / CONFIG_FILE).rename(out / "segment_config.yaml")
    (out / JOB_FILE).write_text('{"job_hash": "of format 5"}')  # FORMAT_VERSION is part of the job hash
    (out / "notes.txt").write_text("kept")
    with pytest.raises(JobError, match="different configuration"):
        run_segment(_config(tmp_path), progress=False)
    card = run_segment(_config(tmp_path, segmenter={"name": "grid", "grid": 2}, overwrite=True), progress=False)
    assert card.segmenter.name == "grid" and card.masks_hist == {4: 18}
    assert sorted(p.name for p in out.iterdir()) == ["_job", MANIFEST, "_webdataset", "notes.txt", "test-00002.parquet",
                                                     "train-00000.parquet", "train-00001.parquet"]
    assert verify(out) == []


def test_nested_masks_and_box_limit_are_recorded(ray_local, tmp_path: Path) -> None:
    """segmenter.merge_levels and max_box_fraction: recorded in the manifest, shown by inspect, and no stored box
    covers more than the limit (but in an image left with its largest mask only)."""
    import json

    from pipeline.manifest import format_inspect

    config = _config(tmp_path, max_box_fraction=0.5, segmenter={"merge_levels": [60.0]})
    card = run_segment(config, progress=False)
    assert card.max_box_fraction == 0.5 and card.segmenter.params["merge_levels"] == [60.0]
    assert "K=4  boxes up to 50% of the image" in format_inspect(inspect(config.out.local))
    for tar in config.out.local.glob("_webdataset/*.tar"):
        with tarfile.open(tar) as f:
            for member in (m for m in f.getmembers() if m.name.endswith(".json")):
                record = json.loads(f.extractfile(member).read())
                shares = [(x1 - x0 + 1) * (y1 - y0 + 1) / (record["width"] * record["height"])
                          for x0, y0, x1, y1 in record["boxes"]]
                assert max(shares) <= 0.5 or len(shares) == 1, (tar.name, member.name, shares)
    assert verify(config.out.local) == []


def _bad_inputs(root: Path) -> None:
    rng = np.random.default_rng(0)
    d = root / "cls"
    d.mkdir(parents=True)
    photo = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    photo.save(d / "good.jpg")
    photo.convert("L").save(d / "gray.png")
    photo.convert("CMYK").save(d / "cmyk.jpg")
    photo.convert("RGBA").save(d / "rgba.png")
    Image.fromarray((rng.random((40, 60)) * 65535).astype(np.uint16)).save(d / "deep16.png")
    Image.new("RGB", (1, 1)).save(d / "tiny.png")
    Image.new("RGB", (3000, 2000), (20, 40, 60)).save(d / "huge.png")
    (d / "empty.jpg").write_bytes(b"")
    (d / "notimage.png").write_text("just text")
    buf = io.BytesIO()
    photo.save(buf, "JPEG")
    (d / "truncated.jpg").write_bytes(buf.getvalue()[:200])


def test_bad_inputs_become_rows_not_crashes(ray_local, tmp_path: Path) -> None:
    _bad_inputs(tmp_path / "imgs")
    config = _config(tmp_path, source="imagefolder", root=tmp_path / "imgs", max_side=256, shard_size=4)
    card = run_segment(config, progress=False)
    assert card.counts["inputs"] == 10
    # no split folders: 2 of the class's 10 inputs go to test (test_fraction 0.2), the rest to train
    assert [(s.split, s.count) for s in card.shards] == [("train", 4), ("train", 4), ("test", 2)]
    rows = {r["source_path"].split("/")[-1]: r for p in sorted(config.out.local.glob(shard_glob(part="parquet")))
            for r in pq.read_table(p).to_pylist()}
    assert len(rows) == 10
    ok = {n for n, r in rows.items() if r["status"] == "ok"}
    assert ok == {"good.jpg", "gray.png", "cmyk.jpg", "rgba.png", "deep16.png", "huge.png"}
    assert rows["empty.jpg"]["error_message"] == "empty file (0 bytes)"
    assert "not an image" in rows["notimage.png"]["error_message"]
    assert "corrupt" in rows["truncated.jpg"]["error_message"]
    assert "no mask" in rows["tiny.png"]["error_message"]
    assert rows["huge.png"]["width"] == 256 and rows["huge.png"]["original_width"] == 3000
    assert verify(config.out.local) == []


def test_cub_mini_two_workers(ray_local, cub_mini: Path, tmp_path: Path) -> None:
    config = SegmentConfig(source="cub", root=cub_mini, out=tmp_path / "cub", shard_size=16, crop_size=64,
                           masks_per_image=6, num_workers=2, cpus_per_worker=0.5)
    card = run_segment(config, progress=False)
    assert card.counts == {"inputs": 60, "ok": 60, "failed": 0}
    assert card.per_split == {"test": {"ok": 24, "failed": 0}, "train": {"ok": 36, "failed": 0}}
    assert all(v == {"test": 4, "train": 6} for v in card.per_class.values())
    assert verify(config.out.local) == []
    import subprocess

    # 36 train inputs in shards 0-2, 24 test inputs in shards 3-4, each shard mixing classes
    assert [(s.name, s.count) for s in card.shards] == [
        ("train-00000", 16), ("train-00001", 16), ("train-00002", 4), ("test-00003", 16), ("test-00004", 8)]
    listed = subprocess.run(["tar", "-tf", str(config.out.local / "_webdataset/train-00000.tar")],
                            capture_output=True, text=True, check=True)
    names = listed.stdout.split()
    assert len({n.split(".")[0] for n in names}) == 16 and sum(n.endswith(".json") for n in names) == 16
    assert card.shards[0].tar_members == len(names)
    before = _shard_files(config.out.local)
    assert run_segment(config, progress=False).counts == card.counts  # second run: no segmentation work
    assert _shard_files(config.out.local) == before
    import webdataset as wds

    for split, urls, n in (("train", "_webdataset/train-{00000..00002}.tar", 36),
                           ("test", "_webdataset/test-{00003..00004}.tar", 24)):
        samples = list(wds.WebDataset(str(config.out.local / urls), shardshuffle=False).decode("rgb8"))
        assert len(samples) == n and all(s["crop_00.jpg"].shape == (64, 64, 3) for s in samples)
        assert {s["json"]["split"] for s in samples} == {split}
        assert all(s["json"]["source_path"].startswith("CUB_200_2011/images/") for s in samples)
    assert len({r["class_name"] for r in pq.read_table(config.out.local / "train-00000.parquet").to_pylist()}) >= 4


@pytest.mark.parametrize("problem", ["missing", "wrong model type"])
def test_bad_checkpoint_fails_before_ray_and_writes_nothing(tmp_path: Path, problem: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing or mismatched SAM checkpoint is found on the driver: one error naming the file and what was
    expected, Ray never started, nothing in --out."""
    import torch

    import pipeline.job

    def no_ray(address: str | None) -> None:
        raise AssertionError("Ray was started")

    monkeypatch.setattr(pipeline.job, "init_ray", no_ray)

    from pipeline.segmenters.sam import build_tiny_sam

    ckpt = tmp_path / "sam_vit_h.pth"
    if problem == "wrong model type":
        torch.save(build_tiny_sam().state_dict(), ckpt)
    config = SegmentConfig(source="synthetic", root=tmp_path / "syn", out=tmp_path / "out",
                           segmenter={"name": "sam", "checkpoint": ckpt})
    expected = "no such file" if problem == "missing" else "is not a SAM vit_h checkpoint"
    with pytest.raises(JobError, match=f"{ckpt}.*{expected}"):
        run_segment(config, progress=False)
    assert not config.out.local.exists()

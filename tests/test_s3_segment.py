"""``protomask segment`` with its root, output or listing on S3 (moto's server in this process, see conftest): the
same rows and bytes as a local job, resume, ``--overwrite`` beside foreign objects, and writes the server refuses.
Every PUT the server takes is recorded by patching moto's ``S3Backend.put_object``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.job import JobError, run_segment
from pipeline.manifest import read_rows, verify
from pipeline.sources import SourceError, SourceListing, list_source
from pipeline.sources.base import inside_root
from pipeline.sources.synthetic import generate
from schemas.config import SegmentConfig, SyntheticConfig
from schemas.manifest import SHARD_FILE
from schemas.storage import Location, delete, list_files, put, read_bytes

SYNTHETIC = {"num_classes": 2, "train_per_class": 4, "test_per_class": 2, "image_size": 48}
# 12 inputs in shards of 4: train-00000, train-00001, test-00002
SHARDS = [f"{folder}{stem}{suffix}" for stem in ("train-00000", "train-00001", "test-00002")
          for folder, suffix in (("_webdataset/", ".tar"), ("", ".parquet"), ("_job/", "_stats.json"))]
JOB_FILES = ["_job/job.json", "_job/plan.parquet", "_job/segment_config.yaml", "_manifest.json"]


def _config(root: Location | Path, out: Location | Path, **kw) -> SegmentConfig:
    return SegmentConfig.model_validate({
        "source": "synthetic", "root": root, "out": out, "shard_size": 4, "masks_per_image": 3,
        "segmenter": {"name": "grid", "grid": 2}, "num_workers": 2, "cpus_per_worker": 0.5, "synthetic": SYNTHETIC,
        **kw,
    })


def _upload(folder: Path, prefix: Location) -> Location:
    for name in list_files(Location.parse(folder)):
        put(prefix / name, (folder / name).read_bytes())
    return prefix


def _key(loc: Location) -> str:
    return loc.fs_path.partition("/")[2]


@pytest.fixture
def puts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The key of every object the test server takes from now on, in order."""
    from moto.s3.models import S3Backend

    keys: list[str] = []
    real = S3Backend.put_object

    def recording(self, bucket_name: str, key_name: str, *args, **kwargs):  # noqa: ANN202 - moto's own
        keys.append(key_name)
        return real(self, bucket_name, key_name, *args, **kwargs)

    monkeypatch.setattr(S3Backend, "put_object", recording)
    return keys


def _shard_puts(keys: list[str], out: Location) -> list[str]:
    """The shard files among ``keys``, named relative to ``out``, sorted."""
    names = [k.removeprefix(_key(out) + "/") for k in keys]
    return sorted(n for n in names if SHARD_FILE.match(n.rpartition("/")[2]))


def test_inside_root_below_a_url_is_pure_posix() -> None:
    root = Location.parse("s3://bkt/data")
    assert inside_root(root, "cls/a/../b.png", "w") == Location("s3://bkt/data/cls/b.png")
    assert inside_root(root, "./x//y.png", "w") == Location("s3://bkt/data/x/y.png")
    for bad in ("../escape.png", "/etc/passwd", "sub/../../x.png"):
        with pytest.raises(SourceError, match=f"w: path {bad!r} resolves outside the root s3://bkt/data"):
            inside_root(root, bad, "w")


def _photo(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def test_sources_on_s3_list_as_the_local_ones(bucket: str, tmp_path: Path) -> None:
    """imagefolder (split folders, a non-image file), listing (CSV on S3) and CUB (with segmentations and parts)
    read from an uploaded copy list exactly the items of the local folder."""
    local = tmp_path / "data"
    for i, rel in enumerate(["train/cat/1.png", "train/dog/sub/2.jpg", "test/cat/3.png", "val/dog/4.png"]):
        _photo(local / "folder" / rel, i)
    (local / "folder/train/dog/notes.txt").write_text("not an image")
    (local / "list.csv").write_text("path,label,split\nfolder/train/cat/1.png,cat,train\n"
                                    "folder/test/cat/../cat/3.png,cat,\nfolder/val/dog/4.png,dog,test\n")
    cub = local / "cub"
    for i, name in enumerate(("a", "b")):
        _photo(cub / f"CUB_200_2011/images/001.A/{name}.jpg", i)
    for name, text in {"images.txt": "1 001.A/a.jpg\n2 001.A/b.jpg\n", "image_class_labels.txt": "1 1\n2 1\n",
                       "train_test_split.txt": "1 1\n2 0\n", "classes.txt": "1 001.A\n",
                       "parts/parts.txt": "1 back\n", "parts/part_locs.txt": "1 1 3.0 4.0 1\n2 1 0 0 0\n"}.items():
        (cub / "CUB_200_2011" / name).parent.mkdir(parents=True, exist_ok=True)
        (cub / "CUB_200_2011" / name).write_text(text)
    (cub / "segmentations/001.A").mkdir(parents=True)
    Image.new("L", (16, 12), 255).save(cub / "segmentations/001.A/a.png")  # b has none
    remote = _upload(local, Location.parse(bucket) / "data")

    def listed(base: Location, source: str, root: str, listing: str | None = None) -> SourceListing:
        return list_source(SegmentConfig(source=source, root=base / root if root else base, out=tmp_path / "out",
                                         listing=base / listing if listing else None))

    for args in (("imagefolder", "folder"), ("listing", "", "list.csv"), ("cub", "cub")):
        want = listed(Location.parse(local), *args)
        assert listed(remote, *args) == want and len(want.items) >= 2, args
    cub_items = listed(remote, "cub", "cub").items
    assert [i.object_path for i in cub_items] == ["segmentations/001.A/a.png", None]
    assert cub_items[0].extra["parts"] == [[1.0, 3.0, 4.0]]
    with pytest.raises(SourceError, match=f"{remote / 'nothing'}: source root is not a directory"):
        list_source(SegmentConfig(source="imagefolder", root=remote / "nothing", out=tmp_path / "out"))


def test_synthetic_dataset_generated_on_s3_is_the_local_one(bucket: str, tmp_path: Path) -> None:
    config = SyntheticConfig(**SYNTHETIC)
    local, remote = Location.parse(tmp_path / "synth"), Location.parse(bucket) / "synth"
    generate(local, config)
    generate(remote, config)
    files = list_files(local)
    assert list_files(remote) == files and len(files) == 12 * 3 + 1
    assert all(read_bytes(remote / name) == read_bytes(local / name) for name in files)
    objects = sorted(n for n in files if n.startswith("objects/"))
    delete(remote / objects[0])  # a root from before object maps: the missing one is derived again
    generate(remote, config)
    assert read_bytes(remote / objects[0]) == read_bytes(local / objects[0])


@pytest.mark.ray
def test_segment_to_s3_verifies_and_a_rerun_writes_only_unfinished_shards(
        ray_local, bucket: str, tmp_path: Path, puts: list[str], capsys: pytest.CaptureFixture) -> None:
    from protomask.cli import main

    out = Location.parse(bucket) / "shards"
    config = _config(tmp_path / "synth", out)
    card = run_segment(config, progress=False)
    assert card.counts == {"inputs": 12, "ok": 12, "failed": 0} and verify(out) == []
    assert main(["manifest", "verify", "--shards", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"{out}: OK"
    assert sorted(list_files(out)) == sorted(SHARDS + JOB_FILES)
    assert _shard_puts(puts, out) == sorted(SHARDS)  # one PUT per file: nothing written twice
    for stats in card.shards:  # the marker last
        order = [puts.index(_key(out / stats.file(part))) for part in ("tar", "parquet", "stats")]
        assert order == sorted(order)

    puts.clear()
    assert run_segment(config, progress=False).shards == card.shards
    assert sorted(puts) == sorted(_key(out / name) for name in ("_job/segment_config.yaml", "_job/job.json",
                                                                 "_manifest.json"))
    # a tar and parquet without their marker (a job killed before it); a marker whose tar is cut short
    delete(out / "_job/train-00001_stats.json")
    tar = read_bytes(out / "_webdataset/test-00002.tar")
    put(out / "_webdataset/test-00002.tar", tar[: len(tar) // 2])
    puts.clear()
    again = run_segment(config, progress=False)
    assert _shard_puts(puts, out) == sorted(n for n in SHARDS if "train-00001" in n or "test-00002" in n)
    assert [s.tar_sha256 for s in again.shards] == [s.tar_sha256 for s in card.shards] and verify(out) == []


@pytest.mark.ray
def test_overwrite_on_s3_deletes_only_this_tools_objects(ray_local, bucket: str, tmp_path: Path) -> None:
    out = Location.parse(bucket) / "shards"
    run_segment(_config(tmp_path / "synth", out, shard_size=2), progress=False)  # 6 shards
    foreign = {name: name.encode() for name in (
        "notes.txt", "sub/train-00000.tar", ".cache/x.tmp", "_jobs/plan.parquet", "_manifest.json.bak",
        "webdataset/train-00000.tar")}
    for name, data in foreign.items():
        put(out / name, data)
    beside = Location.parse(bucket) / "shards-old/train-00000.tar"  # the same key prefix, another folder
    put(beside, b"kept")
    with pytest.raises(JobError, match="different configuration"):
        run_segment(_config(tmp_path / "synth", out), progress=False)
    card = run_segment(_config(tmp_path / "synth", out, overwrite=True), progress=False)
    assert [s.name for s in card.shards] == ["train-00000", "train-00001", "test-00002"]
    assert sorted(list_files(out)) == sorted([*SHARDS, *JOB_FILES, *foreign])  # shards 3-5 of the first run: gone
    assert {name: read_bytes(out / name) for name in foreign} == foreign and read_bytes(beside) == b"kept"
    assert verify(out) == []


@pytest.mark.ray
def test_s3_to_s3_gives_the_rows_and_bytes_of_local_to_local(ray_local, bucket: str, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    """The synthetic root (images, part maps, object maps) generated locally and uploaded; the S3 job runs from the
    command line."""
    from protomask.cli import main

    local = _config(tmp_path / "synth", tmp_path / "shards")
    local_card = run_segment(local, progress=False)
    root = _upload(tmp_path / "synth", Location.parse(bucket) / "in/synth")
    out = Location.parse(bucket) / "out/shards"
    file = tmp_path / "segment.yaml"
    file.write_text(json.dumps({"synthetic": SYNTHETIC, "segmenter": {"name": "grid", "grid": 2}}))
    assert main(["segment", "--config", str(file), "--root", str(root), "--out", str(out), "--shard-size", "4",
                 "--masks-per-image", "3", "--num-workers", "2", "--cpus-per-worker", "0.5", "--no-progress"]) == 0
    assert "12 ok, 0 failed, 12 inputs" in capsys.readouterr().out
    card = json.loads(read_bytes(out / "_manifest.json"))

    def sums(shards: list[dict]) -> list[tuple]:
        return [(s["name"], s["tar_bytes"], s["tar_sha256"], s["parquet_sha256"]) for s in shards]

    assert sums(card["shards"]) == sums([s.model_dump() for s in local_card.shards])
    assert read_rows(out, local_card.shards).equals(read_rows(tmp_path / "shards", local_card.shards))
    assert verify(out) == []


@pytest.mark.ray
def test_refused_writes_fail_the_job_naming_the_shards_and_keep_the_finished_ones(
        ray_local, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, puts: list[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """The server refuses every write after the first shard's marker (403, as a revoked permission): the job
    fails naming the refused shards and saying the finished one is kept; a rerun writes only the others."""
    from moto.s3.exceptions import S3AccessDeniedError
    from moto.s3.models import S3Backend

    out = Location.parse(bucket) / "shards"
    config = _config(tmp_path / "synth", out, num_workers=1, max_shard_retries=0)
    recording = S3Backend.put_object

    def refusing(self, bucket_name: str, key_name: str, *args, **kwargs):  # noqa: ANN202 - moto's own
        if any(key.endswith("_stats.json") for key in puts):
            raise S3AccessDeniedError()
        return recording(self, bucket_name, key_name, *args, **kwargs)

    monkeypatch.setattr(S3Backend, "put_object", refusing)
    with caplog.at_level(logging.WARNING, logger="protomask.segment"):
        with pytest.raises(JobError, match=(r"shards \['train-00001', 'test-00002'\] failed after 0 retries; 1 "
                                            rf"finished shards are kept in {out}; rerun the same command")):
            run_segment(config, progress=False)
    assert any(f"{out / '_webdataset/train-00001.tar'}" in r.getMessage() and "ACCESS_DENIED" in r.getMessage()
               for r in caplog.records)
    assert sorted(list_files(out)) == sorted(SHARDS[:3] + JOB_FILES[:3])

    monkeypatch.setattr(S3Backend, "put_object", recording)
    puts.clear()
    card = run_segment(config, progress=False)
    assert card.counts["ok"] == 12 and verify(out) == []
    assert _shard_puts(puts, out) == sorted(SHARDS[3:])

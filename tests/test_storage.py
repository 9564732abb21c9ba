"""Locations and object storage: paths and s3:// URLs, whole-object writes, the read-ahead reader, and shard
directories read from a real S3 endpoint (moto's server on 127.0.0.1, see conftest)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import segment_without_ray
from pipeline.manifest import inspect, load_card, shard_problems, verify
from pipeline.shards import ShardError, iter_samples
from schemas.config import DataConfig, ManifestConfig, SegmentConfig, TrainConfig, load_config
from schemas.storage import (Location, ReadAhead, delete, is_dir, list_files, open_read, put, read_bytes, read_text,
                             sha256, size)
from training.data import ShardDataset, ShardStream, split_keys
from training.explain import read_samples

K = 4


def test_location_parse_join_and_str() -> None:
    url = Location.parse("s3://bkt/shards/cub/")
    assert str(url) == "s3://bkt/shards/cub" and not url.is_local and url.fs_path == "bkt/shards/cub"
    assert url / "_job/plan.parquet" == Location("s3://bkt/shards/cub/_job/plan.parquet")
    assert (url.name, url.parent) == ("cub", Location("s3://bkt/shards"))
    assert url.parent.parent.parent == Location("s3://bkt")  # a bucket is its own parent
    assert Location.parse("s3://bkt").name == "" and Location.parse(url) is url and url.resolve() is url
    local = Location.parse(Path("rel/shards"))
    assert local == Location.parse("rel/shards/") and str(local) == "rel/shards" and local.is_local
    assert local.local == Path("rel/shards") and str(local / "a.tar") == str(Path("rel/shards/a.tar"))
    assert (local.name, local.parent) == ("shards", Location("rel"))
    assert local.resolve().local == Path.cwd() / "rel/shards"
    for part in ("../x", "/etc/passwd", "a//b", "", "./a"):
        with pytest.raises(ValueError, match="relative path"):
            url / part
        with pytest.raises(ValueError, match="relative path"):
            local / part
    for bad, message in [("gs://bkt/x", "unsupported scheme 'gs'"), ("s3://", "no bucket"), ("s3:///x", "no bucket"),
                         ("s3://bkt/a/../b", "relative path"), (3, "got int")]:
        with pytest.raises(ValueError, match=message):
            Location.parse(bad)
    with pytest.raises(TypeError):
        os.fspath(url)  # no __fspath__: open(url) fails instead of creating a folder "s3:"
    with pytest.raises(ValueError, match="s3://bkt/shards/cub: not a local path"):
        url.local


def test_config_fields_take_urls_and_keep_local_paths_as_they_were(tmp_path: Path) -> None:
    from protomask.cli import build_parser
    from protomask.flags import overrides

    train = TrainConfig(shards="s3://bkt/shards/", run_dir="runs/r1")
    assert train.shards == Location("s3://bkt/shards") and train.model_dump(mode="json")["shards"] == "s3://bkt/shards"
    local = TrainConfig(shards=Path("/data/shards/cub"), run_dir=Path("runs/r1"))
    assert '"shards":"/data/shards/cub","run_dir":"runs/r1"' in local.model_dump_json()
    file = tmp_path / "train.yaml"
    file.write_text(f"shards: {local.shards}\nrun_dir: runs/r1\n")
    assert load_config(TrainConfig, file, {}) == local
    args = build_parser().parse_args(["manifest", "verify", "--shards", "s3://bkt/shards"])
    assert load_config(ManifestConfig, None, overrides(args, args.dests)).shards == Location("s3://bkt/shards")


def test_output_hash_unchanged() -> None:
    """Golden values (format 6; the format version is part of the hash): a path given as a URL-capable field
    hashes as the plain path did, so shard directories keep their job hash."""
    listing = SegmentConfig(source="listing", root=Path("/data/imgs"), out=Path("out/shards"),
                            listing=Path("lists/all.csv"))
    assert listing.output_hash() == "b488e184584b2101"
    assert SegmentConfig(root=Path("synth"), out=Path("shards")).output_hash() == "4335d578d8d86e38"


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Location:
    """An empty folder: a local one, or a prefix of a new bucket."""
    if request.param == "local":
        return Location.parse(tmp_path)
    return Location.parse(request.getfixturevalue("bucket")) / "some/prefix"


def test_put_read_list_delete(root: Location) -> None:
    put(root / "a.bin", b"\x00\x01")
    put(root / "b.txt", "héllo")
    if root.is_local:
        (root.local / "sub").mkdir()  # a local write needs its folder; S3 has none
    put(root / "sub" / "c.json", lambda f: f.write(b"{}"))
    assert read_bytes(root / "a.bin") == b"\x00\x01" and read_text(root / "b.txt") == "héllo"
    assert list_files(root) == {"a.bin": 2, "b.txt": 6, "sub/c.json": 2}
    assert (size(root / "b.txt"), size(root / "nothing"), size(root / "sub")) == (6, None, None)
    assert is_dir(root / "sub") and not is_dir(root / "a.bin") and not is_dir(root / "nothing")
    assert sha256(root / "b.txt") == hashlib.sha256("héllo".encode()).hexdigest()
    delete(root / "a.bin")
    assert size(root / "a.bin") is None and sorted(list_files(root)) == ["b.txt", "sub/c.json"]
    with pytest.raises(FileNotFoundError, match=str(root / "a.bin")):
        read_bytes(root / "a.bin")
    with pytest.raises(FileNotFoundError, match=str(root / "a.bin")):
        delete(root / "a.bin")
    with pytest.raises(FileNotFoundError, match=str(root / "a.bin")):
        open_read(root / "a.bin")
    assert list_files(root / "nothing") == {}


def test_a_raising_payload_leaves_no_object(root: Location) -> None:
    def half_then_fail(f) -> None:
        f.write(b"partial")
        raise RuntimeError("encoder failed")

    with pytest.raises(RuntimeError, match="encoder failed"):
        put(root / "new.tar", half_then_fail)
    put(root / "old.tar", b"whole")
    with pytest.raises(RuntimeError, match="encoder failed"):
        put(root / "old.tar", half_then_fail)
    assert list_files(root) == {"old.tar": 5} and read_bytes(root / "old.tar") == b"whole"


def _read_ahead_threads() -> int:
    return sum(t.name.startswith("read-ahead ") for t in threading.enumerate())


def test_read_ahead_reader_on_s3(bucket: str) -> None:
    data = np.random.default_rng(0).bytes(300_000)
    loc = Location.parse(bucket) / "blob"
    put(loc, data)
    threads = _read_ahead_threads()
    with open_read(loc, chunk=16_384, depth=2) as f:
        got = b"".join(iter(lambda: f.read(7_001), b""))  # pieces that straddle the chunks
    assert got == data and sha256(loc) == hashlib.sha256(data).hexdigest()
    f = open_read(loc, chunk=16_384, depth=2)  # a consumer that stops early: the thread stops
    assert f.read(10) == data[:10]
    f.close()
    assert _read_ahead_threads() == threads


class _Failing(io.RawIOBase):
    """Gives ``good`` bytes, then raises: a connection dropped mid-object."""

    def __init__(self, good: bytes) -> None:
        super().__init__()
        self._data = io.BytesIO(good)

    def read(self, n: int = -1) -> bytes:
        if block := self._data.read(n):
            return block
        raise OSError("connection reset by peer")


def test_read_ahead_reader_raises_where_the_stream_failed() -> None:
    threads = _read_ahead_threads()
    raw = ReadAhead(_Failing(b"x" * 10), "s3://bkt/obj", chunk=4, depth=1)
    assert raw.read(4) == b"xxxx" and raw.read(4) == b"xxxx" and raw.read(4) == b"xx"
    for _ in range(2):  # again on every later read: never a quiet end of file
        with pytest.raises(OSError, match="connection reset"):
            raw.read(4)
    raw.close()
    assert _read_ahead_threads() == threads and raw.closed


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """18 synthetic images (3 classes x 4 train + 2 test) in shards of 4, segmented locally without Ray."""
    tmp = tmp_path_factory.mktemp("storage")
    config = SegmentConfig.model_validate(dict(
        source="synthetic", root=tmp / "synth", out=tmp / "shards", shard_size=4, masks_per_image=K,
        segmenter={"name": "grid", "grid": 2},
        synthetic={"num_classes": 3, "train_per_class": 4, "test_per_class": 2, "image_size": 48},
    ))
    return segment_without_ray(config)


def _upload(folder: Path, bucket: str) -> Location:
    prefix = Location.parse(bucket) / "shards/synthetic"
    for name in list_files(Location.parse(folder)):
        put(prefix / name, (folder / name).read_bytes())
    return prefix


def _batches(dataset: ShardDataset, keys: list[str], train: bool) -> list[dict]:
    stream = ShardStream(dataset, keys, DataConfig(loader_threads=1, shuffle_buffer=4), input_size=16, batch_size=3,
                         train=train, seed=5)
    stream.set_epoch(1)
    return list(stream)


def test_shard_directory_on_s3_reads_as_the_local_one(shards: Path, bucket: str, capsys) -> None:
    from protomask.cli import main

    url = _upload(shards, bucket)
    assert list_files(url) == list_files(Location.parse(shards))
    assert {**inspect(url), "directory": None} == {**inspect(shards), "directory": None}
    assert inspect(url)["directory"] == str(url)
    assert verify(url) == [] and shard_problems(url, load_card(url)) == []
    assert main(["manifest", "verify", "--shards", str(url)]) == 0
    assert capsys.readouterr().out.strip() == f"{url}: OK"
    assert main(["manifest", "inspect", "--shards", str(url), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["per_split"] == inspect(shards)["per_split"]

    local, remote = ShardDataset.open(shards), ShardDataset.open(url)
    assert remote.rows == local.rows and remote.tar_path(0) == url / "_webdataset/train-00000.tar"
    digest = hashlib.sha256()
    assert list(iter_samples(remote.tar_path(0), digest)) == list(iter_samples(local.tar_path(0)))
    assert digest.hexdigest() == remote.card.shards[0].tar_sha256
    keys = split_keys(local, 0.25, 0)
    for split, train in (("train", True), ("test", False)):
        want, got = _batches(local, keys[split], train), _batches(remote, keys[split], train)
        assert [b["key"] for b in got] == [b["key"] for b in want] and len(got) > 1
        assert all(torch.equal(g["crops"], w["crops"]) and torch.equal(g["valid"], w["valid"])
                   for g, w in zip(got, want))
    assert list(read_samples(remote, keys["test"][:2])) == list(read_samples(local, keys["test"][:2]))


def test_truncated_or_missing_tar_on_s3_is_named(shards: Path, bucket: str) -> None:
    url = _upload(shards, bucket)
    tar = url / "_webdataset/train-00000.tar"
    data = read_bytes(tar)
    put(tar, data[: len(data) // 2])
    delete(url / "_webdataset/test-00004.tar")
    problems = verify(url)
    assert any(p.startswith(f"shard train-00000: {tar}: unreadable tar: ") for p in problems)
    assert f"shard test-00004: {url / '_webdataset/test-00004.tar'} is missing" in problems and len(problems) == 2
    assert [p.split(":")[0] for p in shard_problems(url, load_card(url))] == ["shard train-00000", "shard test-00004"]
    with pytest.raises(ShardError, match=f"{tar}: {len(data) // 2} bytes, the manifest says {len(data)}"):
        ShardDataset.open(url)
    with pytest.raises(ShardError, match=f"{url / 'nothing/_manifest.json'}: no manifest"):
        load_card(url / "nothing")

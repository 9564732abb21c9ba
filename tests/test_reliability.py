"""Fault injection: lost nodes, killed drivers, corrupt or inconsistent shards, full disks.
(Training-worker loss: tests/test_training.py::test_killed_worker_resumes_from_checkpoint.)"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import segment_without_ray

from pipeline.job import JobError, run_segment
from pipeline.manifest import MANIFEST, verify
from pipeline.shards import ShardError
from schemas.config import SegmentConfig
from training.data import ShardDataset

REPO = Path(__file__).resolve().parents[1]
SYNTH = {"num_classes": 2, "train_per_class": 8, "test_per_class": 4, "image_size": 64}


def _config(tmp: Path, **kw) -> SegmentConfig:
    return SegmentConfig.model_validate({
        "source": "synthetic", "root": tmp / "synth", "out": tmp / "shards", "shard_size": 4, "crop_size": 32,
        "masks_per_image": 4, "synthetic": SYNTH, **kw,
    })


def _env() -> dict:
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


@pytest.mark.slow
def test_node_loss_during_segmentation(tmp_path: Path) -> None:
    """A worker node of a 3-node Ray cluster is removed mid-job (own process: it needs its own cluster)."""
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "fault_node_loss.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcome = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outcome["removed"], "the node was not removed while shards were being written"
    assert outcome["inputs"] == outcome["planned"] == outcome["rows"] == outcome["distinct"] == 64
    assert outcome["same_keys"] and outcome["problems"] == []


@pytest.mark.slow
def test_killed_driver_rerun_redoes_only_unfinished_shards_byte_identical(tmp_path: Path) -> None:
    cfg = tmp_path / "job.yaml"
    cfg.write_text(json.dumps({"synthetic": {**SYNTH, "train_per_class": 24, "image_size": 96}}))
    exe = Path(sys.executable).with_name("protomask")

    def command(out: Path) -> list[str]:
        return [str(exe), "segment", "--config", str(cfg), "--root", str(tmp_path / "synth"), "--out", str(out),
                "--shard-size", "2", "--crop-size", "32", "--num-workers", "1", "--cpus-per-worker", "1",
                "--no-progress"]

    out = tmp_path / "interrupted"
    job = subprocess.Popen(command(out), env=_env(), start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and len(list(out.glob("*_stats.json"))) < 3:
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGKILL)  # the driver and the local Ray it started, mid-job
    job.wait(timeout=60)
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*_stats.json")}
    assert 3 <= len(finished) < 28, "the kill did not land mid-job"
    assert not (out / MANIFEST).exists()

    assert subprocess.run(command(out), env=_env(), capture_output=True, timeout=300).returncode == 0
    assert subprocess.run(command(tmp_path / "straight"), env=_env(), capture_output=True, timeout=300).returncode == 0
    for name, mtime in finished.items():  # shards finished before the kill were not redone
        assert (out / name).stat().st_mtime_ns == mtime
    tars = sorted(p.name for p in (tmp_path / "straight").glob("*.tar"))
    assert len(tars) == 28 and sorted(p.name for p in out.glob("*.tar")) == tars
    for name in tars:
        assert (out / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
    assert not list(out.glob(".*.tmp")) and verify(out) == []


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return segment_without_ray(_config(tmp_path_factory.mktemp("rel")))


def test_manifest_disagreeing_with_tars_is_named(shards: Path, tmp_path: Path) -> None:
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    card = json.loads((copy / MANIFEST).read_text())
    card["shards"][1]["tar_members"] += 1
    card["shards"][2]["ok"] -= 1
    (copy / MANIFEST).write_text(json.dumps(card))
    problems = verify(copy)
    assert any(p.startswith("shard 00001:") and "manifest says" in p for p in problems)
    assert any(p.startswith("shard 00002:") for p in problems)
    with pytest.raises(ShardError, match="00002.parquet"):
        ShardDataset.open(copy)


def test_bit_flipped_shard_refused_by_training(shards: Path, tmp_path: Path) -> None:
    from schemas.config import TrainConfig
    from training.train import run_train

    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    data = bytearray((copy / "00003.tar").read_bytes())
    data[len(data) // 2] ^= 0x10  # same size: only the checksum can tell
    (copy / "00003.tar").write_bytes(bytes(data))
    ShardDataset.open(copy)  # sizes still agree
    with pytest.raises(ShardError, match=r"shard 00003: .*00003.tar checksum differs"):
        run_train(TrainConfig(shards=copy, run_dir=tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_output_under_a_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(JobError, match="not writable"):
        run_segment(_config(tmp_path, out=tmp_path / "file" / "shards"), progress=False)
    assert (tmp_path / "file").read_text() == "not a directory"


def test_disk_full_during_a_shard_keeps_finished_shards(tmp_path: Path, monkeypatch) -> None:
    """ENOSPC while shard 2 is written: the error names the file, no partial file, shards 0–1 intact."""
    from pipeline import shards as shards_module
    from pipeline.plan import make_plan
    from pipeline.sources import list_source
    from pipeline.worker import ShardProcessor

    config = _config(tmp_path, out=tmp_path / "out")
    config.out.mkdir()
    processor = ShardProcessor(config, "h")
    rows = make_plan(list_source(config), config.shard_size).to_pylist()
    for s in (0, 1):
        processor.process(s, [r for r in rows if r["shard"] == s])
    before = {p.name: p.read_bytes() for p in config.out.iterdir()}
    real_fsync = os.fsync

    def full(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1].startswith(".00002."):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(shards_module.os, "fsync", full)
    with pytest.raises(OSError, match="No space left on device"):
        processor.process(2, [r for r in rows if r["shard"] == 2])
    assert {p.name: p.read_bytes() for p in config.out.iterdir()} == before  # nothing partial, nothing lost


@pytest.mark.ray
def test_unwritable_shard_exhausts_retries_and_keeps_the_rest(ray_local, tmp_path: Path) -> None:
    config = _config(tmp_path, num_workers=2, cpus_per_worker=0.5, max_shard_retries=1)
    run_segment(config, progress=False)
    for name in ("00001.tar", "00001.parquet", "00001_stats.json", "manifest.json"):
        (config.out / name).unlink()
    (config.out / "00001.tar").mkdir()  # the rename onto it fails every time, like an unwritable target
    before = {p.name: p.stat().st_mtime_ns for p in config.out.glob("0000[02-9]*")}
    with pytest.raises(JobError, match=r"shards \['00001'\] failed after 1 retries; 5 finished shards are kept"):
        run_segment(config, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in config.out.glob("0000[02-9]*")} == before
    assert not list(config.out.glob(".*.tmp"))

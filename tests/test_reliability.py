"""Fault injection: lost nodes, killed drivers, corrupt or inconsistent shards, full disks.
(Training-worker loss: tests/test_training.py::test_killed_worker_resumes_from_checkpoint.)"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from conftest import segment_without_ray

from pipeline.job import SHARDS_IN_FLIGHT, JobError, run_segment
from pipeline.manifest import MANIFEST, verify
from pipeline.shards import ShardError
from schemas.config import SegmentConfig
from schemas.manifest import SHARD_FILE
from training.data import ShardDataset

REPO = Path(__file__).resolve().parents[1]
SYNTH = {"num_classes": 2, "train_per_class": 8, "test_per_class": 4, "image_size": 64}


def _config(tmp: Path, **kw) -> SegmentConfig:
    return SegmentConfig.model_validate({
        "source": "synthetic", "root": tmp / "synth", "out": tmp / "shards", "shard_size": 4, "crop_size": 32,
        "masks_per_image": 4, "synthetic": SYNTH, **kw,
    })


def _files(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` by relative path: its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _env() -> dict:
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


@pytest.mark.slow
@pytest.mark.parametrize("replacement", ["replace", "none"])
def test_node_loss_during_segmentation(tmp_path: Path, replacement: str) -> None:
    """A worker node of a 3-node Ray cluster is killed while it segments a shard (own process: it needs its
    own cluster). ``replace``: a fresh node joins; ``none``: the lost worker cannot be placed again and the
    surviving node finishes the job. One retry is enough: a lost node costs one attempt of the shards it held
    (``SHARDS_IN_FLIGHT`` per worker: the traced one, and a finished one whose reply the node took with it)."""
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "fault_node_loss.py"), str(tmp_path), "1", replacement],
                          capture_output=True, text=True, timeout=300, env=_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcome = json.loads((tmp_path / "outcome.json").read_text())
    assert "error" not in outcome, outcome["error"]
    assert outcome["in_flight"] is not None, "the node was not removed while it held a shard"
    assert outcome["after_removal_on_victim"] == []  # the node is really gone
    assert outcome["in_flight"] in outcome["rerun"] and outcome["rerun_elsewhere"]  # redone on a live node
    assert len(outcome["rerun"]) <= SHARDS_IN_FLIGHT and set(outcome["rerun"]) <= set(outcome["started_on_victim"])
    assert outcome["in_flight_marker"]
    assert outcome["inputs"] == outcome["planned"] == outcome["rows"] == outcome["distinct"] == 64
    assert outcome["same_keys"] and outcome["shards"] == 16 and outcome["problems"] == []
    assert outcome["stale_tmp"] == []


def _session(sid: int) -> list:
    """The live (non-zombie) processes of a session: a driver started with start_new_session and its Ray."""
    import psutil

    procs = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getsid(proc.pid) == sid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                procs.append(proc)
        except (OSError, psutil.Error):
            pass
    return procs


@pytest.mark.slow
def test_killed_driver_rerun_redoes_only_unfinished_shards_byte_identical(tmp_path: Path) -> None:
    """SIGKILL of the driver alone (its local Ray goes down with it), then the same command again."""
    cfg = tmp_path / "job.yaml"
    cfg.write_text(json.dumps({"synthetic": {**SYNTH, "train_per_class": 24, "image_size": 96}}))
    exe = Path(sys.executable).with_name("protomask")

    def command(out: Path) -> list[str]:
        return [str(exe), "segment", "--config", str(cfg), "--root", str(tmp_path / "synth"), "--out", str(out),
                "--shard-size", "2", "--crop-size", "32", "--num-workers", "2", "--cpus-per-worker", "0.5",
                "--no-progress"]

    out = tmp_path / "interrupted"
    job = subprocess.Popen(command(out), env=_env(), start_new_session=True,  # its own session: found again below
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 360  # Ray's start-up and the first shards: minutes on a busy 2-core machine
        while time.time() < deadline and len(list(out.glob("_job/*_stats.json"))) < 3:
            time.sleep(0.02)
        at_kill = len(list(out.glob("_job/*_stats.json")))
        job.kill()  # SIGKILL, the driver process only
        job.wait(timeout=60)
        # Ray's GCS and raylet share the driver's fate; its shard workers notice and exit within seconds
        # (finishing, atomically, at most the shard in hand); only the dashboard and runtime-env agents
        # linger (about a minute, harmless), so they are killed here
        deadline = time.time() + 30
        while time.time() < deadline and [p for p in _session(job.pid) if not _is_agent(p)]:
            time.sleep(0.2)
        assert not [p.name() for p in _session(job.pid) if not _is_agent(p)], "Ray processes outlived the driver"
        exited_after = time.time() - (deadline - 30)
    finally:
        lingering = _session(job.pid)
        for proc in lingering:  # only this driver's session: other Ray instances are left alone
            proc.kill()
    finished = {p.relative_to(out): p.stat().st_mtime_ns for p in out.glob("_job/*_stats.json")}
    print(f"markers at the kill: {at_kill}; once its workers exited ({exited_after:.1f} s): {len(finished)}; "
          f"lingering agents killed: {[p.pid for p in lingering]}")
    assert 3 <= at_kill <= len(finished) < 28, "the kill did not land mid-job"
    assert not (out / MANIFEST).exists()

    assert subprocess.run(command(out), env=_env(), capture_output=True, timeout=300).returncode == 0
    assert subprocess.run(command(tmp_path / "straight"), env=_env(), capture_output=True, timeout=300).returncode == 0
    for name, mtime in finished.items():  # shards finished before the rerun were not redone
        assert (out / name).stat().st_mtime_ns == mtime
    tars = sorted(p.name for p in (tmp_path / "straight").glob("_webdataset/*.tar"))
    assert len(tars) == 28 and sorted(p.name for p in out.glob("_webdataset/*.tar")) == tars
    for name in tars:
        tar = Path("_webdataset", name)
        assert (out / tar).read_bytes() == (tmp_path / "straight" / tar).read_bytes(), name
    assert not list(out.rglob(".*.tmp")) and verify(out) == []  # writes cut short by the kill: cleaned up


def _is_agent(proc) -> bool:
    try:
        return proc.name() in ("ray::DashboardAgent", "ray::RuntimeEnvAgent") or any(
            part.endswith(("dashboard/agent.py", "runtime_env/agent/main.py")) for part in proc.cmdline())
    except Exception:  # noqa: BLE001 - gone meanwhile
        return False


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return segment_without_ray(_config(tmp_path_factory.mktemp("rel")))


def _train_config(shards: Path, run_dir: Path):
    from schemas.config import TrainConfig

    return TrainConfig(shards=shards, run_dir=run_dir)


def test_manifest_disagreeing_with_tars_is_named(shards: Path, tmp_path: Path) -> None:
    from training.train import run_train

    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    card = json.loads((copy / MANIFEST).read_text())
    card["shards"][1]["tar_members"] += 1
    card["shards"][2]["ok"] -= 1
    (copy / MANIFEST).write_text(json.dumps(card))
    problems = verify(copy)
    assert any(p.startswith("shard train-00001:") and "manifest says" in p for p in problems)
    assert any(p.startswith("shard train-00002:") for p in problems)
    with pytest.raises(ShardError, match="train-00002.parquet"):
        ShardDataset.open(copy)
    card["shards"][2]["ok"] += 1  # only the member count is off now: the parquet rows agree
    (copy / MANIFEST).write_text(json.dumps(card))
    with pytest.raises(ShardError, match=r"shard train-00001: .*train-00001.tar holds \d+ samples / \d+ members, the manifest says"):
        run_train(_train_config(copy, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_tar_rewritten_without_a_sample_is_named(shards: Path, tmp_path: Path) -> None:
    """A tar that lost a sample while its manifest checksum and size were updated to match: only the counts
    tell. ``verify`` and training both name the shard; training refuses before any worker starts."""
    from schemas.files import sha256_file
    from training.train import run_train

    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    tar = copy / "_webdataset/train-00001.tar"
    with tarfile.open(tar) as src:
        members = [(info, src.extractfile(info).read()) for info in src]
    last = members[-1][0].name.split(".")[0]
    kept = [(info, data) for info, data in members if not info.name.startswith(f"{last}.")]
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as dst:
        for info, data in kept:
            dst.addfile(info, io.BytesIO(data))
    card = json.loads((copy / MANIFEST).read_text())
    card["shards"][1].update(tar_sha256=sha256_file(tar), tar_bytes=tar.stat().st_size)
    (copy / MANIFEST).write_text(json.dumps(card))
    ok = card["shards"][1]["ok"]
    assert any(p.startswith(f"shard train-00001: {ok - 1} samples") and f"manifest says {ok}" in p for p in verify(copy))
    with pytest.raises(ShardError, match=rf"shard train-00001: .*train-00001.tar holds {ok - 1} samples / \d+ members, the manifest says {ok} "):
        run_train(_train_config(copy, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("member,kind", [
    ("../../etc/x.json", tarfile.REGTYPE), ("a/b.json", tarfile.REGTYPE), ("000000000.json", tarfile.SYMTYPE),
    ("000000000.d", tarfile.DIRTYPE), ("x" * 120 + "/000000000.json", tarfile.REGTYPE),
])
def test_training_precheck_refuses_hostile_members(tmp_path: Path, member: str, kind: bytes) -> None:
    """The header walk that training runs before starting refuses what ``iter_samples`` refuses."""
    from pipeline.shards import scan_tar

    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as out:
        info = tarfile.TarInfo(member)
        info.type, info.linkname = kind, "/etc/passwd" if kind == tarfile.SYMTYPE else ""
        info.size = 2 if kind == tarfile.REGTYPE else 0
        out.addfile(info, io.BytesIO(b"{}") if kind == tarfile.REGTYPE else None)
    with pytest.raises(ShardError, match=r"evil.tar: unexpected member"):
        scan_tar(path)


def test_bit_flipped_shard_refused_by_training(shards: Path, tmp_path: Path) -> None:
    from training.train import run_train

    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    data = bytearray((copy / "_webdataset/train-00003.tar").read_bytes())
    data[len(data) // 2] ^= 0x10  # same size: only the checksum can tell
    (copy / "_webdataset/train-00003.tar").write_bytes(bytes(data))
    ShardDataset.open(copy)  # sizes still agree
    with pytest.raises(ShardError, match=r"shard train-00003: .*train-00003.tar checksum differs"):
        run_train(_train_config(copy, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_output_under_a_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(JobError, match="not writable"):
        run_segment(_config(tmp_path, out=tmp_path / "file" / "shards"), progress=False)
    assert (tmp_path / "file").read_text() == "not a directory"


def test_disk_full_during_a_shard_keeps_finished_shards(tmp_path: Path, monkeypatch) -> None:
    """ENOSPC while shard 2 is written: the error names the file, no partial file, shards 0–1 intact."""
    from pipeline.plan import make_plan
    from pipeline.sources import list_source
    from pipeline.worker import ShardProcessor

    config = _config(tmp_path, out=tmp_path / "out")
    config.out.local.mkdir()
    processor = ShardProcessor(config, "h")
    rows = make_plan(list_source(config), config.shard_size, config.shuffle_seed, config.test_fraction).to_pylist()
    for s in (0, 1):
        processor.process(s, [r for r in rows if r["shard"] == s])
    before = _files(config.out.local)
    real_fsync = os.fsync

    def full(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1].startswith(".train-00002."):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match=r"No space left on device: '.*/train-00002.tar'"):
        processor.process(2, [r for r in rows if r["shard"] == 2])
    assert _files(config.out.local) == before  # nothing partial, nothing lost


def test_a_failing_image_in_a_segmenter_batch_fails_alone(tmp_path: Path) -> None:
    """A segmenter that batches (3 images per call) raises on one image: the batch is retried one image at a
    time, so only that input becomes an error row, and every other image keeps its masks."""
    import numpy as np
    import pyarrow.parquet as pq

    from pipeline.plan import make_plan
    from pipeline.segmenters.base import Proposal, Segmenter
    from pipeline.sources import list_source
    from pipeline.worker import ShardProcessor

    config = _config(tmp_path, out=tmp_path / "out")
    config.out.local.mkdir()
    processor = ShardProcessor(config, "h")
    rows = [r for r in make_plan(list_source(config), config.shard_size, config.shuffle_seed,
                                 config.test_fraction).to_pylist() if r["shard"] == 0]
    bad = processor._decode(rows[1])[0].pixels
    grid, calls = processor.segmenter, []

    class Batching(Segmenter):
        name, batch_size = "grid", 3

        def propose_batch(self, images: list[np.ndarray]) -> list[Proposal]:
            calls.append(len(images))
            if any(np.array_equal(image, bad) for image in images):
                raise RuntimeError("device fault")
            return [grid(image) for image in images]

    processor.segmenter = Batching()
    processor.process(0, rows)
    table = pq.read_table(config.out.local / "train-00000.parquet").to_pylist()
    assert len(rows) >= 4 and [r["status"] for r in table] == ["ok", "error"] + ["ok"] * (len(rows) - 2)
    assert table[1]["error_message"] == "RuntimeError: device fault"
    assert calls[:4] == [3, 1, 1, 1]  # the failed batch, then its images one by one


@pytest.mark.ray
def test_unwritable_shard_exhausts_retries_and_keeps_the_rest(ray_local, tmp_path: Path) -> None:
    config = _config(tmp_path, num_workers=2, cpus_per_worker=0.5, max_shard_retries=1)
    run_segment(config, progress=False)
    for name in ("_webdataset/train-00001.tar", "train-00001.parquet", "_job/train-00001_stats.json", MANIFEST):
        (config.out.local / name).unlink()
    (config.out.local / "_webdataset/train-00001.tar").mkdir()  # the rename onto it fails every time

    def others() -> dict[str, int]:
        return {p.relative_to(config.out.local): p.stat().st_mtime_ns for p in config.out.local.rglob("*")
                if SHARD_FILE.match(p.name) and not p.name.startswith("train-00001")}

    before = others()
    assert len(before) == 15
    with pytest.raises(JobError, match=r"shards \['train-00001'\] failed after 1 retries; 5 finished shards are kept"):
        run_segment(config, progress=False)
    assert others() == before
    assert not list(config.out.local.rglob(".*.tmp"))

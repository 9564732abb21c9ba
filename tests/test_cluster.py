"""Cluster entry points: the ``ray submit`` scripts forward to the CLI, and ``protomask segment`` runs as a
``ray job submit`` job on a real (local, single-node) cluster started with ``ray start --head``."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin/ (not resolved: python may be a symlink out of the venv)
JOB_TIMEOUT_S = 300


# --- forwarding (fast) -------------------------------------------------------------------------------------


def test_segment_job_forwards_help() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "cluster" / "segment_job.py"), "--help"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage: protomask segment" in proc.stdout
    for option in ("--source", "--root", "--out", "--shard-size", "--address"):
        assert option in proc.stdout


def test_job_scripts_forward_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    from cluster import segment_job, train_job
    from protomask import cli

    calls: list[list[str]] = []
    monkeypatch.setattr(cli, "main", lambda argv: calls.append(argv) or 0)
    assert segment_job.run(["--", "--source", "cub", "--root", "/r"]) == 0
    assert segment_job.run(["--out", "/o", "--address", "ray://head:10001"]) == 0
    assert train_job.run(["--shards", "/s", "--use-gpu"]) == 0
    assert calls == [
        ["segment", "--address", "auto", "--source", "cub", "--root", "/r"],
        ["segment", "--address", "auto", "--out", "/o", "--address", "ray://head:10001"],  # the user's wins
        ["train", "--address", "auto", "--shards", "/s", "--use-gpu"],
    ]


def test_train_job_forwards_help() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "cluster" / "train_job.py"), "--help"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage: protomask train" in proc.stdout and "--address" in proc.stdout


def test_cluster_yaml_files_parse() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config  # the schema `ray up` checks

    launcher = yaml.safe_load((REPO / "cluster" / "protomask-gpu.yaml").read_text())
    validate_config(prepare_config(launcher))
    head = launcher["head_node_type"]
    assert head in launcher["available_node_types"]
    gpu = [n for n, t in launcher["available_node_types"].items() if n != head]
    assert gpu and all(launcher["available_node_types"][n]["max_workers"] >= 1 for n in gpu)
    assert any("--head" in c for c in launcher["head_start_ray_commands"])
    assert all("--disable-usage-stats" in c for c in launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]
               if "ray start" in c)
    env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "." and ".venv" in " ".join(env["excludes"])


# --- a real cluster (slow) ---------------------------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _worker_port_range(width: int = 100) -> tuple[int, int]:
    """A worker port range of our own: the default 10002-19999 is shared with any other Ray on this host."""
    for _ in range(50):
        low = random.randrange(20000, 30000 - width, width)
        try:
            for port in range(low, low + width, 10):
                with socket.socket() as s:
                    s.bind(("", port))
            return low, low + width - 1
        except OSError:
            continue
    pytest.skip("no free worker port range")


def _wait_http(url: str, deadline: float) -> None:
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer")
        time.sleep(0.5)


def _group(pgid: int, name: str | None = None) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid and (
                        name is None or Path(f"/proc/{entry}/comm").read_text().strip() == name):
                    pids.append(int(entry))
            except (OSError, ProcessLookupError):
                pass
    return pids


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _stop_cluster(pgid: int) -> None:
    """Stop the cluster we started, and only it. Every daemon of our ``ray start`` stays in the process group
    of the session we gave it, so we signal that group's members (``ray stop`` would kill every Ray process on
    the host, other tests' too). Same order as ``ray stop``: raylet, then the rest, then gcs_server; SIGTERM
    all at once takes ~17 s because raylet and GCS wait for each other, this ~6 s."""
    gcs = set(_group(pgid, "gcs_server"))
    for pick in (lambda: _group(pgid, "raylet"), lambda: [p for p in _group(pgid) if p not in gcs], lambda: _group(pgid)):
        _signal(pick(), signal.SIGTERM)
        end = time.monotonic() + 8
        while pick() and time.monotonic() < end:
            time.sleep(0.2)
    _signal(_group(pgid), signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.ray
def test_segment_via_ray_job_submit(tmp_path: Path) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("stops its cluster through /proc (Linux)")
    ray_bin, protomask_bin = BIN / "ray", BIN / "protomask"
    assert ray_bin.is_file() and protomask_bin.is_file(), f"ray/protomask not installed beside {sys.executable}"
    temp_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's unix socket paths are length-limited
    gcs, dashboard, client, agent_http, agent_grpc, node_mgr, obj_mgr, metrics, rt_env = _free_ports(9)
    low, high = _worker_port_range()
    url = f"http://127.0.0.1:{dashboard}"
    # stack.md §3: a head started with RAY_AUTH_MODE=disabled takes a plain `ray job submit` (same env below)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)

    workdir = tmp_path / "job"  # uploaded as the job's working_dir: keep it small
    workdir.mkdir()
    (workdir / "config.yaml").write_text(yaml.safe_dump(
        {"synthetic": {"num_classes": 2, "train_per_class": 8, "test_per_class": 4, "image_size": 64}}
    ))
    root, out = tmp_path / "R", tmp_path / "O"  # one node: tmp_path is "shared storage"

    start = [
        str(ray_bin), "start", "--head", "--num-cpus=2", "--num-gpus=0", "--disable-usage-stats",
        f"--temp-dir={temp_dir}", f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}", f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={rt_env}", f"--min-worker-port={low}", f"--max-worker-port={high}",
        "--object-store-memory=200000000",
    ]
    t0 = time.monotonic()
    head = subprocess.Popen(start, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: see _stop_cluster
    job_id = f"protomask-test-{os.getpid()}-{int(time.time())}"
    try:
        started, _ = head.communicate(timeout=120)
        assert head.returncode == 0, f"ray start failed:\n{started}"
        _wait_http(f"{url}/api/version", time.monotonic() + 60)
        t_started = time.monotonic()
        submit = [
            str(ray_bin), "job", "submit", "--address", url, "--submission-id", job_id,
            "--working-dir", str(workdir), "--",
            str(protomask_bin), "segment", "--config", "config.yaml", "--source", "synthetic",
            "--root", str(root), "--out", str(out), "--segmenter", "grid", "--shard-size", "16",
            "--crop-size", "32", "--num-workers", "2", "--cpus-per-worker", "0.5", "--no-progress",
        ]
        try:
            job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            subprocess.run([str(ray_bin), "job", "stop", "--address", url, job_id], env=env,
                           capture_output=True, timeout=60)
            pytest.fail(f"job did not finish in {JOB_TIMEOUT_S} s:\n{exc.stdout}\n{exc.stderr}")
        log = f"--- stdout\n{job.stdout}\n--- stderr\n{job.stderr}"
        t_job = time.monotonic()
        print(f"ray start {t_started - t0:.1f} s, segment job {t_job - t_started:.1f} s")
        assert job.returncode == 0, log
        assert "succeeded" in job.stdout, log

        manifest = json.loads((out / "_manifest.json").read_text())
        assert manifest["counts"]["ok"] == 24, manifest["counts"]
        assert len(list(out.glob("_webdataset/*.tar"))) == 2

        # cluster/runtime_env.yaml uploads this checkout (working_dir "."): the job imports protomask from that copy
        verify = subprocess.run(
            [str(ray_bin), "job", "submit", "--address", url, "--runtime-env", "cluster/runtime_env.yaml", "--",
             sys.executable, "-c", "import protomask, sys; print('CODE FROM', protomask.__file__); "
             "from protomask.cli import main; sys.exit(main(['manifest', 'verify', '--shards', sys.argv[1]]))", str(out)],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
        )
        assert verify.returncode == 0 and "succeeded" in verify.stdout, f"{verify.stdout}\n{verify.stderr}"
        assert ": OK" in verify.stdout and "runtime_resources/working_dir_files" in verify.stdout, verify.stdout
        print(f"verify job {time.monotonic() - t_job:.1f} s")
    finally:
        if head.poll() is None:
            head.kill()
        _stop_cluster(head.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)

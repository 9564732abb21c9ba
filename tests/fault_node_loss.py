"""Node loss during segmentation, run as its own process (it needs its own multi-node Ray).

A head with no CPUs and two 1-CPU worker nodes; while a shard is being segmented on the second
worker node (and some shards are already finished), that node is killed without a graceful shutdown
(its raylet and every process on it die) and a fresh 1-CPU node joins. Every shard start is traced
(shard, node) to a file, so the outcome shows which shards were re-run where.

    python tests/fault_node_loss.py TMP MAX_SHARD_RETRIES replace|none

``replace`` adds a fresh node after the removal; ``none`` leaves the job one worker node (the lost
worker's actor cannot be placed again). The outcome is written to ``TMP/outcome.json`` (Ray's own
messages about the lost raylet go to stdout at any time).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

import pipeline.job
from pipeline.job import ShardWorker, run_segment
from pipeline.manifest import read_rows, verify
from pipeline.plan import read_plan, shard_splits
from schemas.config import SegmentConfig
from schemas.manifest import PLAN_FILE, SHARD_FILE, shard_file, shard_glob

TOTAL_SHARDS = 16


class TracedShardWorker(ShardWorker):
    """The job's actor, appending ``shard node_id pid`` to a trace file each time a shard starts."""

    def process(self, shard: int, rows: list[dict], counter) -> dict:
        with open(TRACE, "a") as f:
            f.write(f"{shard} {ray.get_runtime_context().get_node_id()} {os.getpid()}\n")
        return super().process(shard, rows, counter)


def starts(trace: Path) -> list[tuple[int, str, int]]:
    if not trace.is_file():
        return []
    return [(int(s), node, int(pid)) for s, node, pid in (line.split() for line in trace.read_text().splitlines() if line)]


def main(tmp: Path, retries: int, replace: bool) -> None:
    global TRACE
    TRACE = str(tmp / "trace.txt")  # captured by value when Ray pickles the class
    pipeline.job.ShardWorker = TracedShardWorker
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        config = SegmentConfig.model_validate(dict(
            source="synthetic", root=tmp / "synth", out=tmp / "shards", shard_size=4, crop_size=32,
            masks_per_image=4, num_workers=2, cpus_per_worker=1, max_shard_retries=retries,
            synthetic={"num_classes": 4, "train_per_class": 12, "test_per_class": 4, "image_size": 96},
        ))
        result: dict = {}

        def segment() -> None:
            try:
                result["card"] = run_segment(config, progress=False)
            except Exception as exc:  # noqa: BLE001 - reported in the outcome
                result["error"] = f"{type(exc).__name__}: {exc}"

        job = threading.Thread(target=segment, daemon=True)
        start = time.time()
        job.start()  # the node is removed from the main thread: Ray's node handling needs it
        victim, in_flight, removed_after, started_before = nodes[1].node_id, None, None, 0  # nodes[0] stays
        deadline = time.time() + 120
        while time.time() < deadline and job.is_alive() and in_flight is None:
            trace = starts(Path(TRACE))  # before the markers: a shard in `running` had not finished when traced
            finished = {int(SHARD_FILE.match(p.name)["shard"]) for p in config.out.local.glob(shard_glob(part="stats"))}
            running = [s for s, node, _ in trace if node == victim and s not in finished]
            if 2 <= len(finished) < TOTAL_SHARDS and running:
                # the whole node at once: the actor process mid-shard (an actor outlives its raylet for a while,
                # since the driver talks to it directly), then the raylet and everything else of the node
                for pid in {pid for _, node, pid in trace if node == victim}:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                cluster.remove_node(nodes[1], allow_graceful=False)
                in_flight, removed_after, started_before = running[-1], len(finished), len(trace)
                if replace:
                    cluster.add_node(num_cpus=1)
            time.sleep(0.02)
        job.join(timeout=240)
        seconds = round(time.time() - start, 1)
        if "card" not in result:
            (tmp / "outcome.json").write_text(json.dumps({"error": result.get("error", "the job did not finish in 240 s")}))
            return
        card = result["card"]
        plan, _ = read_plan(config.out.local / PLAN_FILE)
        keys = read_rows(config.out.local, card.shards).column("key").to_pylist()
        trace = starts(Path(TRACE))
        (tmp / "outcome.json").write_text(json.dumps({
            "in_flight": in_flight, "removed_after_shards": removed_after, "seconds": seconds,
            "starts": len(trace), "rerun": sorted({s for s, _, _ in trace if sum(t == s for t, _, _ in trace) > 1}),
            "rerun_elsewhere": in_flight is not None and any(s == in_flight and n != victim for s, n, _ in trace),
            "started_on_victim": sorted({s for s, n, _ in trace[:started_before] if n == victim}),
            "after_removal_on_victim": [s for s, n, _ in trace[started_before:] if n == victim],
            "inputs": card.counts["inputs"], "planned": plan.num_rows, "shards": len(card.shards),
            "rows": len(keys), "distinct": len(set(keys)), "same_keys": sorted(keys) == sorted(plan.column("key").to_pylist()),
            "stale_tmp": sorted(p.name for p in config.out.local.rglob(".*.tmp")),
            "in_flight_marker": in_flight is not None
            and (config.out.local / shard_file(shard_splits(plan)[in_flight], in_flight, "stats")).is_file(),
            "problems": verify(config.out.local),
        }))
    finally:
        ray.shutdown()
        cluster.shutdown()


TRACE = ""

if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "replace")

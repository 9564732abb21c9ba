"""Node loss during segmentation, run as its own process (it needs its own multi-node Ray).

A head with no CPUs and two 1-CPU worker nodes; once some shards are finished, one worker node is
removed (its raylet and processes die) and a fresh node joins. Prints a JSON line with the outcome.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from pipeline.job import run_segment
from pipeline.manifest import read_rows, verify
from pipeline.plan import read_plan
from schemas.config import SegmentConfig


def main(tmp: Path) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=cluster.address)
    config = SegmentConfig.model_validate(dict(
        source="synthetic", root=tmp / "synth", out=tmp / "shards", shard_size=4, crop_size=32,
        masks_per_image=4, num_workers=2, cpus_per_worker=1, max_shard_retries=3,
        synthetic={"num_classes": 4, "train_per_class": 12, "test_per_class": 4, "image_size": 96},
    ))
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(card=run_segment(config, progress=False)), daemon=True)
    job.start()  # the node is removed from the main thread: Ray's node handling needs it
    removed = False
    deadline = time.time() + 120
    while time.time() < deadline and job.is_alive() and not removed:
        if 2 <= len(list(config.out.glob("*_stats.json"))) < 16:
            cluster.remove_node(nodes[1])  # kills that node's raylet and its actor mid-shard
            cluster.add_node(num_cpus=1)
            removed = True
        time.sleep(0.05)
    job.join(timeout=240)
    card = result["card"]
    plan, _ = read_plan(config.out / "plan.parquet")
    keys = read_rows(config.out, card.shards).column("key").to_pylist()
    print(json.dumps({
        "removed": removed, "inputs": card.counts["inputs"], "planned": plan.num_rows,
        "rows": len(keys), "distinct": len(set(keys)), "same_keys": sorted(keys) == sorted(plan.column("key").to_pylist()),
        "problems": verify(config.out),
    }))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))

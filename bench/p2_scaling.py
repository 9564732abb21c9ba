"""P2: segmentation throughput with 2 workers ÷ 1 worker, on a simulated cluster of two 1-CPU nodes
(``ray.cluster_utils.Cluster``, head with no CPUs). Same images (cub_mini listed ``--repeat`` times)."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from bench.common import CUB_MINI, report
from bench.p1_segment_overhead import write_listing
from pipeline.job import run_segment
from schemas.config import SegmentConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=8, help="times the 60 photos are listed")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        n, listing = write_listing(CUB_MINI, Path(tmp), args.repeat)
        for workers in (1, 2):
            config = SegmentConfig(source="listing", root=CUB_MINI, listing=listing, out=Path(tmp) / f"w{workers}",
                                   shard_size=30, masks_per_image=8, num_workers=workers, cpus_per_worker=1)
            start = time.perf_counter()
            run_segment(config, progress=False)
            rows.append({"workers": str(workers), "images_per_s": n / (time.perf_counter() - start)})
    ray.shutdown()
    cluster.shutdown()
    rows.append({"workers": "ratio (target >= 1.8)", "images_per_s": rows[1]["images_per_s"] / rows[0]["images_per_s"]})
    report(f"P2 scaling on two simulated 1-CPU nodes ({n} images, superpixel)", rows, args.json)


if __name__ == "__main__":
    main()

"""P2: segmentation throughput with 2 workers ÷ 1 worker, on a simulated cluster of two 1-CPU nodes
(`ray.cluster_utils.Cluster`: a head node with 0 CPUs, where the driver runs, and two worker nodes
with num_cpus=1). Same inputs for both: the cub_mini photos listed --passes times.

Each simulated node is pinned to its own physical core (its raylet is started with the driver's CPU
affinity set to that core, and every process the raylet starts inherits it), so that a node really
has one CPU: unpinned, the single worker's decoding and encoding threads would borrow the second
core, which a 1-CPU node does not have. --no-pin turns this off. The head (GCS, driver, progress
counter) is not pinned and shares both cores.

Rates are steady state, as in P1: the images of the shards after each worker's first ÷ the time
from the worker count-th shard completion marker to the last (worker start excluded from both).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as bench/p2_... or python -m bench.p2_...

from bench.common import (CUB_MINI, Figure, ShardClock, in_child, median, parser, report, shard_images, side_by_side,
                          timed, write_listing)
from pipeline.job import run_segment
from schemas.config import SegmentConfig
from schemas.storage import Location

TARGET = ">= 1.8"


def start_cluster(pin: bool):
    """Head with 0 CPUs and two 1-CPU nodes; with ``pin``, node i's processes run on core i only."""
    import ray
    from ray.cluster_utils import Cluster

    cores = sorted(os.sched_getaffinity(0))
    pin = pin and len(cores) >= 2
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for i in range(2):
            if pin:
                os.sched_setaffinity(0, {cores[i]})  # inherited by the raylet and the workers it starts
            cluster.add_node(num_cpus=1)
    finally:
        os.sched_setaffinity(0, cores)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    return cluster, pin


def add_cluster_options(p) -> None:
    """The options of a benchmark on the simulated cluster (P2, P7): its inputs and the core pinning."""
    p.add_argument("--passes", type=int, default=8, help="times the 60 cub_mini photos are listed (default 8)")
    p.add_argument("--no-pin", dest="pin", action="store_false", help="let both nodes use every core")
    p.add_argument("--root", type=Path, default=CUB_MINI, help="a CUB-200-2011 folder")


def cluster_args(passes: int, rounds: int, pin: bool, root: Path) -> list[str]:
    """``add_cluster_options`` and ``--rounds`` as command-line arguments, for ``in_child``."""
    return ["--passes", str(passes), "--rounds", str(rounds), "--root", str(root), *([] if pin else ["--no-pin"])]


def measure(passes: int, shard_size: int, rounds: int, pin: bool = True, root: Path = CUB_MINI) -> Figure:
    import ray

    if ray.is_initialized():  # a Cluster needs a process of its own: measure in a child process
        return in_child(__file__, ["--shard-size", str(shard_size), *cluster_args(passes, rounds, pin, root)])
    cluster, pinned = start_cluster(pin)
    end_to_end: dict[int, list[float]] = {1: [], 2: []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            n, listing = write_listing(root, Path(tmp), passes)
            config = SegmentConfig(source="listing", root=root, listing=listing, out=Path(tmp) / "out",
                                   shard_size=shard_size, masks_per_image=8, cpus_per_worker=1)

            def run(workers: int):
                def trial() -> float:
                    out = Path(tempfile.mkdtemp(dir=tmp))
                    with ShardClock(out) as clock:
                        seconds = timed(lambda: run_segment(
                            config.model_copy(update={"out": Location.parse(out), "num_workers": workers}),
                            progress=False))
                    end_to_end[workers].append(n / seconds)
                    return clock.steady_rate(shard_images(out), workers)

                return trial

            values = side_by_side({"2 workers": run(2), "1 worker": run(1)}, rounds, warmup=False)
    finally:
        ray.shutdown()
        cluster.shutdown()
    e2e = [a / b for a, b in zip(end_to_end[2], end_to_end[1])]
    return Figure.from_rounds(
        "P2", f"2 workers ÷ 1 worker, two simulated 1-CPU nodes{' pinned to a core each' if pinned else ''}, "
              f"{n} images, shards of {shard_size}",
        TARGET, values, "images/s",
        included="steady state after each worker's first shard; the cluster is started once, before both",
        params={"passes": passes, "images": n, "shard_size": shard_size, "pinned": pinned,
                "end_to_end_images_per_s": end_to_end},
        extra_rows=[{"": "end to end (worker start, plan, manifest included): ratio", "images/s": median(e2e),
                     "rounds": " ".join(f"{v:.4g}" for v in e2e)}],
    )


def main() -> None:
    p = parser(__doc__, rounds=3)
    add_cluster_options(p)
    p.add_argument("--shard-size", type=int, default=15, help="small shards: the steady-state window ends when "
                   "the last shard does, so a worker idle behind the other's last shard costs at most one shard")
    args = p.parse_args()
    report(measure(args.passes, args.shard_size, args.rounds, args.pin, args.root), args.json)


if __name__ == "__main__":
    main()

"""P7: training throughput (images/s) with 2 Ray Train workers ÷ 1 worker, on the simulated cluster of P2
(a head node with 0 CPUs, where the driver runs, and two 1-CPU nodes, each pinned to its own core unless
--no-pin). With num_cpus=1 per node and cpus_per_worker=1, Ray puts each training worker on a node of
its own; the bench checks that it did (the workers' node ids).

Inputs: cub_mini listed --passes times, segmented once on the same cluster (superpixel, K=8, shards of
16). Training: configs/demo.yaml (convnet width 16) at 64 px, data.batch_size 32 (images per optimiser
step over ALL workers, so 1 and 2 workers take the same steps on the same images: 2 workers run 16
each and all-reduce the gradients, gloo), --epochs joint epochs, no warm-up or last-layer epochs, a
fresh run_dir per trial, checksums not verified. Every trial is a whole ``run_train`` (worker start,
epochs with validation, push, test, export); the figure is training.loop's ``images_per_s``
(metrics.csv: all workers' training images per wall second of the training epoch, validation
excluded), the mean over the epochs after the first (the first holds the first shard reads and
DDP's first buckets). The end-to-end wall time of each trial is kept in params.

Torch threads: Ray sets OMP_NUM_THREADS=1 in a worker that holds 1 CPU, and the bench checks that torch
obeys it: every Ray Train worker records ``torch.get_num_threads()`` (before and after its loop), its
OMP_NUM_THREADS, node and CPU affinity (a thin wrapper around training.loop.train_loop_per_worker, put in
place of the one training.train starts); the threads seen are printed under the table. Each worker
also runs one decoding thread (demo.yaml's data.loader_threads 1) on its node's core.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as bench/p7_... or python -m bench.p7_...

from bench.common import CUB_MINI, Figure, in_child, median, parser, report, side_by_side, write_listing
from bench.p2_scaling import add_cluster_options, cluster_args, start_cluster

TARGET = ">= 1.7"
PROBE = "p7_worker{rank}.json"


def probed_loop(loop_config: dict) -> None:
    """training.loop.train_loop_per_worker, noting this worker's torch threads, node and cores first."""
    import os

    import ray
    import ray.train
    import torch

    from training.loop import train_loop_per_worker

    rank = ray.train.get_context().get_world_rank()
    probe = {"torch_threads_before": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
             "node": ray.get_runtime_context().get_node_id(), "cores": sorted(os.sched_getaffinity(0))}
    train_loop_per_worker(loop_config)
    probe["torch_threads_after"] = torch.get_num_threads()
    (Path(loop_config["config"]["run_dir"]) / PROBE.format(rank=rank)).write_text(json.dumps(probe))


def steady_rate(run_dir: Path) -> tuple[float, int]:
    """Mean ``images_per_s`` of the epochs after the first, and the number of epochs it averages."""
    with (run_dir / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if int(r["epoch"]) >= 1]
    if not rows:
        raise ValueError(f"{run_dir}/metrics.csv: no epoch after the first; use --epochs 2 or more")
    return statistics.fmean(float(r["images_per_s"]) for r in rows), len(rows)


def measure(passes: int, epochs: int, rounds: int, pin: bool = True, root: Path = CUB_MINI) -> Figure:
    import ray

    if ray.is_initialized():  # a Cluster needs a process of its own: measure in a child process
        return in_child(__file__, ["--epochs", str(epochs), *cluster_args(passes, rounds, pin, root)])
    import training.train
    from pipeline.job import run_segment
    from protomask.cli import CONFIGS
    from schemas.config import SegmentConfig, TrainConfig, load_config

    if __name__ != "__main__":  # imported: bench/ is not installed, so the workers get probed_loop by value
        import ray.cloudpickle

        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cluster, pinned = start_cluster(pin)
    end_to_end: dict[int, list[float]] = {1: [], 2: []}
    probes: dict[int, list[list[dict]]] = {1: [], 2: []}
    runner, training.train.train_loop_per_worker = training.train.train_loop_per_worker, probed_loop
    try:
        with tempfile.TemporaryDirectory() as tmp:
            n, listing = write_listing(root, Path(tmp), passes)
            shards = Path(tmp) / "shards"
            start = time.perf_counter()
            card = run_segment(SegmentConfig(source="listing", root=root, listing=listing, out=shards, shard_size=16,
                                             masks_per_image=8, num_workers=2, cpus_per_worker=1), progress=False)
            segment_s = time.perf_counter() - start

            def config(workers: int, run_dir: Path):
                return load_config(TrainConfig, CONFIGS / "demo.yaml", {
                    "shards": shards, "run_dir": run_dir, "num_workers": workers, "cpus_per_worker": 1,
                    "model.input_size": 64, "schedule.warmup_epochs": 0, "schedule.joint_epochs": epochs,
                    "schedule.last_layer_epochs": 0, "data.batch_size": 32, "data.val_fraction": 0.05,
                    "verify_checksums": False})

            steady_epochs = []

            def run(workers: int):
                def trial() -> float:
                    run_dir = Path(tempfile.mkdtemp(dir=tmp)) / f"p7_{workers}w"
                    start = time.perf_counter()
                    training.train.run_train(config(workers, run_dir))
                    end_to_end[workers].append(time.perf_counter() - start)
                    probes[workers].append([json.loads((run_dir / PROBE.format(rank=r)).read_text())
                                            for r in range(workers)])
                    rate, counted = steady_rate(run_dir)
                    steady_epochs.append(counted)
                    return rate

                return trial

            values = side_by_side({"2 workers": run(2), "1 worker": run(1)}, rounds, warmup=False)
            train_split = card.per_split.get("train", {}).get("ok")
    finally:
        training.train.train_loop_per_worker = runner
        ray.shutdown()
        cluster.shutdown()
    every = [p for w in probes.values() for trial in w for p in trial]
    threads = sorted({p[k] for p in every for k in ("torch_threads_before", "torch_threads_after")})
    own_nodes = all(len({p["node"] for p in trial}) == 2 for trial in probes[2])
    e2e = [b / a for a, b in zip(end_to_end[2], end_to_end[1])]  # time of 1 worker ÷ time of 2: a speed-up
    return Figure.from_rounds(
        "P7", f"training images/s, 2 Ray Train workers ÷ 1, two simulated 1-CPU nodes"
              f"{' pinned to a core each' if pinned else ''}, {n} images (cub_mini x {passes}), demo convnet "
              f"64 px, K=8, 32 images per step, {epochs} epochs",
        TARGET, values, "images/s",
        included=f"training epochs only (metrics.csv images_per_s), mean of the epochs after the first "
                 f"({min(steady_epochs)} per trial); torch threads in every worker: {threads}; "
                 f"2 workers on 2 nodes: {'yes' if own_nodes else 'NO'}",
        params={"passes": passes, "images": n, "train_split": train_split, "epochs": epochs, "pinned": pinned,
                "segment_s": round(segment_s, 1), "end_to_end_s": end_to_end, "torch_threads": threads,
                "workers_on_own_nodes": own_nodes, "workers": probes},
        extra_rows=[{"": "end to end (run_train wall time, 1 worker ÷ 2 workers)", "images/s": median(e2e),
                     "rounds": " ".join(f"{v:.4g}" for v in e2e)}],
    )


def main() -> None:
    p = parser(__doc__, rounds=3)
    add_cluster_options(p)
    p.add_argument("--epochs", type=int, default=3, help="joint epochs per trial, the first not timed (default 3)")
    args = p.parse_args()
    report(measure(args.passes, args.epochs, args.rounds, args.pin, args.root), args.json)


if __name__ == "__main__":
    main()

"""P4: training step time with the real shard stream ÷ with the same batches held in memory.

The demo's training set-up (configs/demo.yaml: convnet width 16, 48 px input, K=6 crops cut at read
time from the synthetic source's images, one worker's share of a step: batches of 16, 1 decoding thread)
on CPU, in one process. Both sides
run training.loop.train_one_epoch (forward, loss, backward, Adam step, per-step metrics) in the joint
phase: once fed by the ShardStream (reading the tars, decoding and augmenting on its thread), once by
a list of the batches that stream gives for the same epoch, decoded beforehand. torch runs
--torch-threads intra-op threads (default 1: a Ray Train worker with cpus_per_worker=1, the default,
gets OMP_NUM_THREADS=1), so the decoding thread has the other core, as it has in a real run.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as bench/p4_... or python -m bench.p4_...

import torch

from bench.common import Figure, local_ray, parser, report, side_by_side, timed
from pipeline.job import run_segment
from protomask.cli import CONFIGS
from schemas.config import SegmentConfig, TrainConfig, load_config
from training.data import ShardDataset, ShardStream, split_keys
from training.losses import class_weights
from training.loop import make_optimizers, set_trainable, train_one_epoch
from training.model import ProtoMask

TARGET = "<= 1.10"
BATCH = 16  # one of the demo's 2 workers: its share of a 32-image step


def measure(rounds: int, torch_threads: int, loader_threads: int) -> Figure:
    torch.set_num_threads(torch_threads)
    with tempfile.TemporaryDirectory() as tmp:
        seg = SegmentConfig(source="synthetic", root=Path(tmp) / "synthetic", out=Path(tmp) / "shards",
                            masks_per_image=6, shard_size=32, num_workers=2, cpus_per_worker=1)
        with local_ray(2):
            run_segment(seg, progress=False)
        config = load_config(TrainConfig, CONFIGS / "demo.yaml", {
            "shards": seg.out, "run_dir": Path(tmp) / "run", "data.batch_size": BATCH, "data.micro_batch": BATCH,
            "data.loader_threads": loader_threads})
        dataset = ShardDataset.open(seg.out)
        keys = split_keys(dataset, config.data.val_fraction, config.seed)["train"]
        counts = [sum(r["label"] == c for r in dataset.rows if r["key"] in set(keys)) for c in range(dataset.num_classes)]
        weights = class_weights(counts)
        stream = ShardStream.for_model(dataset, keys, config.data, config.model, batch_size=BATCH, train=True,
                                       seed=config.seed)
        torch.manual_seed(config.seed)
        model = ProtoMask(config.model, dataset.num_classes)
        set_trainable(model, "joint", config)
        optimizer = make_optimizers(model, config)["joint"]
        stream.set_epoch(0)
        held = list(stream)  # the same batches, decoded and augmented once
        steps = len(held)

        def epoch(batches) -> float:
            return timed(lambda: train_one_epoch(model, model, batches, optimizer, config, "joint", weights,
                                                 torch.device("cpu"), micro_batch=BATCH)) / steps

        values = side_by_side({"shard stream": lambda: epoch(stream), "batches in memory": lambda: epoch(held)}, rounds)
    return Figure.from_rounds(
        "P4", f"step time, shard stream ÷ in memory (demo convnet, {config.model.input_size} px, K=6, batch "
              f"{config.data.batch_size}, {steps} steps/epoch, {torch_threads} torch thread(s), {loader_threads} decoding thread(s))",
        TARGET, values, "s/step",
        included="train_one_epoch: the stream's reading, decoding and augmentation where it overlaps the step",
        params={"steps": steps, "torch_threads": torch_threads, "loader_threads": loader_threads,
                "model": config.model.model_dump(mode="json"), "batch_size": config.data.batch_size},
    )


def main() -> None:
    p = parser(__doc__, rounds=5)
    p.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--loader-threads", type=int, default=1,
                   help="ShardStream decoding threads (default: the demo's)")
    args = p.parse_args()
    report(measure(args.rounds, args.torch_threads, args.loader_threads), args.json)


if __name__ == "__main__":
    main()

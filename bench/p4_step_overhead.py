"""P4: training step time with the real shard stream ÷ with the same batches held in memory
(CPU, small convnet, one process, decoding threads as configured)."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench.common import report
from pipeline.job import run_segment
from schemas.config import DataConfig, ModelConfig, SegmentConfig
from training.data import ShardDataset, ShardStream, split_keys
from training.losses import total_loss
from schemas.config import LossConfig
from training.model import ProtoMask


def steps(model, optimizer, batches) -> float:
    start = time.perf_counter()
    n = 0
    for batch in batches:
        out = model(batch["crops"], batch["valid"])
        loss, _ = total_loss(out, batch["label"], model, LossConfig(), "joint", None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        n += 1
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--loader-threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        seg = SegmentConfig(source="synthetic", root=Path(tmp) / "syn", out=Path(tmp) / "shards", masks_per_image=6,
                            crop_size=64, shard_size=32, num_workers=2, cpus_per_worker=1)
        run_segment(seg, progress=False)
        ray.shutdown()
        dataset = ShardDataset.open(seg.out)
        keys = split_keys(dataset, 0.1, 0)["train"]
        data = DataConfig(batch_size=16, loader_threads=args.loader_threads)
        stream = ShardStream(dataset, keys, data, 48, True, 0, 1, 0)
        torch.manual_seed(0)
        model = ProtoMask(ModelConfig(backbone="convnet", width=16, prototypes_per_class=3, prototype_dim=64,
                                      input_size=48), dataset.num_classes)
        optimizer = torch.optim.Adam(model.parameters(), 1e-3)
        stream.set_epoch(0)
        held = list(stream)  # the same batches, decoded and augmented once
        steps(model, optimizer, held)  # warm-up
        results = []
        for epoch in range(3):
            stream.set_epoch(0)
            results.append((steps(model, optimizer, stream), steps(model, optimizer, held)))
    streamed = sorted(r[0] for r in results)[1]
    memory = sorted(r[1] for r in results)[1]
    report(f"P4 step time, shard stream vs in memory ({len(held)} steps of 16 images, K=6, 48 px)", [
        {"input": "shard stream", "seconds_per_step": streamed},
        {"input": "batches in memory", "seconds_per_step": memory},
        {"input": "ratio (target <= 1.10)", "seconds_per_step": streamed / memory},
    ], args.json)


if __name__ == "__main__":
    main()

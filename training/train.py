"""``protomask train`` and ``protomask evaluate``: drivers around the worker loop."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from cluster.connect import init_ray
from pipeline.manifest import shard_problems
from pipeline.shards import ShardError
from schemas.config import ConfigError, DataConfig, TrainConfig, load_config, write_config
from schemas.storage import Location, list_files, makedirs, read_text
from training import TrainError
from training.data import ShardDataset, ShardStream, split_keys
from training.evaluate import evaluate_split, metrics_file, write_metrics
from training.explain import Relevance
from training.export import load_model, trained_on
from training.loop import train_loop_per_worker


def run_train(config: TrainConfig, *, address: str | None = None, progress: bool = True) -> dict:
    """Train on cached shards with Ray Train; rerunning with the same run_dir resumes. Returns the
    contents of ``metrics_test.json``. Prints one line per epoch; ``progress``: bars within each pass
    (on a terminal)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from training.progress import Console, ProgressBoard

    dataset = ShardDataset.open(config.shards)  # refuse to start on a missing or truncated shard, naming it
    if config.verify_checksums and (problems := shard_problems(config.shards, dataset.card)):
        raise ShardError("refusing to train on corrupt shards:\n" + "\n".join(problems))
    run_dir = config.run_dir.resolve()
    if not run_dir.name:
        raise TrainError(f"--run-dir {run_dir}: name a folder for the run (s3://bucket/runs/r1, not a bucket)")
    makedirs(run_dir)
    config = config.model_copy(update={"run_dir": run_dir, "shards": config.shards.resolve()})
    refuse_another_run(config)
    write_config(config, run_dir / "train_config.yaml")
    init_ray(address)
    board = ProgressBoard.remote()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.model_dump(mode="json"), "board": board},
        scaling_config=ScalingConfig(
            num_workers=config.num_workers, use_gpu=config.use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=run_dir.name,  # Ray Train keeps its checkpoints in run_dir too, resuming from them on a rerun
            storage_path=run_dir.parent.fs_path,  # on S3: bucket/prefix, without the scheme, on storage_filesystem
            storage_filesystem=None if run_dir.is_local else run_dir.fs,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    with Console(board, bars=progress):
        result = trainer.fit()
    if result.error is not None:
        if out_of_memory(result.error):
            raise TrainError(
                f"a training worker ran out of memory ({config.num_workers} workers, {config.data.batch_size} "
                f"images per step, micro-batch {config.data.micro_batch or 'from the memory budget'}); lower "
                "data.memory_gb or data.micro_batch, model.input_size or num_workers per node, or use a configs/ "
                "file for a smaller machine") from None
        raise TrainError(f"training failed: {result.error}") from result.error
    return json.loads(read_text(metrics_file(run_dir, "test")))


# how a run is carried out, not what it trains: a rerun that resumes a run may change these
RESUMABLE_WITH_OTHER = ("run_dir", "num_workers", "use_gpu", "cpus_per_worker", "max_failures", "verify_checksums",
                        "data.micro_batch", "data.memory_gb", "data.loader_threads")


def refuse_another_run(config: TrainConfig) -> None:
    """A rerun resumes from run_dir's newest checkpoint, so it must train what that run trained: refuse (before
    anything is written) a config that differs from the recorded ``train_config.yaml`` in any field but those
    of ``RESUMABLE_WITH_OTHER``, naming the fields."""
    run_dir = config.run_dir
    if not any(name.startswith("checkpoint_") for name in list_files(run_dir)):
        return  # nothing to resume: a new start may change anything
    recorded_file = run_dir / "train_config.yaml"
    try:
        recorded = load_config(TrainConfig, recorded_file, {})
    except ConfigError as exc:
        problems = "; ".join(line.strip() for line in str(exc).splitlines()[1:]) or str(exc)
        raise TrainError(f"{recorded_file}: the run's config no longer reads ({problems}); use another --run-dir, "
                         f"or delete {run_dir} to start over") from None

    def fields(c: TrainConfig) -> dict:
        return {k: v for k, v in _dotted(c.model_dump(mode="json")).items() if k not in RESUMABLE_WITH_OTHER}

    before, now = fields(recorded), fields(config)
    differ = [k for k in dict.fromkeys([*before, *now]) if before.get(k) != now.get(k)]
    if differ:
        listed = "; ".join(f"{k}: {before.get(k)!r} there, {now.get(k)!r} now" for k in differ)
        raise TrainError(f"{run_dir} holds a run of another configuration ({listed}); a rerun resumes it only with "
                         f"the same settings: use another --run-dir, or delete {run_dir} to start over")


def _dotted(tree: dict, prefix: str = "") -> dict:
    """A nested mapping as ``{"a.b": value}``."""
    out = {}
    for k, v in tree.items():
        out.update(_dotted(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


OOM_SIGNS = ("OutOfMemoryError", "out of memory", "OOM killer", "low on memory", "Cannot allocate memory")


def out_of_memory(error: BaseException) -> bool:
    """Whether a training failure (or anything in its cause chain) was a worker out of memory: a CUDA or
    CPU allocation failure, Ray's memory monitor, or the kernel's OOM killer."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, MemoryError) or any(sign in str(seen) for sign in OOM_SIGNS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def run_evaluate(run_dir: Location | Path, shards: Location | Path | None = None, split: str = "test", *,
                 batch_size: int = 32, relevance: Relevance | None = None) -> dict:
    """Every metric of the exported model on one split (default shards: the ones it was trained on), written
    to ``metrics_<split>.json`` as the training run writes the test split's; returns them. ``relevance``: the
    saliency of the paper's metrics (``evaluate_split``)."""
    run_dir = Location.parse(run_dir)
    model, classes = load_model(run_dir)
    shards = Location.parse(shards) if shards else trained_on(run_dir)
    dataset = ShardDataset.open(shards)
    if dataset.classes != classes:
        raise TrainError(f"{shards}: classes differ from the model's ({len(dataset.classes)} vs {len(classes)})")
    train_config = load_config(TrainConfig, run_dir / "train_config.yaml", {})
    keys = split_keys(dataset, train_config.data.val_fraction, train_config.seed)[split]
    data = DataConfig(loader_threads=min(2, os.cpu_count() or 1))
    stream = ShardStream.for_model(dataset, keys, data, model.config, batch_size=batch_size, train=False)
    result = evaluate_split(model, stream, torch.device("cpu"), dataset=dataset, keys=keys, relevance=relevance)
    write_metrics(run_dir, split, result)
    return result

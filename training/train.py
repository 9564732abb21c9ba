"""``protomask train`` and ``protomask evaluate``: drivers around the worker loop."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from pipeline.job import init_ray
from pipeline.manifest import shard_problems
from pipeline.shards import ShardError
from schemas.config import DataConfig, ModelConfig, TrainConfig, write_config
from training import TrainError
from training.data import ShardDataset, ShardStream, split_keys
from training.explain import part_metrics
from training.loop import predict, train_loop_per_worker
from training.metrics import classification_metrics, compactness, contrastivity
from training.model import ProtoMask


TOP_K = 5  # prototypes per image for the contrastivity metrics (spec §7)


def run_train(config: TrainConfig, address: str | None = None) -> dict:
    """Train on cached shards with Ray Train; rerunning with the same run_dir resumes. Returns test metrics."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    dataset = ShardDataset.open(config.shards)  # refuse to start on a missing or truncated shard, naming it
    if config.verify_checksums and (problems := shard_problems(config.shards, dataset.card)):
        raise ShardError("refusing to train on corrupt shards:\n" + "\n".join(problems))
    run_dir = config.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    config = config.model_copy(update={"run_dir": run_dir, "shards": config.shards.resolve()})
    write_config(config, run_dir / "train_config.yaml")
    init_ray(address)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.model_dump(mode="json")},
        scaling_config=ScalingConfig(
            num_workers=config.num_workers, use_gpu=config.use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=run_dir.name,
            storage_path=str(run_dir.parent),  # Ray Train keeps its checkpoints in run_dir too
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise TrainError(f"training failed: {result.error}") from result.error
    return json.loads((run_dir / "metrics_test.json").read_text())


def load_model(run_dir: Path) -> tuple[ProtoMask, list[str]]:
    """Rebuild the exported model (``model.pt`` + ``model_config.json``) with ``weights_only=True``."""
    meta_path, weights_path = run_dir / "model_config.json", run_dir / "model.pt"
    for path in (meta_path, weights_path):
        if not path.is_file():
            raise TrainError(f"{path}: missing (has training in {run_dir} finished?)")
    meta = json.loads(meta_path.read_text())
    model = ProtoMask(ModelConfig.model_validate(meta["model"]), len(meta["classes"]))
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refused, corrupt file
        raise TrainError(f"{weights_path}: cannot load as a plain state dict: {exc}") from exc
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise TrainError(f"{weights_path}: non-finite values in {bad}")
    if meta["num_prototypes"] != model.prototypes.shape[0]:
        model.prune(torch.arange(model.prototypes.shape[0]) < meta["num_prototypes"])
    model.load_state_dict(state)
    return model.eval(), meta["classes"]


def run_evaluate(run_dir: Path, shards: Path, split: str = "test", batch_size: int = 32) -> dict:
    """Metrics of the exported model on one split of a shard directory; writes ``eval_<split>.json``."""
    model, classes = load_model(run_dir)
    dataset = ShardDataset.open(shards)
    if dataset.classes != classes:
        raise TrainError(f"{shards}: classes differ from the model's ({len(dataset.classes)} vs {len(classes)})")
    train_config = TrainConfig.model_validate(_yaml(run_dir / "train_config.yaml"))
    keys = split_keys(dataset, train_config.data.val_fraction, train_config.seed)[split]
    data = DataConfig(batch_size=batch_size, loader_threads=min(2, os.cpu_count() or 1))
    stream = ShardStream(dataset, keys, data, model.config.input_size, False, 0, 1, 0,
                         whole_image=model.config.regions == "patches")
    p = predict(model, stream, torch.device("cpu"))
    top = p["similarities"].topk(min(TOP_K, model.prototypes.shape[0]), dim=1).indices
    result = {
        "split": split, "regions": model.config.regions,
        **classification_metrics(p["logits"], p["labels"]), **compactness(model),
        **contrastivity(model.prototypes, top, p["labels"]),
    }
    result.update(part_metrics(model, dataset, keys, TOP_K))  # zeros when the shards carry no parts
    (run_dir / f"eval_{split}.json").write_text(json.dumps(result, indent=1))
    return result


def _yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())

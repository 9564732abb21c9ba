"""The per-worker training loop (runs inside every Ray Train worker), readable top to bottom:

    open shards → split → model → resume from the last checkpoint
    for each epoch: phase (warm-up | joint | last layer) → [push before the first last-layer epoch]
                    → train → validate → checkpoint + metrics (ray.train.report)
    → test → export (rank 0)
"""

from __future__ import annotations

import csv
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from schemas.config import TrainConfig
from schemas.version import FORMAT_VERSION
from training.data import ShardDataset, ShardStream, split_keys
from training.losses import class_weights, total_loss
from training.metrics import classification_metrics, compactness, gather_predictions
from training.model import ProtoMask
from training.push import prune_prototypes, push_prototypes

CHECKPOINT = "checkpoint.pt"
PHASE_GROUPS = {  # which parameter groups each phase trains
    "warmup": ("add_on", "prototypes"),
    "joint": ("backbone", "add_on", "prototypes"),
    "last_layer": ("last_layer",),
}


def phase_of(epoch: int, config: TrainConfig) -> str:
    s = config.schedule
    if epoch < s.warmup_epochs:
        return "warmup"
    if epoch < s.warmup_epochs + s.joint_epochs:
        return "joint"
    return "last_layer"


def total_epochs(config: TrainConfig) -> int:
    s = config.schedule
    return s.warmup_epochs + s.joint_epochs + s.last_layer_epochs


def set_trainable(model: ProtoMask, phase: str, config: TrainConfig) -> None:
    """Freeze everything but the phase's groups (the add-on stays frozen in parity mode)."""
    trainable = set(PHASE_GROUPS[phase]) - ({"add_on"} if config.parity.frozen_addon else set())
    for name, params in model.parameter_groups().items():
        for p in params:
            p.requires_grad_(name in trainable)


def make_optimizers(model: ProtoMask, config: TrainConfig) -> dict[str, torch.optim.Optimizer]:
    s, g = config.schedule, model.parameter_groups()
    addon = [] if config.parity.frozen_addon else [{"params": g["add_on"], "lr": s.lr_warmup}]
    joint_addon = [] if config.parity.frozen_addon else [{"params": g["add_on"], "lr": s.lr_addon}]
    return {
        "warmup": torch.optim.Adam(addon + [{"params": g["prototypes"], "lr": s.lr_warmup}]),
        "joint": torch.optim.Adam(
            [{"params": g["backbone"], "lr": s.lr_backbone}, *joint_addon, {"params": g["prototypes"], "lr": s.lr_prototypes}]
        ),
        "last_layer": torch.optim.Adam(g["last_layer"], lr=s.lr_last_layer),
    }


def checkpoint_state(model: ProtoMask, optimizers: dict, scheduler, epoch: int, pushed: bool, config: TrainConfig) -> dict:
    """A plain dict of tensors and JSON-able values: loadable with ``torch.load(weights_only=True)``."""
    return {
        "format_version": FORMAT_VERSION,
        "model": model.state_dict(),
        "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,  # epochs completed
        "phase": phase_of(epoch - 1, config) if epoch else "start",  # phase of the last completed epoch
        "pushed": pushed,
        "num_prototypes": int(model.prototypes.shape[0]),
        "config": config.model_dump_json(),
    }


def _wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP over the currently trainable parameters (re-wrapped whenever the phase changes)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def train_one_epoch(model, net, stream, optimizer, config, phase, weights, device) -> dict[str, float]:
    """One pass over this worker's part of the train split; returns epoch means over all workers."""
    model.train()
    sums: dict[str, float] = {}
    correct = seen = 0
    start = time.perf_counter()
    for batch in stream:
        crops, valid, labels = batch["crops"].to(device), batch["valid"].to(device), batch["label"].to(device)
        out = net(crops, valid)
        loss, terms = total_loss(out, labels, model, config.loss, phase, weights, config.parity.detached_diversity)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = len(labels)
        for k, v in {"loss": float(loss.detach()), **terms}.items():
            sums[k] = sums.get(k, 0.0) + v * n
        correct += int((out.logits.argmax(1) == labels).sum())
        seen += n
    elapsed = time.perf_counter() - start
    keys = sorted(sums)
    totals = _all_sum([sums[k] for k in keys] + [correct, seen, elapsed], device)
    n_all = max(totals[-2], 1)
    world = dist.get_world_size() if dist.is_initialized() else 1
    result = {f"train_{k}": totals[i] / n_all for i, k in enumerate(keys)}
    result["train_accuracy"] = totals[-3] / n_all
    result["images_per_s"] = totals[-2] / max(totals[-1] / world, 1e-9)  # all workers' images per wall second
    return result


@torch.no_grad()
def predict(model: ProtoMask, stream, device: torch.device) -> dict:
    """Logits [N, C], similarities [N, P], labels [N] and keys of this worker's part of a split."""
    model.eval()
    logits, sims, labels, keys = [], [], [], []
    for batch in stream:
        out = model(batch["crops"].to(device), batch["valid"].to(device))
        logits.append(out.logits.float().cpu())
        sims.append(out.similarities.float().cpu())
        labels.append(batch["label"])
        keys += batch["key"]
    c, p = model.num_classes, model.prototypes.shape[0]
    return {
        "logits": torch.cat(logits) if logits else torch.zeros(0, c),
        "similarities": torch.cat(sims) if sims else torch.zeros(0, p),
        "labels": torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
        "keys": keys,
    }


def evaluate_stream(model: ProtoMask, stream, device: torch.device) -> dict[str, float]:
    """Classification metrics of one split, gathered over all workers."""
    p = predict(model, stream, device)
    return classification_metrics(*gather_predictions(p["logits"], p["labels"], p["keys"])[:2])


class MetricsLog:
    """Per-epoch metrics: printed, appended to metrics.csv and written to TensorBoard (rank 0 only)."""

    def __init__(self, run_dir: Path) -> None:
        from tensorboardX import SummaryWriter

        self.csv = run_dir / "metrics.csv"
        self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, row: dict) -> None:
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        rows = list(csv.DictReader(self.csv.open())) if self.csv.is_file() else []
        rows = [r for r in rows if int(r["epoch"]) < row["epoch"]] + [row]  # a resumed epoch replaces its row
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with self.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        for k, v in row.items():
            if isinstance(v, float):
                self.tb.add_scalar(k, v, row["epoch"])
        self.tb.flush()


def train_loop_per_worker(loop_config: dict) -> None:
    """Entry point of every Ray Train worker."""
    import ray.train
    import ray.train.torch

    config = TrainConfig.model_validate(loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(config.seed)

    dataset = ShardDataset.open(config.shards)
    splits = split_keys(dataset, config.data.val_fraction, config.seed)
    label_of = {r["key"]: r["label"] for r in dataset.rows}
    counts = [sum(label_of[k] == c for k in splits["train"]) for c in range(dataset.num_classes)]
    weights = class_weights(counts).to(device) if config.loss.class_balanced else None

    def stream(split: str, train: bool) -> ShardStream:
        return ShardStream(dataset, splits[split], config.data, config.model.input_size, train, rank, world,
                           config.seed, whole_image=config.model.regions == "patches")

    model = ProtoMask(config.model, dataset.num_classes)
    start_epoch, pushed = 0, False
    checkpoint = ray.train.get_checkpoint()
    state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / CHECKPOINT, map_location="cpu", weights_only=True)
        if state["num_prototypes"] != model.prototypes.shape[0]:  # the run was pruned before this checkpoint
            model.prune(torch.arange(model.prototypes.shape[0]) < state["num_prototypes"])
        model.load_state_dict(state["model"])
        start_epoch, pushed = state["epoch"], state["pushed"]
    model.to(device)
    optimizers = make_optimizers(model, config)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizers["joint"], config.schedule.step_size, config.schedule.gamma)
    if state is not None:
        for k, o in optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        scheduler.load_state_dict(state["scheduler"])
        print(f"resumed from epoch {start_epoch} (push done: {pushed})", flush=True)
        if rank == 0:
            with (config.run_dir / "events.jsonl").open("a") as f:
                f.write(json.dumps({"event": "resume", "epoch": start_epoch, "time": time.time()}) + "\n")

    run_dir = config.run_dir
    log = MetricsLog(run_dir) if rank == 0 else None
    train_stream, val_stream = stream("train", True), stream("val", False)
    net, net_phase = model, None
    for epoch in range(start_epoch, total_epochs(config)):
        phase = phase_of(epoch, config)
        if phase == "last_layer" and not pushed:
            push(model, optimizers, config, stream, device, rank)
            pushed, net_phase = True, None
        if phase != net_phase:
            set_trainable(model, phase, config)
            net, net_phase = _wrap(model, device), phase
        train_stream.set_epoch(epoch)
        row = {"epoch": epoch, "phase": phase, **train_one_epoch(model, net, train_stream, optimizers[phase],
                                                                   config, phase, weights, device)}
        if phase == "joint":
            scheduler.step()
        row.update({f"val_{k}": v for k, v in evaluate_stream(model, val_stream, device).items() if k != "n"})
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                log.write(row)
                torch.save(checkpoint_state(model, optimizers, scheduler, epoch + 1, pushed, config), Path(d) / CHECKPOINT)
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report({k: v for k, v in row.items() if k != "phase"}, checkpoint=ckpt)

    if not pushed:  # no last-layer epochs: push after the joint phase
        push(model, optimizers, config, stream, device, rank)
    test = evaluate_stream(model, stream("test", False), device)
    if rank == 0:
        export(model, config, dataset.classes, run_dir)
        result = {"test": test, "compactness": compactness(model), "epochs": total_epochs(config)}
        (run_dir / "metrics_test.json").write_text(json.dumps(result, indent=1))
        print("test " + " ".join(f"{k}={v:.4g}" for k, v in test.items()), flush=True)


def push(model: ProtoMask, optimizers: dict, config: TrainConfig, stream, device: torch.device, rank: int) -> None:
    """Project every prototype onto its nearest training crop (all workers), optionally prune; log it."""
    log: dict = {"push": push_prototypes(model, stream("train", False), device, config.parity.push_last_batch)}
    if config.schedule.prune:
        s = config.schedule
        log["prune"] = prune_prototypes(model, stream("train", False), device, s.prune_k, s.prune_threshold)
        optimizers["last_layer"] = torch.optim.Adam(model.parameter_groups()["last_layer"], lr=s.lr_last_layer)
    if rank == 0:
        (config.run_dir / "push_log.json").write_text(json.dumps(log, indent=1))


def export(model: ProtoMask, config: TrainConfig, classes: list[str], run_dir: Path) -> None:
    """``model.pt`` (plain state dict) + ``model_config.json`` (what is needed to rebuild it)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, run_dir / "model.pt")
    meta = {
        "format_version": FORMAT_VERSION,
        "model": config.model.model_dump(mode="json"),
        "classes": classes,
        "num_prototypes": int(model.prototypes.shape[0]),
        "shards": str(config.shards),
    }
    (run_dir / "model_config.json").write_text(json.dumps(meta, indent=1))

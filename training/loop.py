"""The per-worker training loop (runs inside every Ray Train worker), readable top to bottom:

    open shards → split → model → micro-batch → resume from the last checkpoint
    for each epoch: phase (pre-train | warm-up | joint | last layer)
                    → [place prototypes on crops before the first prototype epoch, push before the first
                       last-layer epoch] → train [→ the joint or last-layer phase's weight average into the
                       model after its last epoch] → validate → checkpoint + metrics (ray.train.report)
    → test → export (rank 0)

One optimiser step takes ``data.batch_size`` images over all workers, whatever their number: each worker
reads its share as one batch and runs it as micro-batches (``training.memory``), accumulating gradients.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import resource
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from schemas.config import TrainConfig
from schemas.storage import Location, append, list_files, put, read_text_if_present
from schemas.version import FORMAT_VERSION
from training.averaging import WeightAverage, decay_per_step
from training.data import ShardDataset, ShardStream, split_keys
from training.evaluate import classification, evaluate_split, write_metrics
from training.export import export_model
from training.losses import class_weights, total_loss
from training.memory import plan_micro_batch
from training.model import LinearHead, Model, PIPNet, ProtoMask, ProtoPool, build_model, gumbel_scale
from training.progress import Reporter
from training.push import (addon_from_classifier, place_on_crops, prune_prototypes, push_distinct,
                           push_prototypes)

CHECKPOINT = "checkpoint.pt"
PHASES = ("pretrain", "warmup", "joint", "last_layer")
AVERAGED_PHASES = ("joint", "last_layer")  # schedule.ema_half_life: each keeps its own average (push lies between)


def phase_of(epoch: int, config: TrainConfig) -> str:
    """Prototype heads: pre-train the backbone, warm up, train jointly, fine-tune the last layer (each
    phase its number of epochs). The linear head trains everything in every epoch ("joint")."""
    if config.model.head == "linear":
        return "joint"
    s = config.schedule
    end = 0
    for phase, epochs in zip(PHASES, (s.pretrain_epochs, s.warmup_epochs, s.joint_epochs, s.last_layer_epochs)):
        end += epochs
        if epoch < end:
            return phase
    return "last_layer"


def joint_epoch(epoch: int, config: TrainConfig) -> int:
    """The index of ``epoch`` within the joint phase."""
    return epoch - config.schedule.pretrain_epochs - config.schedule.warmup_epochs


def total_epochs(config: TrainConfig) -> int:
    s = config.schedule
    return s.pretrain_epochs + s.warmup_epochs + s.joint_epochs + s.last_layer_epochs


def phase_learning_rates(config: TrainConfig) -> dict[str, dict[str, float]]:
    """Phase → the parameter groups it trains → learning rate (the add-on stays frozen in parity mode)."""
    s = config.schedule
    rates = {
        "pretrain": {"backbone": s.lr_backbone, "classifier": s.lr_addon},
        "warmup": {"add_on": s.lr_warmup, "prototypes": s.lr_warmup},
        "joint": {"backbone": s.lr_backbone, "add_on": s.lr_addon, "prototypes": s.lr_prototypes,
                  "classifier": s.lr_addon},
        "last_layer": {"last_layer": s.lr_last_layer},
    }
    if config.model.kind == "pipnet":  # self-supervised warm-up of the backbone, then backbone and last layer
        rates["warmup"] = {"backbone": s.lr_warmup}
        rates["joint"] = {"backbone": s.lr_backbone, "last_layer": s.lr_last_layer}
    if s.joint_last_layer:
        rates["joint"]["last_layer"] = s.lr_last_layer
    if config.parity.frozen_addon:
        for groups in rates.values():
            groups.pop("add_on", None)
    return rates


def set_trainable(model: Model, phase: str, config: TrainConfig) -> None:
    """Freeze everything but the phase's groups."""
    trainable = phase_learning_rates(config)[phase]
    for name, params in model.parameter_groups().items():
        for p in params:
            p.requires_grad_(name in trainable)


def make_optimizers(model: Model, config: TrainConfig, *, pretrainer: LinearHead | None = None
                    ) -> dict[str, torch.optim.Optimizer]:
    """One Adam per phase that has parameters in this model (the pre-training phase: in ``pretrainer``)."""
    optimizers = {}
    for phase, rates in phase_learning_rates(config).items():
        module = pretrainer if phase == "pretrain" else model
        groups = module.parameter_groups() if module is not None else {}
        params = [{"params": groups[name], "lr": lr, "name": name} for name, lr in rates.items() if groups.get(name)]
        if params:
            optimizers[phase] = torch.optim.Adam(params)
    return optimizers


def make_schedulers(optimizers: dict[str, torch.optim.Optimizer], config: TrainConfig
                    ) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
    """Step decay per epoch of the joint phase; with ``schedule.lr_decay_from: pretrain`` also per epoch of
    pre-training, the joint backbone group going on from the pre-training's last rate."""
    s = config.schedule
    continued = s.lr_decay_from == "pretrain"
    schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler] = {}
    if continued and "pretrain" in optimizers:
        schedulers["pretrain"] = torch.optim.lr_scheduler.StepLR(optimizers["pretrain"], s.step_size, s.gamma)
    if "joint" in optimizers:
        def decay(offset: int):
            return lambda epoch: s.gamma ** ((epoch + offset) // s.step_size)

        offset = s.pretrain_epochs if continued else 0
        schedulers["joint"] = torch.optim.lr_scheduler.LambdaLR(
            optimizers["joint"], [decay(offset if g["name"] == "backbone" else 0)
                                  for g in optimizers["joint"].param_groups])
    return schedulers


def checkpoint_state(model: Model, optimizers: dict, schedulers: dict, epoch: int, config: TrainConfig, *, pushed: bool,
                     placed: bool = True, pretrainer: LinearHead | None = None,
                     average: WeightAverage | None = None) -> dict:
    """A plain dict of tensors and JSON-able values: loadable with ``torch.load(weights_only=True)``."""
    return {
        **({"pretrain_classifier": pretrainer.classifier.state_dict()} if pretrainer is not None else {}),
        **({"weight_average": average.average} if average is not None else {}),
        "format_version": FORMAT_VERSION,
        "model": model.state_dict(),
        "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
        "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
        "epoch": epoch,  # epochs completed
        "phase": phase_of(epoch - 1, config) if epoch else "start",  # phase of the last completed epoch
        "pushed": pushed,
        "prototypes_placed": placed,  # schedule.prototype_init done (or not asked for)
        "num_prototypes": model.num_prototypes if isinstance(model, ProtoMask) else 0,
        "config": config.model_dump_json(),
    }


def _wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP over the currently trainable parameters (re-wrapped whenever the phase changes)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def freeze_batchnorm_statistics(model: nn.Module) -> None:
    """BatchNorm layers whose parameters are frozen in this phase (the backbone's in warm-up and last-layer epochs)
    run in eval mode: they normalise with their running statistics and stop updating them, so the layers after
    them train on the embeddings that push projected onto and that evaluation sees."""
    for m in model.modules():
        params = list(m.parameters())
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and params and not any(p.requires_grad for p in params):
            m.eval()


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def train_one_epoch(model: Model, net: nn.Module, stream: Iterable[dict], optimizer: torch.optim.Optimizer,
                    config: TrainConfig, phase: str, weights: torch.Tensor | None, device: torch.device,
                    *, micro_batch: int, warmup_progress: float = 1.0,
                    average: WeightAverage | None = None) -> dict[str, float]:
    """One pass over this worker's part of the train split; returns epoch means over all workers.

    Each batch of the stream is this worker's share of one optimiser step; it runs as micro-batches of at
    most ``micro_batch`` images, each loss weighted by its share of the batch, so the accumulated gradient
    is the batch's (DDP averages it over workers at the last micro-batch only). ``warmup_progress``: the share
    of the warm-up done by the end of this epoch (PIP-Net's alignment ramp); ``average``: updated after every
    step."""
    model.train()
    if not config.parity.train_mode_frozen_batchnorm:
        freeze_batchnorm_statistics(model)
    last_layer_l1 = "last_layer" in phase_learning_rates(config)[phase]  # L1 whenever the last layer trains
    sums: dict[str, float] = {}
    correct = seen = 0
    step_classes = []  # per step: which classes this worker's share holds
    start = time.perf_counter()
    for batch in stream:
        optimizer.zero_grad(set_to_none=True)
        n_step = len(batch["label"])
        step_classes.append(torch.zeros(model.num_classes).index_fill_(0, batch["label"], 1))
        starts = range(0, n_step, micro_batch)
        for start_index in starts:
            part = slice(start_index, start_index + micro_batch)
            views = [batch[name][part] for name in ("crops", "crops2") if name in batch]  # PIP-Net: two views
            crops, valid = torch.cat(views).to(device), batch["valid"][part].repeat(len(views), 1).to(device)
            labels = batch["label"][part].to(device)
            n = len(labels)
            last = start_index == starts[-1]
            with contextlib.nullcontext() if last or net is model else net.no_sync():
                out = net(crops, valid)
                loss, terms = total_loss(out, labels.repeat(len(views)), model, config.loss, phase, weights,
                                         detached_diversity=config.parity.detached_diversity,
                                         last_layer_l1=last_layer_l1, warmup_progress=warmup_progress)
                (loss * (n / n_step)).backward()
            for k, v in {"loss": float(loss.detach()), **terms}.items():
                sums[k] = sums.get(k, 0.0) + v * n
            correct += int((out.logits[:n].argmax(1) == labels).sum())
            seen += n
        optimizer.step()
        if isinstance(model, ProtoMask):
            model.after_step(phase)
        if average is not None:
            average.update(model)
    elapsed = time.perf_counter() - start
    keys = sorted(sums)
    totals = _all_sum([sums[k] for k in keys] + [correct, seen, elapsed], device)
    n_all = max(totals[-2], 1)
    world = dist.get_world_size() if dist.is_initialized() else 1
    result = {f"train_{k}": totals[i] / n_all for i, k in enumerate(keys)}
    result["train_accuracy"] = totals[-3] / n_all
    result["images_per_s"] = totals[-2] / max(totals[-1] / world, 1e-9)  # all workers' images per wall second
    if step_classes:  # distinct classes per optimiser step, over all workers (every worker takes the same steps)
        presence = torch.stack(step_classes).to(device)
        if dist.is_initialized():
            dist.all_reduce(presence, op=dist.ReduceOp.MAX)
        result["classes_per_step"] = float(presence.sum(1).mean())
    return result


class MetricsLog:
    """Per-epoch metrics: appended to metrics.csv and written to TensorBoard (rank 0 only). With the run on
    S3, TensorBoard writes to a local temp folder whose event files are uploaded after every epoch."""

    def __init__(self, run_dir: Location) -> None:
        from tensorboardX import SummaryWriter

        self.csv, self.tb_dir = run_dir / "metrics.csv", run_dir / "tensorboard"
        self.staging = None if run_dir.is_local else tempfile.TemporaryDirectory(prefix="tensorboard")
        self.tb = SummaryWriter(str(self.tb_dir.local if self.staging is None else self.staging.name))

    def write(self, row: dict) -> None:
        rows = list(csv.DictReader(io.StringIO(read_text_if_present(self.csv) or "", newline="")))
        rows = [r for r in rows if int(r["epoch"]) < row["epoch"]] + [row]  # a resumed epoch replaces its row
        fields = list(dict.fromkeys(k for r in rows for k in r))
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        put(self.csv, text.getvalue())
        for k, v in row.items():
            if isinstance(v, float):
                self.tb.add_scalar(k, v, row["epoch"])
        self.tb.flush()
        self._upload()

    def _upload(self) -> None:
        """The staged TensorBoard event files, each whole, into the run's tensorboard/ (S3 only)."""
        if self.staging is not None:
            staged = Location.parse(self.staging.name)
            for name in list_files(staged):
                put(self.tb_dir / name, (staged.local / name).read_bytes())

    def close(self) -> None:
        self.tb.close()
        self._upload()
        if self.staging is not None:
            self.staging.cleanup()


def train_loop_per_worker(loop_config: dict) -> None:
    """Entry point of every Ray Train worker."""
    import ray.train
    import ray.train.torch

    config = TrainConfig.model_validate(loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(config.seed)
    reporter = Reporter(loop_config.get("board") if rank == 0 else None)

    dataset = ShardDataset.open(config.shards)
    splits = split_keys(dataset, config.data.val_fraction, config.seed)
    label_of = {r["key"]: r["label"] for r in dataset.rows}
    counts = [sum(label_of[k] == c for k in splits["train"]) for c in range(dataset.num_classes)]
    weights = class_weights(counts).to(device) if config.loss.class_balanced else None

    model = build_model(config.model, dataset.num_classes)
    pretrainer = None  # the linear head on the prototype model's own backbone
    if isinstance(model, ProtoMask) and config.schedule.pretrain_epochs:
        pretrainer = LinearHead(config.model, dataset.num_classes, trunk=(model.backbone, model.channels))
        if config.loss.auxiliary:
            model.auxiliary = pretrainer.classifier
    step_share = config.data.batch_size // world  # images per optimiser step on this worker
    micro_batch = plan_micro_batch(model, config, dataset.masks_per_image, step_share, device,
                                   workers_on_node=context.get_local_world_size())
    views = 2 if isinstance(model, PIPNet) else 1  # PIP-Net trains on two views of each image at once
    micro_batch = max(1, micro_batch // views)

    def stream(split: str, train: bool, *, whole_image: bool = False) -> ShardStream:
        """The split's crops as the model reads them; ``whole_image``: each whole image instead."""
        return ShardStream.for_model(dataset, splits[split], config.data, config.model, whole_image=whole_image,
                                     batch_size=step_share if train else micro_batch, train=train, rank=rank,
                                     world_size=world, seed=config.seed, views=views if train else 1)

    start_epoch, pushed = 0, False
    s = config.schedule  # after pre-training: the add-on and/or the prototypes start from the pre-trained head
    placed = not isinstance(model, ProtoMask) or (s.prototype_init == "uniform" and s.addon_init == "random")
    checkpoint = ray.train.get_checkpoint()
    state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / CHECKPOINT, map_location="cpu", weights_only=True)
        if isinstance(model, ProtoMask) and state["num_prototypes"] != model.num_prototypes:
            model.prune(torch.arange(model.num_prototypes) < state["num_prototypes"])  # pruned before
        model.load_state_dict(state["model"])
        if pretrainer is not None:
            pretrainer.classifier.load_state_dict(state["pretrain_classifier"])
        start_epoch, pushed, placed = state["epoch"], state["pushed"], state["prototypes_placed"]
    model.to(device)
    if pretrainer is not None:
        pretrainer.to(device)
    decay = decay_per_step(s.ema_half_life, math.ceil(len(splits["train"]) / config.data.batch_size)) \
        if s.ema_half_life else 0.0
    average = None  # schedule.ema_half_life: the current phase's weight average, until the model takes it
    if state is not None and "weight_average" in state:
        average = WeightAverage(model, decay, average=state["weight_average"])
    optimizers = make_optimizers(model, config, pretrainer=pretrainer)
    schedulers = make_schedulers(optimizers, config)
    if state is not None:
        for k, o in optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        for k, sched in schedulers.items():
            sched.load_state_dict(state["schedulers"][k])
        reporter.note(f"resumed from the checkpoint of epoch {start_epoch} (push done: {pushed})")
        if rank == 0:
            append(config.run_dir / "events.jsonl",
                   json.dumps({"event": "resume", "epoch": start_epoch, "time": time.time()}) + "\n")
    reporter.note(f"{config.data.batch_size} images per step: {step_share} per worker on {world} workers, in "
                  f"micro-batches of {micro_batch}")

    run_dir = config.run_dir
    log = MetricsLog(run_dir) if rank == 0 else None
    image_pretrain = pretrainer is not None and s.pretrain_on == "image"  # pre-training reads whole images
    streams = {on_images: (stream("train", True, whole_image=on_images), stream("val", False, whole_image=on_images))
               for on_images in {False, image_pretrain}}
    has_prototypes = isinstance(model, ProtoMask)
    net, net_phase = model, None
    epochs = total_epochs(config)
    for epoch in range(start_epoch, epochs):
        phase = phase_of(epoch, config)
        if phase in ("warmup", "joint") and not placed:
            sync_buffers(model)
            init: dict = {}
            if s.addon_init == "classifier":
                reporter.note("starting the add-on on the pre-trained classifier's leading directions")
                init["addon"] = addon_from_classifier(model, pretrainer, dataset, splits["train"], device,
                                                      batch_size=micro_batch)
            if s.prototype_init == "crops":
                reporter.note("placing each prototype on the training crop its class scores highest")
                init["prototypes"] = place_on_crops(model, pretrainer, dataset, splits["train"], device,
                                                    batch_size=micro_batch)
            if rank == 0:
                put(run_dir / "prototype_init.json", json.dumps(init, indent=1))
            placed, net_phase = True, None
        if phase == "last_layer" and not pushed and model.pushes:
            push(model, optimizers, config, stream, device, rank, reporter)
            pushed, net_phase = True, None
        elif phase == "joint" and s.push_every and has_prototypes and model.pushes \
                and (n := joint_epoch(epoch, config)) and n % s.push_every == 0:
            push(model, optimizers, config, stream, device, rank, reporter, epoch=epoch)
            average = None  # the prototypes moved: the average starts again from the pushed model
        if phase in AVERAGED_PHASES and s.ema_half_life and average is None:
            average = WeightAverage(model, decay)
        if isinstance(model, ProtoPool) and phase in ("warmup", "joint"):
            model.gumbel_scale.fill_(gumbel_scale(epoch - s.pretrain_epochs, s.gumbel_epochs))
        module = pretrainer if phase == "pretrain" else model
        train_stream, val_stream = streams[phase == "pretrain" and image_pretrain]
        if phase != net_phase:
            set_trainable(module, phase, config)
            net, net_phase = _wrap(module, device), phase
        train_stream.set_epoch(epoch)
        row = {"epoch": epoch, "phase": phase,
               **train_one_epoch(module, net, reporter.track(train_stream, f"epoch {epoch + 1}/{epochs} {phase}"),
                                 optimizers[phase], config, phase, weights, device, micro_batch=micro_batch,
                                 warmup_progress=(epoch - s.pretrain_epochs + 1) / max(s.warmup_epochs, 1),
                                 average=average)}
        if phase in schedulers:
            schedulers[phase].step()
        if average is not None and (epoch + 1 == epochs or phase_of(epoch + 1, config) != phase):
            reporter.note("the model takes its weight average (schedule.ema_half_life)")
            average.apply(model)
            average = None
        sync_buffers(module)
        with average.applied(model) if average is not None else contextlib.nullcontext():
            val = classification(module, reporter.track(val_stream, "validation"), device)
        row.update({f"val_{k}": v for k, v in val.items() if k != "n"})
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                log.write(row)
                torch.save(checkpoint_state(model, optimizers, schedulers, epoch + 1, config, pushed=pushed,
                                            placed=placed, pretrainer=pretrainer, average=average),
                           Path(d) / CHECKPOINT)
                ckpt = ray.train.Checkpoint.from_directory(d)
            reporter.epoch(row, epochs)
            ray.train.report({k: v for k, v in row.items() if k != "phase"}, checkpoint=ckpt)

    if log is not None:
        log.close()
    if has_prototypes and model.pushes and not pushed:  # no last-layer epochs: push after the joint phase
        push(model, optimizers, config, stream, device, rank, reporter)
    sync_buffers(model)  # every rank evaluates the model that rank 0 exports

    def track_saliency(samples: Iterator, n: int) -> Iterator:
        return reporter.track(samples, "test: saliency metrics", total=n, unit="image")

    test = evaluate_split(model, reporter.track(stream("test", False), "test"), device, dataset=dataset,
                          keys=splits["test"], track=track_saliency)
    peak = _peak_memory_mib(device)
    if rank == 0:
        export_model(model, config.model, dataset.classes, run_dir, shards=config.shards)
        write_metrics(run_dir, "test", test, epochs=epochs, micro_batch=micro_batch, peak_memory_mib=peak)


def sync_buffers(model: nn.Module) -> None:
    """Rank 0's BatchNorm statistics on every rank. DDP broadcasts buffers at the start of each forward, so
    after the last training step each rank holds statistics updated by its own last batch; without this,
    ranks would evaluate slightly different models."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def _peak_memory_mib(device: torch.device) -> list[float]:
    """Every worker's peak memory in MiB, in rank order: the process's resident set size on CPU, the
    allocator's peak on a GPU. Every rank must call it when distributed."""
    if device.type == "cuda":
        mine = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    if not dist.is_initialized():
        return [round(mine, 1)]
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, round(mine, 1))
    return every


def push(model: ProtoMask, optimizers: dict, config: TrainConfig, stream, device: torch.device, rank: int,
         reporter: Reporter, *, epoch: int | None = None) -> None:
    """Project every prototype onto its nearest training crop (all workers) and log it: the last push (``epoch``
    None) in ``push_log.json``, after optional pruning; one within the joint phase (``schedule.push_every``) in
    ``push_log_epoch_<epoch>.json``, the epoch it precedes (the reference's name)."""
    sync_buffers(model)
    batches = reporter.track(stream("train", False), "push")
    log: dict = {"push": push_distinct(model, batches, device) if config.schedule.push_distinct
                 else push_prototypes(model, batches, device, config.parity.push_last_batch)}
    if epoch is not None:
        moved = [e["distance"] for e in log["push"] if e["key"] is not None]
        reporter.note(f"pushed before epoch {epoch + 1}: the prototypes moved by a mean squared distance of "
                      f"{sum(moved) / max(len(moved), 1):.3f}")
        if rank == 0:
            put(config.run_dir / f"push_log_epoch_{epoch}.json", json.dumps(log, indent=1))
        return
    if config.schedule.prune:
        s = config.schedule
        log["prune"] = prune_prototypes(model, reporter.track(stream("train", False), "prune"), device, s.prune_k,
                                        s.prune_threshold)
        optimizers["last_layer"] = torch.optim.Adam(model.parameter_groups()["last_layer"], lr=s.lr_last_layer)
    if rank == 0:
        put(config.run_dir / "push_log.json", json.dumps(log, indent=1))

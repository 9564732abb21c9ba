"""What push costs: test balanced accuracy of one trained prototype model just before push and just after it
(before any last-layer epoch), from its checkpoint at the end of the joint phase.

    python bench/push_cost.py --run-dir R     # R: a run trained with schedule.last_layer_epochs 0

With no last-layer epochs the run's newest checkpoint holds the model before push (push runs after it). The
region embeddings of both splits are computed once; the product's ``push_prototypes`` (the paper's push) and
``push_distinct`` then run on them. ``--last-layer-epochs N`` then imitates the last-layer phase on those fixed
embeddings (the backbone is frozen there): the config's rate, batch size, class-balanced cross-entropy and L1
term, flipped crops embedded once more when the config flips, and the weight average (``schedule.ema_half_life``).
The product's phase draws other batches and flips: without the average the last step's weights differ by a point or
two from the product's (39.9 % where a full run ended at 41.8 %); with it, the imitation repeated two seeds' full
runs within 0.1 points (docs/real-photo-investigation.md, stop 41).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import newest_checkpoint, print_table
from schemas.config import TrainConfig, load_config
from training.averaging import WeightAverage, decay_per_step
from training.data import ShardDataset, ShardStream, split_keys
from training.losses import class_weights, total_loss
from training.metrics import classification_metrics
from training.model import ModelOutput, ProtoMask, build_model, own_weights
from training.push import push_distinct, push_prototypes

Embedded = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # region embeddings [N, K, D], validity [N, K], labels


def embed_splits(model: ProtoMask, config: TrainConfig, dataset: ShardDataset) -> dict[str, Embedded]:
    """Region embeddings of the train and test splits, and of the train split's flipped crops ("train_flipped")
    when the config flips."""
    splits = split_keys(dataset, config.data.val_fraction, config.seed)
    views = {"train": ("train", False), "test": ("test", False)}
    if config.data.augment != "none" and config.model.regions == "masks":
        views["train_flipped"] = ("train", True)
    out = {}
    for name, (split, flip) in views.items():
        stream = ShardStream.for_model(dataset, splits[split], config.data, config.model, batch_size=32, train=False)
        parts = [(model.embed(b["crops"].flip(-1) if flip else b["crops"], b["valid"]), model.region_valid(b["valid"]),
                  b["label"]) for b in stream]
        out[name] = tuple(torch.cat(p) for p in zip(*parts))
    return out


def logits(model: ProtoMask, data: Embedded) -> torch.Tensor:
    z, valid, _ = data
    d = model.distances(z).masked_fill(~valid[..., None], float("inf")).min(1).values
    return model.last_layer(model.similarity(d))


def balanced(model: ProtoMask, data: Embedded) -> float:
    return classification_metrics(logits(model, data), data[2])["balanced_accuracy"]


def last_layer_phase(model: ProtoMask, data: dict[str, Embedded], config: TrainConfig, epochs: int) -> None:
    """Train the last layer as the last-layer phase does, on the fixed embeddings (seeded shuffles and flips)."""
    z, valid, labels = data["train"]
    flipped = data.get("train_flipped", data["train"])[0]
    weights = class_weights(torch.bincount(labels, minlength=model.num_classes).tolist()) \
        if config.loss.class_balanced else None
    weight = model.last_layer.weight.requires_grad_(True)
    optimizer = torch.optim.Adam([weight], lr=config.schedule.lr_last_layer)
    generator = torch.Generator().manual_seed(config.seed)
    half_life, steps = config.schedule.ema_half_life, math.ceil(len(labels) / config.data.batch_size)
    average = WeightAverage(model.last_layer, decay_per_step(half_life, steps)) if half_life else None
    for _ in range(epochs):
        order, flip = torch.randperm(len(labels), generator=generator), torch.rand(len(labels), generator=generator) < 0.5
        for i in range(0, len(labels), config.data.batch_size):
            idx = order[i:i + config.data.batch_size]
            batch = (torch.where(flip[idx, None, None], flipped[idx], z[idx]), valid[idx], labels[idx])
            out = ModelOutput(logits(model, batch), min_distances=torch.zeros(0))  # a prototype head's output
            loss, _ = total_loss(out, labels[idx], model, config.loss, "last_layer", weights)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if average is not None:
                average.update(model.last_layer)
    weight.requires_grad_(False)
    if average is not None:
        average.apply(model.last_layer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--last-layer-epochs", type=int, default=0,
                        help="after each variant, imitate this many last-layer epochs on the fixed embeddings")
    args = parser.parse_args()
    config = load_config(TrainConfig, args.run_dir / "train_config.yaml", {})
    newest = newest_checkpoint(args.run_dir)
    state = torch.load(newest, map_location="cpu", weights_only=True)
    if state["pushed"]:
        sys.exit(f"{newest}: saved after push; train with schedule.last_layer_epochs 0 to keep the model before it")
    dataset = ShardDataset.open(config.shards)
    model = build_model(config.model, dataset.num_classes)
    model.load_state_dict(own_weights(state["model"]))
    model.eval().requires_grad_(False)
    with torch.no_grad():
        data = embed_splits(model, config, dataset)
    batches = [{"crops": z[i:i + 64], "valid": v[i:i + 64], "label": y[i:i + 64],
                "key": [f"{i + j:08d}" for j in range(len(y[i:i + 64]))]} for z, v, y in [data["train"]]
               for i in range(0, len(y), 64)]
    model.embed = lambda crops, valid=None: crops  # the batches above hold embeddings already,
    model.region_valid = lambda valid: valid  # and the validity of every region (patches: every cell)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    for name, project in (("no push", None), ("push (the paper)", push_prototypes), ("distinct push", push_distinct)):
        model.load_state_dict(start)
        row = {"prototypes": name, "mean squared push distance": "—", "distinct crops": "—"}
        if project is not None:
            log = project(model, batches, torch.device("cpu"))
            row.update({"mean squared push distance": f"{sum(e['distance'] for e in log) / len(log):.3f}",
                        "distinct crops": len({(e["key"], e["mask_index"]) for e in log})})
        row.update({"test balanced accuracy": f"{balanced(model, data['test']):.1%}",
                    "train": f"{balanced(model, data['train']):.1%}"})
        if args.last_layer_epochs:
            last_layer_phase(model, data, config, args.last_layer_epochs)
            row.update({f"test after {args.last_layer_epochs} last-layer epochs": f"{balanced(model, data['test']):.1%}",
                        "train after them": f"{balanced(model, data['train']):.1%}"})
        rows.append(row)
    print(f"{newest} ({len(data['test'][2])} test images)")
    print_table("push cost", rows)


if __name__ == "__main__":
    main()

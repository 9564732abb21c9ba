"""What push costs: test balanced accuracy of one trained prototype model just before push and just after it
(before any last-layer epoch), from its checkpoint at the end of the joint phase.

    python bench/push_cost.py --run-dir R     # R: a run trained with schedule.last_layer_epochs 0

With no last-layer epochs the run's newest checkpoint holds the model before push (push runs after it). The
region embeddings of both splits are computed once; the product's ``push_prototypes`` (the paper's push) and
``push_distinct`` then run on them. The figure after the last-layer phase comes from a full training run (the
phase trains on augmented crops); an imitation on fixed embeddings here differed from it by up to 4 points.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table
from schemas.config import TrainConfig, load_config
from training.data import ShardDataset, ShardStream, split_keys
from training.metrics import classification_metrics
from training.model import ProtoMask, build_model
from training.push import push_distinct, push_prototypes

Embedded = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # region embeddings [N, K, D], validity [N, K], labels


def embed_splits(model: ProtoMask, config: TrainConfig, dataset: ShardDataset) -> dict[str, Embedded]:
    splits = split_keys(dataset, config.data.val_fraction, config.seed)
    out = {}
    for split in ("train", "test"):
        stream = ShardStream(dataset, splits[split], config.data, input_size=config.model.input_size, batch_size=32,
                             train=False, whole_image=config.model.regions == "patches")
        parts = [(model.embed(b["crops"], b["valid"]), model.region_valid(b["valid"]), b["label"]) for b in stream]
        out[split] = tuple(torch.cat(p) for p in zip(*parts))
    return out


def logits(model: ProtoMask, data: Embedded) -> torch.Tensor:
    z, valid, _ = data
    d = model.distances(z).masked_fill(~valid[..., None], float("inf")).min(1).values
    return model.last_layer(model.similarity(d))


def balanced(model: ProtoMask, data: Embedded) -> float:
    return classification_metrics(logits(model, data), data[2])["balanced_accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    args = parser.parse_args()
    config = load_config(TrainConfig, args.run_dir / "train_config.yaml", {})
    newest = max(args.run_dir.glob("checkpoint_*/checkpoint.pt"), key=lambda p: p.parent.name)
    state = torch.load(newest, map_location="cpu", weights_only=True)
    if state["pushed"]:
        sys.exit(f"{newest}: saved after push; train with schedule.last_layer_epochs 0 to keep the model before it")
    dataset = ShardDataset.open(config.shards)
    model = build_model(config.model, dataset.num_classes)
    model.load_state_dict(state["model"])
    model.eval().requires_grad_(False)
    with torch.no_grad():
        data = embed_splits(model, config, dataset)
    batches = [{"crops": z[i:i + 64], "valid": v[i:i + 64], "label": y[i:i + 64],
                "key": [f"{i + j:08d}" for j in range(len(y[i:i + 64]))]} for z, v, y in [data["train"]]
               for i in range(0, len(y), 64)]
    model.embed = lambda crops, valid=None: crops  # the batches above hold embeddings already
    start = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    for name, project in (("no push", None), ("push (the paper)", push_prototypes), ("distinct push", push_distinct)):
        model.load_state_dict(start)
        row = {"prototypes": name, "mean squared push distance": "—", "distinct crops": "—"}
        if project is not None:
            log = project(model, batches, torch.device("cpu"))
            row.update({"mean squared push distance": f"{sum(e['distance'] for e in log) / len(log):.3f}",
                        "distinct crops": len({(e["key"], e["mask_index"]) for e in log})})
        rows.append({**row, "test balanced accuracy": f"{balanced(model, data['test']):.1%}",
                     "train": f"{balanced(model, data['train']):.1%}"})
    print(f"{newest} ({len(data['test'][2])} test images)")
    print_table("push cost", rows)


if __name__ == "__main__":
    main()

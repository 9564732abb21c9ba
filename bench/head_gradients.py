"""Why the paper's recipe underfits from scratch: at initialisation, how hard each loss term pulls on
the region embeddings of a prototype model, and how far apart its class logits are.

    .venv/bin/python bench/head_gradients.py --shards SHARDS [--config small-cpu] [--dims 64 1280]

One batch of training images from a shard directory, the config's model at each prototype dimension
(random initialisation, as the paper's head starts), and the norm of the gradient of each loss term
(weighted as in the config) with respect to the embeddings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as bench/head_gradients.py

import torch
import torch.nn.functional as F

from bench.common import print_table
from protomask.cli import config_file
from schemas.config import DataConfig, TrainConfig, load_config
from training.data import ShardDataset, ShardStream, split_keys
from training.losses import cluster_loss, separation_loss
from training.model import ProtoMask


def measure(config: TrainConfig, dims: list[int], batch_size: int) -> list[dict]:
    dataset = ShardDataset.open(config.shards)
    keys = split_keys(dataset, config.data.val_fraction, config.seed)["train"]
    stream = ShardStream.for_model(dataset, keys, DataConfig(augment=False, loader_threads=0), config.model,
                                   batch_size=batch_size, train=True, seed=config.seed)
    batch = next(iter(stream))
    crops, valid, labels = batch["crops"], batch["valid"], batch["label"]
    rows = []
    for dim in dims:
        torch.manual_seed(config.seed)
        model = ProtoMask(config.model.model_copy(update={"prototype_dim": dim}), dataset.num_classes)
        z = model.embed(crops, valid).detach().requires_grad_(True)
        d = model.distances(z).masked_fill(~model.region_valid(valid)[..., None], float("inf"))
        min_d = d.min(dim=1).values
        logits = model.last_layer(model.similarity(min_d))
        loss = config.loss
        terms = {"cross-entropy": loss.cross_entropy * F.cross_entropy(logits, labels),
                 "cluster": loss.cluster * cluster_loss(min_d, labels, model.prototype_class),
                 "separation": -loss.separation * separation_loss(min_d, labels, model.prototype_class)}
        min_d, logits = min_d.detach(), logits.detach()
        row = {"prototype dim": dim, "mean min distance": f"{float(min_d.mean()):.3g}",
               "logit spread (std over classes)": f"{float(logits.std(1).mean()):.2g}"}
        for name, term in terms.items():
            (grad,) = torch.autograd.grad(term, z, retain_graph=True)
            row[f"|grad z| {name}"] = f"{float(grad.norm()):.2g}"
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=Path, required=True)
    p.add_argument("--config", default="small-cpu")
    p.add_argument("--dims", type=int, nargs="+", default=[64, 1280])
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    config = load_config(TrainConfig, config_file(args.config), {"shards": args.shards, "run_dir": "unused"})
    print_table(f"loss-term gradients on the region embeddings at initialisation ({config.model.backbone}, "
                f"{config.model.input_size} px, {args.batch_size} images)", measure(config, args.dims, args.batch_size))


if __name__ == "__main__":
    main()

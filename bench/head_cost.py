"""What the prototype head costs on its own backbone: the test balanced accuracy of a trained prototype model
beside that of loss.auxiliary's linear head (global pool per crop, max over crops, linear) on the same backbone,
and where the prototype head takes its evidence: per test image, from how many distinct regions (crops or patch
cells) the prototypes of the image's class take their nearest, and the largest share of them on one region.

    python bench/head_cost.py --run-dir R [R ...]     # runs trained with loss.auxiliary > 0 (configs/small-cpu.yaml)

The auxiliary head trains beside the prototypes in the joint phase and is never exported, so it is read from the
run's newest checkpoint, which after the last epoch holds the exported model too. The difference between the two
columns is what the prototype head costs; the difference between the linear head here and a crops-only black-box
trained on its own (``model.head: linear``) is what sharing the backbone with the prototypes costs it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or with python -m

from bench.common import fmt, newest_checkpoint, print_table, write_json
from schemas.config import TrainConfig, load_config
from training.data import ShardDataset, ShardStream, split_keys
from training.metrics import classification_metrics
from training.model import LinearHead, ProtoMask, build_model


def evidence_spread(nearest: torch.Tensor, prototype_class: torch.Tensor, labels: torch.Tensor
                    ) -> tuple[list[int], list[float]]:
    """Per image: the distinct regions among its own class's prototypes' nearest ones, and the largest share of
    those prototypes on one region (``nearest`` [B, P], as ``ModelOutput.nearest_mask``)."""
    regions, shares = [], []
    for near, label in zip(nearest, labels):
        own = near[prototype_class == label]
        regions.append(len(own.unique()))
        shares.append(torch.bincount(own).max().item() / len(own))
    return regions, shares


def head_accuracies(run_dir: Path) -> dict:
    """Epoch and test balanced accuracy of the prototype head and of the auxiliary linear head, from ``run_dir``'s
    newest checkpoint."""
    config = load_config(TrainConfig, run_dir / "train_config.yaml", {})
    if config.model.head != "prototypes" or not config.loss.auxiliary:
        raise SystemExit(f"{run_dir}: trained without loss.auxiliary, so there is no linear head on its backbone")
    newest = newest_checkpoint(run_dir)
    state = torch.load(newest, map_location="cpu", weights_only=True)
    dataset = ShardDataset.open(config.shards)
    model = build_model(config.model, dataset.num_classes)
    assert isinstance(model, ProtoMask)
    if state["num_prototypes"] != model.num_prototypes:  # pruned
        model.prune(torch.arange(model.num_prototypes) < state["num_prototypes"])
    linear = LinearHead(config.model, dataset.num_classes, trunk=(model.backbone, model.channels))
    model.auxiliary = linear.classifier
    model.load_state_dict(state["model"])
    model.eval()
    linear.eval()
    keys = split_keys(dataset, config.data.val_fraction, config.seed)["test"]
    stream = ShardStream.for_model(dataset, keys, config.data, config.model, batch_size=32, train=False)
    logits: dict[str, list[torch.Tensor]] = {"prototypes": [], "linear": []}
    labels, regions, shares = [], [], []
    with torch.no_grad():
        for batch in stream:
            out = model(batch["crops"], batch["valid"])
            logits["prototypes"].append(out.logits)
            logits["linear"].append(linear(batch["crops"], batch["valid"]).logits)
            labels.append(batch["label"])
            own_regions, top_shares = evidence_spread(out.nearest_mask, model.prototype_class, batch["label"])
            regions += own_regions
            shares += top_shares
    y = torch.cat(labels)
    return {"epoch": state["epoch"], "seed": config.seed, "n_test": len(y),
            **{head: classification_metrics(torch.cat(v), y)["balanced_accuracy"] for head, v in logits.items()},
            "own_regions": sum(regions) / len(regions), "own_top_share": sum(shares) / len(shares)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, nargs="+", required=True)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    results = [{"run": str(run), **head_accuracies(run)} for run in args.run_dir]

    def row(r: dict) -> dict:
        return {"run": r["run"], "seed": r["seed"], "epoch": r["epoch"], "prototype head": f"{r['prototypes']:.1%}",
                "linear head, same backbone": f"{r['linear']:.1%}",
                "difference": f"{100 * (r['prototypes'] - r['linear']):+.1f} points",
                "own class's regions per image": f"{r['own_regions']:.2f}",
                "most on one region": f"{r['own_top_share']:.0%}"}

    rows = [row(r) for r in results]
    if len(results) > 1:
        keys = ("prototypes", "linear", "own_regions", "own_top_share")
        rows.append(row({"run": "mean", "seed": "", "epoch": "",
                         **{k: sum(r[k] for r in results) / len(results) for k in keys}}))
    print_table(f"test balanced accuracy ({fmt(results[0]['n_test'])} test images)", rows)
    if args.json:
        write_json(args.json, {"rows": results})


if __name__ == "__main__":
    main()

"""What the prototype head costs on its own backbone: the test balanced accuracy of a trained prototype model
beside that of loss.auxiliary's linear head (global pool per crop, max over crops, linear) on the same backbone.

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
    labels = []
    with torch.no_grad():
        for batch in stream:
            logits["prototypes"].append(model(batch["crops"], batch["valid"]).logits)
            logits["linear"].append(linear(batch["crops"], batch["valid"]).logits)
            labels.append(batch["label"])
    y = torch.cat(labels)
    return {"epoch": state["epoch"], "seed": config.seed, "n_test": len(y),
            **{head: classification_metrics(torch.cat(v), y)["balanced_accuracy"] for head, v in logits.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, nargs="+", required=True)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    results = [{"run": str(run), **head_accuracies(run)} for run in args.run_dir]
    rows = [{"run": r["run"], "seed": r["seed"], "epoch": r["epoch"], "prototype head": f"{r['prototypes']:.1%}",
             "linear head, same backbone": f"{r['linear']:.1%}",
             "difference": f"{100 * (r['prototypes'] - r['linear']):+.1f} points"} for r in results]
    if len(results) > 1:
        mean = {h: sum(r[h] for r in results) / len(results) for h in ("prototypes", "linear")}
        rows.append({"run": "mean", "seed": "", "epoch": "", "prototype head": f"{mean['prototypes']:.1%}",
                     "linear head, same backbone": f"{mean['linear']:.1%}",
                     "difference": f"{100 * (mean['prototypes'] - mean['linear']):+.1f} points"})
    print_table(f"test balanced accuracy ({fmt(results[0]['n_test'])} test images)", rows)
    if args.json:
        write_json(args.json, {"rows": results})


if __name__ == "__main__":
    main()

"""How an image's crops are combined into a decision, on the frozen backbone of a trained run.

    python bench/crop_evidence.py --run-dir R [--seeds 0 1 2 3] [--epochs 16] [--crop-dropout P]

Every train and test image's crops go once through the run's backbone (model.pt, eval mode; the training
images also flipped); then small heads train on those fixed per-crop features (Adam, flips, the run's batch size
and rates, its step decay; ``--crop-dropout``: crops hidden in training as ``data.crop_dropout`` hides them) and are
scored on the test split:

- linear, max over the crops' features: the crops-only black-box's head (``model.head: linear``);
- linear per crop, mean of the logits: each crop votes, the votes averaged;
- linear per crop, max of the logits: each class's evidence is its single best crop;
- prototypes: the run's own head (add-on, prototypes, last layer; cross-entropy + cluster − separation), with the
  prototypes placed on the crops the first head scores highest, as ``schedule.prototype_init: crops`` does, and
  the same head with the other ``model.embedding``.

ProtoMask's head decides per crop (a prototype's similarity is that of its single nearest crop); the linear heads
bracket how much deciding per crop costs on these features, whatever the prototypes do. No push.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or with python -m

from bench.common import print_table, write_json
from schemas.config import TrainConfig, load_config
from training.data import ShardDataset, ShardStream, hide_crops, split_keys
from training.losses import cluster_loss, separation_loss
from training.metrics import classification_metrics
from training.model import LinearHead, ProtoMask, build_model, max_over_crops

Features = dict[str, torch.Tensor]  # "f" [N, K, channels], "flipped" (train only), "valid" [N, K], "y" [N]


def crop_features(run_dir: Path) -> tuple[TrainConfig, int, dict[str, Features]]:
    """The run's config, its number of classes, and the per-crop pooled backbone features of the train and test
    splits."""
    config = load_config(TrainConfig, run_dir / "train_config.yaml", {})
    if config.model.head != "prototypes" or config.model.regions != "masks":
        raise SystemExit(f"{run_dir}: not a ProtoMask run (model.head: prototypes, regions: masks)")
    dataset = ShardDataset.open(config.shards)
    model = build_model(config.model, dataset.num_classes)
    state = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    model.backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items()
                                    if k.startswith("backbone.")})
    features = LinearHead(config.model, dataset.num_classes, trunk=(model.backbone, model.channels)).eval()
    splits = split_keys(dataset, config.data.val_fraction, config.seed)
    out = {}
    with torch.no_grad():
        for split in ("train", "test"):
            rows: dict[str, list[torch.Tensor]] = {"f": [], "flipped": [], "valid": [], "y": []}
            for batch in ShardStream.for_model(dataset, splits[split], config.data, config.model, batch_size=32,
                                               train=False):
                crops, valid = batch["crops"], batch["valid"]
                rows["f"].append(features.region_features(crops, valid, 1))
                if split == "train":
                    rows["flipped"].append(features.region_features(crops.flip(-1), valid, 1))
                rows["valid"].append(valid.bool())
                rows["y"].append(batch["label"])
            out[split] = {k: torch.cat(v) for k, v in rows.items() if v}
    return config, dataset.num_classes, out


class LinearEvidence(nn.Module):
    """A linear layer on max-pooled features (``pool: features``), or per crop with its logits pooled."""

    def __init__(self, channels: int, num_classes: int, pool: str) -> None:
        super().__init__()
        self.fc, self.pool = nn.Linear(channels, num_classes), pool

    def forward(self, f: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.pool == "features":
            return self.fc(max_over_crops(f, valid)), None
        logits = self.fc(f)
        if self.pool == "max":
            return max_over_crops(logits, valid), None
        return (logits * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp_min(1), None


class PrototypeEvidence(nn.Module):
    """ProtoMask's own head (``training.model.ProtoMask``: add-on, distances, similarity, last layer) on fixed
    per-crop features; the backbone is never run."""

    def __init__(self, model: ProtoMask) -> None:
        super().__init__()
        self.net = model

    def embed(self, f: torch.Tensor) -> torch.Tensor:
        """[M, channels] pooled crop features → [M, D]: the add-on on 1×1 maps (its 1×1 convolution commutes with
        the global pool the features already had)."""
        return self.net.add_on(f[..., None, None]).flatten(1)

    def forward(self, f: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = self.embed(f.flatten(0, 1)).unflatten(0, f.shape[:2])
        min_d = self.net.distances(z).masked_fill(~valid[..., None], math.inf).min(1).values
        return self.net.last_layer(self.net.similarity(min_d)), min_d


def placed_prototypes(head: PrototypeEvidence, scorer: LinearEvidence, train: Features) -> torch.Tensor:
    """Each class's prototypes on the embeddings of the crops ``scorer`` scores highest for it, one per image."""
    with torch.no_grad():
        f, valid, y = train["f"], train["valid"], train["y"]
        own = scorer.fc(f).gather(2, y[:, None, None].expand(-1, f.shape[1], 1))[..., 0]
        best, crop = own.masked_fill(~valid, -math.inf).max(1)
        z = head.embed(f[torch.arange(len(f)), crop])
        prototypes = torch.empty_like(head.net.prototypes)
        for c in range(head.net.num_classes):
            images = (y == c).nonzero()[:, 0]
            images = images[best[images].argsort(descending=True)]
            for j, prototype in enumerate((head.net.prototype_class == c).nonzero()[:, 0]):
                prototypes[prototype] = z[images[j % len(images)]]
    return prototypes


def fit(head: nn.Module, config: TrainConfig, train: Features, epochs: int, seed: int, *,
        crop_dropout: float = 0.0) -> None:
    """Adam on ``head`` over the training features (flipped at random per image, crops hidden with probability
    ``crop_dropout``), step decay as the run's."""
    s = config.schedule
    generator = torch.Generator().manual_seed(seed)
    if isinstance(head, PrototypeEvidence):
        groups = head.net.parameter_groups()
        optimizer = torch.optim.Adam([{"params": groups[name], "lr": lr} for name, lr in (
            ("add_on", s.lr_addon), ("prototypes", s.lr_prototypes), ("last_layer", s.lr_last_layer))])
    else:
        optimizer = torch.optim.Adam(head.parameters(), lr=s.lr_addon)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, s.step_size, s.gamma)
    n, batch = len(train["y"]), config.data.batch_size
    head.train()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator)
        for i in range(0, n - batch + 1, batch):
            idx = order[i:i + batch]
            flip = torch.rand(len(idx), generator=generator)[:, None, None] < 0.5
            f = torch.where(flip, train["flipped"][idx], train["f"][idx])
            valid, y = train["valid"][idx], train["y"][idx]
            if crop_dropout:
                valid = torch.stack([torch.from_numpy(hide_crops(v.numpy(), crop_dropout, [seed, epoch, int(j)]))
                                     for v, j in zip(valid, idx)])
            logits, min_d = head(f, valid)
            loss = F.cross_entropy(logits, y)
            if min_d is not None:
                prototype_class = head.net.prototype_class
                loss = loss + config.loss.cluster * cluster_loss(min_d, y, prototype_class) \
                    - config.loss.separation * separation_loss(min_d, y, prototype_class)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if isinstance(head, PrototypeEvidence):
                head.net.after_step("joint")
        scheduler.step()
    head.eval()


def balanced_accuracy(head: nn.Module, split: Features) -> float:
    with torch.no_grad():
        return classification_metrics(head(split["f"], split["valid"])[0], split["y"])["balanced_accuracy"]


def evidence_table(run_dir: Path, *, seeds: list[int], epochs: int, crop_dropout: float = 0.0) -> list[dict]:
    """One row per head: its test balanced accuracy per seed and their mean, and its train accuracy's mean."""
    config, num_classes, splits = crop_features(run_dir)
    channels = splits["train"]["f"].shape[-1]
    other = "normalized" if config.model.embedding == "sigmoid" else "sigmoid"
    heads = {"linear, max over the crops' features (the crops-only black-box)": "features",
             "linear per crop, mean of the logits": "mean", "linear per crop, max of the logits": "max",
             f"prototypes, embedding {config.model.embedding} (the run's)": config.model.embedding,
             f"prototypes, embedding {other}": other}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in heads}
    for seed in seeds:
        torch.manual_seed(seed)
        scorer = LinearEvidence(channels, num_classes, "features")
        fit(scorer, config, splits["train"], epochs, seed, crop_dropout=crop_dropout)
        for name, kind in heads.items():
            torch.manual_seed(seed)
            if kind in ("features", "mean", "max"):
                head = scorer if kind == "features" else LinearEvidence(channels, num_classes, kind)
            else:
                model = build_model(config.model.model_copy(update={"embedding": kind}), num_classes)
                assert isinstance(model, ProtoMask)
                head = PrototypeEvidence(model)
                model.prototypes.data.copy_(placed_prototypes(head, scorer, splits["train"]))
            if head is not scorer:
                fit(head, config, splits["train"], epochs, seed, crop_dropout=crop_dropout)
            results[name].append((balanced_accuracy(head, splits["test"]), balanced_accuracy(head, splits["train"])))
    return [{"head": name, "test": [t for t, _ in r], "mean_test": sum(t for t, _ in r) / len(r),
             "mean_train": sum(a for _, a in r) / len(r), "n_test": len(splits["test"]["y"])}
            for name, r in results.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="a run of protomask train (its model.pt)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--epochs", type=int, default=16, help="epochs of every head (small-cpu's joint phase: 16)")
    parser.add_argument("--crop-dropout", type=float, default=0.0,
                        help="every head trains with crops hidden at this probability (data.crop_dropout)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    rows = evidence_table(args.run_dir, seeds=args.seeds, epochs=args.epochs, crop_dropout=args.crop_dropout)
    print_table(f"test balanced accuracy on {args.run_dir}'s frozen backbone ({rows[0]['n_test']} test images, "
                f"seeds {', '.join(map(str, args.seeds))}, crop dropout {args.crop_dropout})",
                [{"head": r["head"], "test (mean)": f"{r['mean_test']:.1%}",
                  "per seed": ", ".join(f"{t:.1%}" for t in r["test"]), "train (mean)": f"{r['mean_train']:.1%}"}
                 for r in rows])
    if args.json:
        write_json(args.json, {"rows": rows})


if __name__ == "__main__":
    main()

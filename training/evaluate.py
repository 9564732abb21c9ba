"""A model's metrics on one split: the one function behind ``metrics_<split>.json``, called by the
training loop at the end of a run (all workers) and by ``protomask evaluate`` (one process), so both
write the same numbers to the same file."""

from __future__ import annotations

import json
from collections.abc import Iterable

import torch

from schemas.storage import Location, put, read_text_if_present
from training.data import ShardDataset
from training.explain import Relevance
from training.interpretability import Track, interpretability_metrics
from training.metrics import (classification_metrics, compactness, confusion_matrix, contrastivity,
                              gather_predictions)
from training.model import Model, ProtoMask

TOP_K = 5  # prototypes per image for the contrastivity and saliency metrics (spec §7)


def metrics_file(run_dir: Location, split: str) -> Location:
    return run_dir / f"metrics_{split}.json"


@torch.no_grad()
def predict(model: Model, batches: Iterable[dict], device: torch.device) -> dict:
    """Logits [N, C], similarities [N, P] (prototype heads; [N, 0] otherwise), labels [N] and keys of this
    worker's part of a split."""
    model.eval()
    logits, sims, labels, keys = [], [], [], []
    for batch in batches:
        out = model(batch["crops"].to(device), batch["valid"].to(device))
        logits.append(out.logits.float().cpu())
        if out.similarities is not None:
            sims.append(out.similarities.float().cpu())
        labels.append(batch["label"])
        keys += batch["key"]
    c, p = model.num_classes, model.num_prototypes if isinstance(model, ProtoMask) else 0
    return {
        "logits": torch.cat(logits) if logits else torch.zeros(0, c),
        "similarities": torch.cat(sims) if sims else torch.zeros(len(keys), p),
        "labels": torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
        "keys": keys,
    }


def classification(model: Model, batches: Iterable[dict], device: torch.device) -> dict[str, float]:
    """Classification metrics of one split, gathered over all workers (validation)."""
    p = predict(model, batches, device)
    return classification_metrics(*gather_predictions(p["logits"], p["labels"], p["keys"])[:2])


def evaluate_split(model: Model, batches: Iterable[dict], device: torch.device, *, dataset: ShardDataset,
                   keys: Iterable[str], relevance: Relevance | None = None, track: Track | None = None) -> dict:
    """Every metric of the model on one split: classification over all workers' ``batches`` (with the
    confusion matrix, ``confusion[true][predicted]`` counts); for prototype heads also compactness,
    contrastivity and the saliency metrics (spec §7, with ``relevance`` as their saliency; each rank takes a share
    of the samples; ``track`` shows its progress). Every rank must call it when distributed."""
    p = predict(model, batches, device)
    c = model.num_classes
    joined, labels, _ = gather_predictions(torch.cat([p["logits"], p["similarities"]], 1), p["labels"], p["keys"])
    logits = joined[:, :c]
    result = {"head": model.config.head, "regions": model.config.regions, **classification_metrics(logits, labels),
              "confusion": confusion_matrix(logits.argmax(1), labels, c).tolist()}
    if isinstance(model, ProtoMask):
        sims = joined[:, c:]
        top = sims.topk(min(TOP_K, sims.shape[1]), dim=1).indices
        vectors = getattr(model, "prototypes", None)  # PIP-Net's prototypes are channels: no prototype distances
        result.update(**compactness(model),
                      **(contrastivity(vectors.detach().cpu(), top, labels) if vectors is not None else {}))
        result.update(interpretability_metrics(model, dataset, keys, k=TOP_K, relevance=relevance, track=track))
    return result


def write_metrics(run_dir: Location, split: str, result: dict, **facts: object) -> Location:
    """``metrics_<split>.json``: ``{split: result, **facts}``; facts of an earlier write (the training
    run's epochs, micro-batch, peak memory) are kept when ``protomask evaluate`` rewrites the metrics."""
    path = metrics_file(run_dir, split)
    found = read_text_if_present(path)
    data = {} if found is None else json.loads(found)
    data.update({split: result, **facts})
    put(path, json.dumps(data, indent=1))
    return path

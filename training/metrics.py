"""The paper's metrics (spec §7) as pure functions: classification (§7.1), prediction gathering over DDP ranks,
compactness (§7.2), contrastivity (§7.3) and the saliency metrics of one image (§7.3–§7.4).

Pure torch and numpy, no sklearn. Shares are stored as fractions in [0, 1] (sparsity and the saliency metrics
too); ``PAPER_METRICS`` says which the paper prints ×100 and under which name.

The reference (§7.1) weights every image by 1/(its class's share of the split): its "Accuracy", "top-3
Accuracy" and "F1" are ``balanced_accuracy`` (the mean per-class recall), ``balanced_top3`` and
``balanced_macro_f1`` here, reported beside the unweighted ``accuracy``, ``top3`` and ``macro_f1``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.distributed as dist

# key → (the paper's name, its family, the factor it is printed with): the paper's table layout (spec §7)
PAPER_METRICS: dict[str, tuple[str, str, int]] = {
    "balanced_accuracy": ("Accuracy", "general", 100),
    "balanced_top3": ("top-3 Accuracy", "general", 100),
    "balanced_macro_f1": ("F1", "general", 100),
    "global_size": ("Global Size", "compactness", 1),
    "sparsity": ("Sparsity", "compactness", 100),
    "npr": ("NPR", "compactness", 1),
    "vlc": ("VLC", "contrastivity", 100),
    "intra_pd": ("Intra PD", "contrastivity", 1),
    "inter_pd": ("Inter PD", "contrastivity", 1),
    "ior": ("IOR", "complexity", 1),
    "object_overlap": ("Object Overlap", "complexity", 100),
    "background_overlap": ("Background Overlap", "complexity", 100),
    "consistency": ("Consistency", "complexity", 100),
}
OUR_COLUMNS: dict[str, tuple[str, str, int]] = {  # our own metrics in the paper's table, after its columns
    "part_hit_rate": ("part hit rate", "ours", 100),
}


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Unweighted ``accuracy``, ``top3`` (top-min(3, C)) and ``macro_f1`` (over the classes in labels or
    predictions; F1 = 0 where undefined), each beside its class-balanced variant (every image weighted by 1/#images
    of its class, the reference's sample weights): ``balanced_accuracy`` (the mean recall over the classes in
    ``labels``, the paper's "Accuracy"), ``balanced_top3``, ``balanced_macro_f1``; and ``n``. An empty input gives
    zeros and ``n = 0``."""
    logits = logits.detach().float().cpu()
    labels = labels.detach().long().cpu().reshape(-1)
    n = int(labels.numel())
    if n == 0:
        return {"accuracy": 0.0, "balanced_accuracy": 0.0, "top3": 0.0, "balanced_top3": 0.0, "macro_f1": 0.0,
                "balanced_macro_f1": 0.0, "n": 0}
    if logits.dim() != 2 or logits.shape[0] != n:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    pred = logits.argmax(dim=1)
    correct = pred == labels
    top3 = (logits.topk(min(3, logits.shape[1]), dim=1).indices == labels[:, None]).any(dim=1)
    present = torch.unique(labels).tolist()

    def per_class_mean(hit: torch.Tensor) -> float:
        return sum(float(hit[labels == c].float().mean()) for c in present) / len(present)

    class_weight = 1 / torch.bincount(labels).double()
    return {
        "accuracy": float(correct.float().mean()),
        "balanced_accuracy": per_class_mean(correct),
        "top3": float(top3.float().mean()),
        "balanced_top3": per_class_mean(top3),
        "macro_f1": macro_f1(pred, labels, weight=torch.ones(n, dtype=torch.float64)),
        "balanced_macro_f1": macro_f1(pred, labels, weight=class_weight[labels]),
        "n": n,
    }


def macro_f1(pred: torch.Tensor, labels: torch.Tensor, *, weight: torch.Tensor) -> float:
    """Mean F1 = 2·TP / (2·TP + FP + FN) over the classes in labels or predictions, each image counted with its
    ``weight`` (sklearn's ``f1_score(average="macro", sample_weight=weight)``); 0 for a class without true
    positives."""
    f1s = []
    for c in torch.unique(torch.cat([labels, pred])).tolist():
        tp = float(weight[(pred == c) & (labels == c)].sum())
        fp = float(weight[(pred == c) & (labels != c)].sum())
        fn = float(weight[(pred != c) & (labels == c)].sum())
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(f1s) / len(f1s)


def gather_predictions(
    logits: torch.Tensor, labels: torch.Tensor, keys: list[str]
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """All ranks' rows in rank order (``all_gather_object``; ranks may hold different counts, even 0),
    then de-duplicated by key, first occurrence kept. Without an initialised process group only the
    de-duplication happens. Every rank must call it when distributed. Results are on the CPU."""
    logits, labels, keys = logits.detach().cpu(), labels.detach().cpu(), [str(k) for k in keys]
    if len(keys) != labels.shape[0] or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} logits, {labels.shape[0]} labels and {len(keys)} keys differ")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (logits, labels, keys))
        nonempty = [p for p in parts if p[1].numel() > 0]
        if nonempty:
            logits = torch.cat([p[0].reshape(p[1].numel(), -1) for p in nonempty])
            labels = torch.cat([p[1].reshape(-1) for p in nonempty])
            keys = [k for p in nonempty for k in p[2]]
        else:  # keep this rank's (empty) tensors, but a 2-D shape if any rank reported one
            shaped = [p[0] for p in parts if p[0].dim() == 2]
            logits = shaped[0] if shaped else logits
    seen: set[str] = set()
    first = []
    for i, k in enumerate(keys):
        if k not in seen:
            seen.add(k)
            first.append(i)
    if len(first) < len(keys):
        idx = torch.tensor(first, dtype=torch.long)
        logits, labels, keys = logits[idx], labels[idx], [keys[i] for i in first]
    return logits, labels, keys


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C, C] counts: row = true class, column = predicted class."""
    flat = labels.long() * num_classes + predicted.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def compactness(model, eps: float = 1e-3) -> dict:
    """Spec §7.2 on the last layer ``W``: ``global_size`` = #prototypes with any weight > eps on a class (for
    ProtoPool through its slots: ``prototype_weights``, where the reference counted every prototype any slot held
    above 1e-6, nearly the whole pool), ``sparsity`` = #(|w| ≤ eps)/|W| (the paper prints it ×100), ``npr`` =
    #(w < −eps)/#(w > eps) (0 with no positive)."""
    net = getattr(model, "module", model)
    w = net.last_layer.weight.detach().float().cpu()
    per_prototype = net.prototype_weights().detach().float().cpu()
    positive = int((w > eps).sum())
    negative = int((w < -eps).sum())
    return {
        "global_size": int((per_prototype > eps).any(dim=0).sum()),
        "sparsity": float((w.abs() <= eps).sum()) / w.numel() if w.numel() else 0.0,
        "npr": negative / positive if positive else 0.0,
    }


def contrastivity(prototypes: torch.Tensor, top: torch.Tensor, labels: torch.Tensor) -> dict:
    """Spec §7.3 prototype distances over the top-k prototypes ``top`` [N, k] of each image (cosine distance
    1 − cos): ``intra_pd`` = per image the mean over pairs i ≠ j of its own top-k, averaged over images;
    ``inter_pd`` = per image the mean distance of its rank-r prototype to the rank-r prototypes of every
    image of another class, averaged per class and then over the classes present (the reference divided
    by all C classes, counting absent ones as 0, spec §9.8)."""
    v = torch.nn.functional.normalize(prototypes.detach().float().cpu()[top.cpu()], dim=-1)  # [N, k, D]
    labels = labels.cpu()
    n, k = top.shape
    intra = 0.0
    if k > 1 and n:
        d = 1 - v @ v.transpose(1, 2)  # [N, k, k]
        intra = float((d.sum((1, 2)) / (k * (k - 1))).mean())
    other = labels[:, None] != labels[None, :]  # [N, N]
    if not other.any():
        return {"intra_pd": intra, "inter_pd": 0.0}
    per_image = torch.stack([(1 - v[:, r] @ v[:, r].T) for r in range(k)]).mean(0)  # [N, N], rank-wise
    per_image = (per_image * other).sum(1) / other.sum(1).clamp_min(1)
    per_class = [float(per_image[labels == c].mean()) for c in torch.unique(labels).tolist()]
    return {"intra_pd": intra, "inter_pd": sum(per_class) / len(per_class)}


def percentile_mask(saliency: np.ndarray, q: float = 95) -> np.ndarray:
    """Ŝ: the pixels at or above the map's q-th percentile, where it is positive. The reference kept every pixel
    at or above the percentile, so a map positive on fewer than 5 % of the image (percentile 0) became the whole
    image (spec §6.1)."""
    return (saliency >= np.percentile(saliency, q)) & (saliency > 0)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks; 1 when both are empty (the same, empty place)."""
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 1.0


def location_change(masks: np.ndarray) -> float:
    """VLC of one image (spec §7.3): the mean over its k binary saliency masks [k, H, W] of the mean 1 − IoU with
    the other k − 1; 0 for k < 2."""
    k = len(masks)
    if k < 2:
        return 0.0
    return sum(1 - iou(masks[i], masks[j]) for i in range(k) for j in range(k) if i != j) / (k * (k - 1))


def object_overlap(mask: np.ndarray, obj: np.ndarray) -> float:
    """|Ŝ ∧ O| / |O|: the share of the object the binary saliency covers (0 without object pixels)."""
    size = int(obj.sum())
    return int((mask & obj).sum()) / size if size else 0.0


def background_overlap(mask: np.ndarray, obj: np.ndarray) -> float:
    """1 − |Ŝ ∧ O| / |Ŝ|: the share of the binary saliency off the object (0 for an empty saliency)."""
    size = int(mask.sum())
    return 1 - int((mask & obj).sum()) / size if size else 0.0


def inside_outside_relevance(saliency: np.ndarray, obj: np.ndarray) -> float:
    """IOR in [−1, 1]: with the map divided by its maximum, the mean of its non-zero values inside the object
    minus the mean of those outside (a mean over no value is 0; an all-zero map gives 0)."""
    top = float(saliency.max(initial=0.0))
    if top <= 0:
        return 0.0
    level = saliency / top
    inside, outside = level[obj & (level != 0)], level[~obj & (level != 0)]
    return (float(inside.mean()) if inside.size else 0.0) - (float(outside.mean()) if outside.size else 0.0)


def consistency(appearances: Mapping[int, int], part_hits: Mapping[int, Mapping[int, int]]) -> float:
    """Spec §7.4: per prototype that appeared in any top-k (``appearances[p]`` times), the mean over the parts it
    ever hit of how often it hit that part when it appeared (``part_hits[p][part]`` times); the mean over those
    prototypes, counting the ones that never hit a part as 0."""
    scores = [sum(hits.values()) / len(hits) / appearances[p] if (hits := part_hits.get(p)) else 0.0
              for p in appearances]
    return sum(scores) / len(scores) if scores else 0.0

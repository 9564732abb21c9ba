"""Loss terms (spec §2.1), each a function of the model output so it can be tested by hand."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from schemas.config import LossConfig
from training.model import ProtoMask, ModelOutput


def cluster_loss(min_distances: torch.Tensor, labels: torch.Tensor, prototype_class: torch.Tensor) -> torch.Tensor:
    """Mean over images of the distance to the nearest prototype of the image's own class."""
    own = prototype_class[None, :] == labels[:, None]  # [B, P]
    return min_distances.masked_fill(~own, float("inf")).min(dim=1).values.mean()


def separation_loss(min_distances: torch.Tensor, labels: torch.Tensor, prototype_class: torch.Tensor) -> torch.Tensor:
    """Mean over images of the distance to the nearest prototype of any other class."""
    own = prototype_class[None, :] == labels[:, None]
    return min_distances.masked_fill(own, float("inf")).min(dim=1).values.mean()


def prototype_crop_loss(min_distances: torch.Tensor, labels: torch.Tensor, prototype_class: torch.Tensor) -> torch.Tensor:
    """Mean, over the prototypes whose class is in the batch, of the distance to the nearest crop of that class.

    The prototype-side counterpart of the cluster term (Li et al. 2018's R1): cluster pulls each image's
    nearest crop onto a prototype; this pulls each prototype onto a crop, so push later moves it little. A
    min over images, hence over the micro-batch (not additive across micro-batches, unlike the other terms)."""
    own = prototype_class[None, :] == labels[:, None]  # [B, P]
    present = own.any(dim=0)
    if not present.any():
        return min_distances.new_zeros(())
    return min_distances.masked_fill(~own, float("inf")).min(dim=0).values[present].mean()


def diversity_loss(prototypes: torch.Tensor, labels: torch.Tensor, prototype_class: torch.Tensor) -> torch.Tensor:
    """Mean over images of exp(−1e‑3 · Σ pairwise L2 distances between the prototypes of its class).

    Differentiable, unlike the reference (which called ``.item()``); pairs i≠j only, since the
    diagonal is zero anyway and its sqrt has no gradient at 0.
    """
    per_class = []
    for c in range(int(prototype_class.max()) + 1):
        p = prototypes[prototype_class == c]
        if len(p) < 2:
            per_class.append(prototypes.new_ones(()))
            continue
        diff = p[:, None, :] - p[None, :, :]
        off = ~torch.eye(len(p), dtype=torch.bool, device=p.device)
        per_class.append(torch.exp(-1e-3 * diff[off].pow(2).sum(-1).add(1e-12).sqrt().sum()))
    return torch.stack(per_class)[labels].mean()


def l1_off_class(model: ProtoMask) -> torch.Tensor:
    """L1 norm of the last-layer weights that connect prototypes to other classes."""
    return (model.last_layer.weight * (1 - model.class_identity.T)).abs().sum()


def class_weights(counts: list[int]) -> torch.Tensor:
    """Balanced cross-entropy weights w_c = N / (C · n_c) (classes without samples get 0)."""
    n = torch.tensor(counts, dtype=torch.float32)
    return torch.where(n > 0, n.sum() / (len(counts) * n.clamp_min(1)), torch.zeros_like(n))


def total_loss(
    out: ModelOutput, labels: torch.Tensor, model: ProtoMask, config: LossConfig, phase: str,
    weights: torch.Tensor | None, *, detached_diversity: bool = False, last_layer_l1: bool | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The phase's training loss and its terms (as floats, for logging).

    Every term is a plain mean over the batch's images (class-balanced cross-entropy too: the mean of
    ``w_y · CE``, not PyTorch's ``Σ w_y · CE / Σ w_y``), so micro-batch losses weighted by their share of
    images add up exactly to the loss of the whole batch, on any number of workers. The linear head has
    cross-entropy only. ``last_layer_l1``: add the L1 term (default: in the last-layer phase only)."""
    ce = F.cross_entropy(out.logits, labels, weight=weights, reduction="none").mean()
    terms = {"cross_entropy": ce}
    loss = config.cross_entropy * ce
    if out.min_distances is None:  # linear head
        return loss, {k: float(v.detach()) for k, v in terms.items()}
    if last_layer_l1 if last_layer_l1 is not None else phase == "last_layer":
        l1 = l1_off_class(model)
        terms["l1"] = l1
        loss = loss + config.l1 * l1
    if phase != "last_layer":
        clst = cluster_loss(out.min_distances, labels, model.prototype_class)
        sep = separation_loss(out.min_distances, labels, model.prototype_class)
        terms.update(cluster=clst, separation=sep)
        loss = loss + config.cluster * clst - config.separation * sep
        if config.prototype_crop:
            anchor = prototype_crop_loss(out.min_distances, labels, model.prototype_class)
            terms["prototype_crop"] = anchor
            loss = loss + config.prototype_crop * anchor
        if config.diversity:
            div = diversity_loss(model.prototypes, labels, model.prototype_class)
            terms["diversity"] = div
            loss = loss + config.diversity * (div.detach() if detached_diversity else div)
    return loss, {k: float(v.detach()) for k, v in terms.items()}

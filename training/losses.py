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


def prototype_crop_loss(min_distances: torch.Tensor, labels: torch.Tensor, prototype_class: torch.Tensor
                        ) -> torch.Tensor:
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


def slotted_min_distance(min_distances: torch.Tensor, weight: torch.Tensor, k: int) -> torch.Tensor:
    """ProtoPool's cluster and separation (spec §8): per image, the smallest distance among the ``k`` prototypes
    of the largest ``weight`` [B, P] (detached); the mean over images."""
    chosen = torch.zeros_like(min_distances, dtype=torch.bool).scatter_(1, weight.detach().topk(k, dim=1).indices,
                                                                         True)
    return min_distances.masked_fill(~chosen, float("inf")).min(dim=1).values.mean()


def pool_cluster_separation(min_distances: torch.Tensor, labels: torch.Tensor, presence: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """ProtoPool's cluster (the nearest of the ``slots`` prototypes most present in the image's class) and
    separation (the nearest of the others), from the forward's ``presence`` [C, P, slots]."""
    held = presence[labels].sum(-1)  # [B, P]: how much of each prototype the class's slots hold
    slots, pool = presence.shape[2], presence.shape[1]
    return (slotted_min_distance(min_distances, held, slots),
            slotted_min_distance(min_distances, slots - held, pool - slots))


def orthogonality_loss(presence: torch.Tensor) -> torch.Tensor:
    """ProtoPool's L_orth: the sum over classes of the cosine similarities between the (raw) presence vectors
    over the pool of every two distinct slots, divided by slots · classes (upstream's; the reference compares
    neighbouring slots only), so that a class's slots hold different prototypes."""
    q = F.normalize(presence.transpose(1, 2), dim=-1)  # [C, slots, P]
    cos = q @ q.transpose(1, 2)  # [C, slots, slots]
    c, slots = presence.shape[0], presence.shape[2]
    return (cos.sum() - cos.diagonal(dim1=1, dim2=2).sum()) / (slots * c)


def alignment_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PIP-Net's alignment of two views' cell presences [B, cells, P] (each cell a distribution over the
    prototypes): −mean over cells of log(a · b)."""
    return -torch.log((a * b).sum(-1) + 1e-12).mean()


def tanh_loss(pooled: torch.Tensor) -> torch.Tensor:
    """PIP-Net's spread term on the image presences [B, P]: −mean over prototypes of log(tanh(Σ_images) + 1e-8),
    so that every prototype is present in some image of the batch."""
    return -torch.log(torch.tanh(pooled.sum(0)) + 1e-8).mean()


def l1_off_class(model: ProtoMask) -> torch.Tensor:
    """L1 norm of the last-layer weights that connect prototypes to other classes."""
    return (model.last_layer.weight * (1 - model.class_identity)).abs().sum()


def class_weights(counts: list[int]) -> torch.Tensor:
    """Balanced cross-entropy weights w_c = N / (C · n_c) (classes without samples get 0)."""
    n = torch.tensor(counts, dtype=torch.float32)
    return torch.where(n > 0, n.sum() / (len(counts) * n.clamp_min(1)), torch.zeros_like(n))


def total_loss(
    out: ModelOutput, labels: torch.Tensor, model: ProtoMask, config: LossConfig, phase: str,
    weights: torch.Tensor | None, *, detached_diversity: bool = False, last_layer_l1: bool | None = None,
    warmup_progress: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The phase's training loss and its terms (as floats, for logging).

    Every term is a plain mean over the batch's images (class-balanced cross-entropy too: the mean of
    ``w_y · CE``, not PyTorch's ``Σ w_y · CE / Σ w_y``), so micro-batch losses weighted by their share of
    images add up exactly to the loss of the whole batch, on any number of workers. The linear head has
    cross-entropy only; ProtoPool has its own cluster, separation and orthogonality terms instead of ProtoMask's;
    PIP-Net's batch holds two views of its images (the first half and the second), and its loss is the alignment
    of their cell presences and the tanh term, with cross-entropy except in warm-up (its self-supervised phase,
    where the alignment weight grows with ``warmup_progress``, the share of warm-up epochs done by this one).
    The tanh term and ProtoMask's prototype_crop take a batch-wide sum or min, so they are the micro-batch's.
    ``last_layer_l1``: add the L1 term (default: in the last-layer phase only)."""
    ce = F.cross_entropy(out.logits, labels, weight=weights, reduction="none").mean()
    terms = {"cross_entropy": ce}
    loss = config.cross_entropy * ce
    if out.auxiliary_logits is not None:  # the model gives them only while its classifier trains (joint)
        auxiliary = F.cross_entropy(out.auxiliary_logits, labels, weight=weights, reduction="none").mean()
        terms["auxiliary"] = auxiliary
        loss = loss + config.auxiliary * auxiliary
    if out.cell_presence is not None:  # PIP-Net: two views of the same images, one after the other
        half = len(labels) // 2
        z1, z2 = out.cell_presence[:half], out.cell_presence[half:]
        align = (alignment_loss(z1, z2.detach()) + alignment_loss(z2, z1.detach())) / 2
        spread = (tanh_loss(out.similarities[:half]) + tanh_loss(out.similarities[half:])) / 2
        terms.update(alignment=align, tanh=spread)
        if phase == "warmup":  # the reference's self-supervised start: alignment ramps up, a stronger tanh term
            loss = warmup_progress * config.alignment * align + config.tanh_warmup * spread
        else:
            loss = loss + config.alignment * align + config.tanh * spread
        return loss, {k: float(v.detach()) for k, v in terms.items()}
    if out.min_distances is None:  # linear head
        return loss, {k: float(v.detach()) for k, v in terms.items()}
    if last_layer_l1 if last_layer_l1 is not None else phase == "last_layer":
        l1 = l1_off_class(model)
        terms["l1"] = l1
        loss = loss + config.l1 * l1
    if phase != "last_layer" and out.presence is not None:  # ProtoPool
        clst, sep = pool_cluster_separation(out.min_distances, labels, out.presence)
        orth = orthogonality_loss(model.proto_presence)
        terms.update(cluster=clst, separation=sep, orthogonality=orth)
        loss = loss + config.cluster * clst - config.separation * sep + config.orthogonality * orth
    elif phase != "last_layer":
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

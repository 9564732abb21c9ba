"""Push (prototype projection) and pruning, spec §3, across all DDP ranks.

Push (fixed mode): every prototype j of class c is replaced by the embedding of the **globally**
nearest valid crop among the training images of class c: a running minimum over this rank's batches,
then a minimum over all ranks (ties: smallest key, then smallest mask index), so every rank copies the
same vector. Parity mode (``last_batch_parity=True``) reproduces the reference bug (spec §3.1): the
best is re-initialised per batch, so each prototype ends on the nearest crop of the last batch that
holds its class. With several ranks, "the last batch" has no global meaning; parity mode then uses
rank 0's local result, and for a prototype whose class rank 0 never saw, the lowest rank that saw it.

Pruning (spec §3.2, class identity kept as a buffer): per prototype the k nearest training *images*
(min over the image's valid crops) over all ranks; prune j when fewer than ``threshold`` of them
belong to j's class.

Placement (``place_on_crops``, ``schedule.prototype_init: crops``): after the backbone's pre-training,
each prototype starts on the embedding of a training region (mask crop, or patch) of its class that the
pre-trained linear classifier scores highest for that class, instead of the paper's U[0, 1) draw.

All three run a forward pass only (``torch.no_grad``, ``eval`` mode, restored afterwards), take a
plain or DDP-wrapped model, and must be called by every rank (they hold collective calls).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.distributed as dist

from schemas.config import DataConfig
from training.data import ShardDataset, ShardStream
from training.model import LinearHead, ProtoMask

INF = float("inf")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _comm_device(device: torch.device) -> torch.device:
    """Where tensors for ``all_gather`` must live: CUDA for NCCL, CPU otherwise (gloo)."""
    if "nccl" in str(dist.get_backend()).lower():
        return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather(tensor: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    """Same-shape tensors of every rank, in rank order, on the CPU."""
    t = tensor.contiguous().to(_comm_device(device))
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.cpu() for o in out]


def _all_gather_object(obj) -> list:
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _batch_tensors(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    crops = batch["crops"].to(device)
    valid = batch["valid"].to(device).bool()
    labels = batch["label"].to(device).long()
    keys = [str(k) for k in batch["key"]]
    return crops, valid, labels, keys


class _EvalMode:
    """``no_grad`` + ``eval()`` on the unwrapped module, the previous mode restored on exit."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.net, self.was_training = net, net.training
        self.no_grad = torch.no_grad()

    def __enter__(self) -> None:
        self.no_grad.__enter__()
        self.net.eval()

    def __exit__(self, *exc) -> None:
        self.net.train(self.was_training)
        self.no_grad.__exit__(*exc)


def push_prototypes(
    model: ProtoMask, batches: Iterable[dict], device: torch.device, last_batch_parity: bool = False
) -> list[dict]:
    """Project every prototype onto its nearest class-c training crop (see the module docstring).

    Returns the push log, one dict per prototype: ``{"prototype", "class", "key", "mask_index",
    "distance"}``; ``distance`` is the squared L2 distance before projection. A prototype whose class has
    no training image (with a valid crop) keeps its value and is logged with ``key=None``,
    ``mask_index=None`` and ``distance=inf``.
    """
    net: ProtoMask = getattr(model, "module", model)
    num_p, dim = net.prototypes.shape
    proto_class = net.prototype_class.to(device)
    best_d = torch.full((num_p,), INF, dtype=torch.float32)  # CPU bookkeeping
    best_z = torch.zeros(num_p, dim, dtype=torch.float32)
    best_key: list[str | None] = [None] * num_p
    best_mask: list[int | None] = [None] * num_p

    with _EvalMode(net):
        for batch in batches:
            crops, valid, labels, keys = _batch_tensors(batch, device)
            if crops.shape[0] == 0 or crops.shape[1] == 0:
                continue
            z = net.embed(crops, valid)  # [B, N, D]: one embedding per region (mask crop or patch)
            valid = net.region_valid(valid)
            d = net.distances(z).float()  # [B, N, P]
            allowed = valid[:, :, None] & (labels[:, None, None] == proto_class[None, None, :])
            d = d.masked_fill(~allowed, INF)
            k = d.shape[1]
            flat = d.flatten(0, 1)  # [B*K, P]
            batch_min, arg = flat.min(dim=0)  # first index on ties → fixed below by (key, mask)
            ties = ((flat == batch_min[None]) & torch.isfinite(flat)).sum(0).cpu() > 1
            batch_min, arg = batch_min.cpu(), arg.cpu()
            for j in torch.nonzero(ties).flatten().tolist():  # rare: exact ties inside one batch
                rows = torch.nonzero(flat[:, j] == flat[:, j].min()).flatten().tolist()
                arg[j] = min(rows, key=lambda r: (keys[r // k], r % k))
            z_flat = z.flatten(0, 1).float().cpu()
            if last_batch_parity:
                update = torch.isfinite(batch_min)  # the reference resets the best every batch
            else:
                update = batch_min < best_d
                same = (batch_min == best_d) & torch.isfinite(batch_min)
                for j in torch.nonzero(same).flatten().tolist():
                    r = int(arg[j])
                    if (keys[r // k], r % k) < (best_key[j], best_mask[j]):
                        update[j] = True
            idx = torch.nonzero(update).flatten()
            best_d[idx] = batch_min[idx]
            best_z[idx] = z_flat[arg[idx]]
            for j, r in zip(idx.tolist(), arg[idx].tolist()):
                best_key[j], best_mask[j] = keys[r // k], r % k

    if _distributed() and dist.get_world_size() > 1:
        all_d = torch.stack(_all_gather(best_d, device))  # [W, P]
        all_z = torch.stack(_all_gather(best_z, device))  # [W, P, D]
        all_id = _all_gather_object(list(zip(best_key, best_mask)))  # W × P × (key, mask)
        for j in range(num_p):
            found = [w for w in range(all_d.shape[0]) if all_id[w][j][0] is not None]
            if not found:
                continue
            if last_batch_parity:
                w = found[0]  # rank 0's local result; the lowest rank that saw the class otherwise
            else:
                w = min(found, key=lambda w: (float(all_d[w, j]), all_id[w][j][0], all_id[w][j][1]))
            best_d[j], best_z[j] = all_d[w, j], all_z[w, j]
            best_key[j], best_mask[j] = all_id[w][j]

    chosen = [j for j in range(num_p) if best_key[j] is not None]
    if chosen:
        idx = torch.tensor(chosen, dtype=torch.long)
        with torch.no_grad():
            net.prototypes.data[idx.to(net.prototypes.device)] = best_z[idx].to(
                net.prototypes.device, net.prototypes.dtype
            )
    classes = net.prototype_class.tolist()
    return [
        {
            "prototype": j,
            "class": int(classes[j]),
            "key": best_key[j],
            "mask_index": None if best_mask[j] is None else int(best_mask[j]),
            "distance": float(best_d[j]),
        }
        for j in range(num_p)
    ]


def push_distinct(model: ProtoMask, batches: Iterable[dict], device: torch.device) -> list[dict]:
    """Push where no two prototypes take the same crop (``schedule.push_distinct``), logged as
    ``push_prototypes`` logs (``distance``: to the crop taken).

    Each rank keeps, per prototype, its m nearest own-class crops (m: the most prototypes a class has, so a free
    one is always among them); the ranks' candidates are merged, and on every rank alike the prototypes, nearest
    first, each take their nearest crop that no prototype took before (ties: distance, key, mask index). Only a
    class with fewer valid crops than prototypes reuses a crop."""
    net: ProtoMask = getattr(model, "module", model)
    num_p, dim = net.prototypes.shape
    m = int(torch.bincount(net.prototype_class).max())
    proto_class = net.prototype_class.to(device)
    cand_d = torch.full((num_p, 0), INF)
    cand_z = torch.zeros(num_p, 0, dim)
    cand_id: list[list[tuple[str, int] | None]] = [[] for _ in range(num_p)]
    with _EvalMode(net):
        for batch in batches:
            crops, valid, labels, keys = _batch_tensors(batch, device)
            if crops.shape[0] == 0 or crops.shape[1] == 0:
                continue
            z = net.embed(crops, valid)
            valid = net.region_valid(valid)
            allowed = valid[:, :, None] & (labels[:, None, None] == proto_class[None, None, :])
            d = net.distances(z).float().masked_fill(~allowed, INF)
            k = d.shape[1]
            values, rows = d.flatten(0, 1).topk(min(m, d.shape[0] * k), dim=0, largest=False)  # [m', P]
            values, rows = values.T.cpu(), rows.T.cpu()
            ids = [[(keys[r // k], r % k) for r in row] for row in rows.tolist()]
            cand_d = torch.cat([cand_d, values], 1)
            cand_z = torch.cat([cand_z, z.flatten(0, 1).float().cpu()[rows]], 1)
            cand_id = [a + b for a, b in zip(cand_id, ids)]
            keep = cand_d.topk(min(m, cand_d.shape[1]), dim=1, largest=False).indices
            cand_d, cand_z = cand_d.gather(1, keep), cand_z[torch.arange(num_p)[:, None], keep]
            cand_id = [[ids_j[i] for i in row] for ids_j, row in zip(cand_id, keep.tolist())]
    if _distributed() and dist.get_world_size() > 1:
        pad = m - cand_d.shape[1]  # a rank that saw fewer than m crops
        cand_d = torch.cat([cand_d, torch.full((num_p, pad), INF)], 1)
        cand_z = torch.cat([cand_z, torch.zeros(num_p, pad, dim)], 1)
        cand_id = [ids + [None] * pad for ids in cand_id]
        cand_d = torch.cat(_all_gather(cand_d, device), 1)
        cand_z = torch.cat(_all_gather(cand_z, device), 1)
        cand_id = [sum(ids, []) for ids in zip(*_all_gather_object(cand_id))]
    options = [sorted((float(cand_d[j, i]), *cand_id[j][i], i) for i in range(cand_d.shape[1])
                      if cand_id[j][i] is not None and cand_d[j, i] < INF) for j in range(num_p)]
    log, taken = [None] * num_p, set()
    classes = net.prototype_class.tolist()
    for j in sorted(range(num_p), key=lambda j: (options[j][0][0], j) if options[j] else (INF, j)):
        if not options[j]:  # no training image of this class: the prototype stays
            log[j] = {"prototype": j, "class": classes[j], "key": None, "mask_index": None, "distance": INF}
            continue
        d, key, mask, i = next((o for o in options[j] if o[1:3] not in taken), options[j][0])
        taken.add((key, mask))
        with torch.no_grad():
            net.prototypes.data[j] = cand_z[j, i].to(net.prototypes.device, net.prototypes.dtype)
        log[j] = {"prototype": j, "class": classes[j], "key": key, "mask_index": int(mask), "distance": d}
    return log


def prune_prototypes(model: ProtoMask, batches: Iterable[dict], device: torch.device, k: int, threshold: int) -> dict:
    """Prune the prototypes whose k nearest training images hold fewer than ``threshold`` of their class.

    Image distance = min over the image's valid crops (images without a valid crop never count). With
    fewer than k training images in all, all of them are used. Every rank computes the same ``keep`` from
    gathered candidates and calls ``model.prune(keep)``; a DDP wrapper must be rebuilt afterwards (the
    prototype and last-layer parameters are new objects). Returns ``{"pruned": [indices], "kept": n}``.
    """
    net: ProtoMask = getattr(model, "module", model)
    num_p = net.prototypes.shape[0]
    pool_d = torch.empty(0, num_p)  # [n ≤ k, P], sorted ascending per column
    pool_label = torch.empty(0, num_p, dtype=torch.long)
    pool_key = torch.empty(0, num_p, dtype=torch.long)  # index into keys_seen
    keys_seen: list[str] = []

    with _EvalMode(net):
        for batch in batches:
            crops, valid, labels, keys = _batch_tensors(batch, device)
            b = crops.shape[0]
            if b == 0 or crops.shape[1] == 0:
                continue
            d = net.distances(net.embed(crops, valid)).float()  # [B, N, P]
            valid = net.region_valid(valid)
            image_d = d.masked_fill(~valid[:, :, None], INF).min(dim=1).values.cpu()  # [B, P]
            key_idx = torch.arange(len(keys_seen), len(keys_seen) + b)
            keys_seen += keys
            cand_d = torch.cat([pool_d, image_d])
            cand_label = torch.cat([pool_label, labels.cpu()[:, None].expand(b, num_p)])
            cand_key = torch.cat([pool_key, key_idx[:, None].expand(b, num_p)])
            order = torch.sort(cand_d, dim=0, stable=True).indices[:k]
            pool_d = cand_d.gather(0, order)
            pool_label = cand_label.gather(0, order)
            pool_key = cand_key.gather(0, order)

    # pad to exactly k rows (inf, label -1) so every rank gathers the same shape
    pad = k - pool_d.shape[0]
    if pad > 0:
        pool_d = torch.cat([pool_d, torch.full((pad, num_p), INF)])
        pool_label = torch.cat([pool_label, torch.full((pad, num_p), -1, dtype=torch.long)])
        pool_key = torch.cat([pool_key, torch.full((pad, num_p), -1, dtype=torch.long)])
    finite = torch.isfinite(pool_d)
    pool_label = pool_label.masked_fill(~finite, -1)

    if _distributed() and dist.get_world_size() > 1:
        names = [[keys_seen[i] if i >= 0 else "" for i in col] for col in pool_key.T.tolist()]  # [P][k]
        all_d = [t.T.tolist() for t in _all_gather(pool_d, device)]  # W × [P][k]
        all_label = [t.T.tolist() for t in _all_gather(pool_label, device)]
        all_names = _all_gather_object(names)
        labels_top = torch.full((k, num_p), -1, dtype=torch.long)
        for j in range(num_p):
            cands = [
                (all_d[w][j][i], all_names[w][j][i], all_label[w][j][i])
                for w in range(len(all_d))
                for i in range(k)
                if all_d[w][j][i] != INF
            ]
            cands.sort(key=lambda c: (c[0], c[1]))
            for i, c in enumerate(cands[:k]):
                labels_top[i, j] = c[2]
    else:
        labels_top = pool_label

    own = (labels_top == net.prototype_class.cpu()[None, :]).sum(dim=0)  # [P]
    keep = own >= threshold
    net.prune(keep.to(net.prototypes.device))
    return {"pruned": torch.nonzero(~keep).flatten().tolist(), "kept": int(keep.sum())}


def _regions_stream(net: ProtoMask, dataset: ShardDataset, keys: Iterable[str], batch_size: int) -> ShardStream:
    """The model's inputs for ``keys`` in order, unaugmented, on this process alone (every rank reads them all)."""
    return ShardStream.for_model(dataset, keys, DataConfig(loader_threads=0), net.config, batch_size=batch_size,
                                 train=False)


ADDON_IMAGES = 512  # training images whose regions standardise the add-on's projections


def addon_from_classifier(model: ProtoMask, scorer: LinearHead, dataset: ShardDataset, keys: Iterable[str],
                          device: torch.device, *, batch_size: int) -> dict:
    """Start the add-on's first r = min(D, C, channels) channels on the pre-trained classifier's leading
    right singular directions (the backbone-feature directions the classes differ along most), each
    standardised over the regions of the first ``ADDON_IMAGES`` training images (in key order), so the
    sigmoid embedding starts class-discriminative and unsaturated; the other channels keep their random
    start. The 1x1 convolution commutes with the region pooling, so a region's pre-activation is its pooled
    features' projection. Every rank computes the same weights. Returns what was done, for the log."""
    net: ProtoMask = getattr(model, "module", model)
    conv: torch.nn.Conv2d = net.add_on[0]
    directions = torch.linalg.svd(scorer.classifier.weight.detach().float().cpu(), full_matrices=False).Vh
    r = min(conv.out_channels, directions.shape[0])
    directions = directions[:r]
    first = sorted(keys)[:ADDON_IMAGES]
    projections = []
    with _EvalMode(scorer):
        for batch in _regions_stream(net, dataset, first, batch_size):
            crops, valid, _, _ = _batch_tensors(batch, device)
            features = scorer.region_features(crops, valid, net.grid).float().cpu()
            projections.append(features[net.region_valid(valid).cpu()] @ directions.T)
    p = torch.cat(projections)
    mean, std = p.mean(0), p.std(0).clamp_min(1e-6)
    with torch.no_grad():
        conv.weight[:r] = (directions / std[:, None])[..., None, None].to(conv.weight)
        conv.bias[:r] = (-mean / std).to(conv.bias)
    return {"channels": r, "regions": int(p.shape[0]), "images": len(first)}


def place_on_crops(model: ProtoMask, scorer: LinearHead, dataset: ShardDataset, keys: Iterable[str],
                   device: torch.device, *, batch_size: int) -> list[dict]:
    """Put the prototypes of every class c on the training regions that ``scorer`` (the pre-trained linear
    head on the model's own backbone) scores highest for c: each image of c offers its best region, and
    the class's best images (ties: smaller key), one per prototype, again from the best when c has fewer
    images than prototypes. Every rank reads all ``keys`` and computes the same result, without
    collectives. Returns one ``{"prototype", "class", "key", "mask_index", "score"}`` per placed prototype
    (a class without training images keeps its prototypes)."""
    net: ProtoMask = getattr(model, "module", model)
    stream = _regions_stream(net, dataset, keys, batch_size)
    offers: dict[int, list[tuple[float, str, int, torch.Tensor]]] = defaultdict(list)  # class -> its images' best
    with _EvalMode(net), _EvalMode(scorer):
        for batch in stream:
            crops, valid, labels, keys_b = _batch_tensors(batch, device)
            z = net.embed(crops, valid).float().cpu()
            scores = scorer.region_logits(crops, valid, net.grid)  # [B, N, C]
            own = scores.gather(2, labels[:, None, None].expand(-1, scores.shape[1], 1))[..., 0]
            best, region = own.masked_fill(~net.region_valid(valid), -INF).float().cpu().max(dim=1)
            for i, key in enumerate(keys_b):
                offers[int(labels[i])].append((float(best[i]), key, int(region[i]), z[i, region[i]]))
    for c in offers:
        offers[c].sort(key=lambda offer: (-offer[0], offer[1]))
    taken: dict[int, int] = defaultdict(int)
    log = []
    with torch.no_grad():
        for j, c in enumerate(net.prototype_class.tolist()):
            if not offers.get(c):
                continue
            score, key, region, z = offers[c][taken[c] % len(offers[c])]
            taken[c] += 1
            net.prototypes.data[j] = z.to(net.prototypes.device, net.prototypes.dtype)
            log.append({"prototype": j, "class": c, "key": key, "mask_index": region, "score": score})
    return log

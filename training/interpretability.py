"""The paper's saliency metrics of a prototype model on one split (spec §7.3–§7.5, fixed per §9), one pass
over the samples.

Paper metrics, on each image's top-k prototypes by similarity (the max over its regions), each with the saliency
of ``explain.saliency`` (PRP by default, as in the paper) and its binary 95th-percentile mask Ŝ
(``metrics.percentile_mask``):

* ``vlc``: per image the mean pairwise 1 − IoU of its k masks Ŝ, averaged over images;
* ``object_overlap``, ``background_overlap``, ``ior``: against the ground-truth object mask (``object.png``),
  averaged over (image, prototype) pairs of the images that carry one;
* ``consistency``: on images with ground-truth parts, how consistently each prototype's Ŝ covers the same parts
  (``metrics.consistency``; a part is hit when Ŝ covers its keypoint, or half of the smaller of Ŝ and a part
  region).

Ours, on the top-k prototypes by contribution to the predicted class, with the matched region as saliency:

* ``part_hit_rate``: share of correctly classified samples whose top prototype's region overlaps part 1 (the
  synthetic data's discriminative part; ``part_hit_n`` such samples);
* ``part_consistency``: ``consistency`` with the regions instead of Ŝ;
* ``part_stability``: per (sample, prototype), 1 − |Δ| / |∪| of the parts its region hits in the sample and in
  a fixed perturbed view of the same crops (pairs hitting no part in either are skipped).

A metric whose ground truth no sample carries is left out of the result.
"""

from __future__ import annotations

import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from schemas.shard import SampleRecord
from training.data import IMAGENET_MEAN, IMAGENET_STD, ShardDataset
from training.explain import (Relevance, ground_truth_object, ground_truth_parts, hit_parts, model_inputs, overlaps,
                              read_samples, region_masks, saliency, top_evidence)
from training.metrics import (background_overlap, consistency, inside_outside_relevance, location_change,
                              object_overlap, percentile_mask)
from training.model import ProtoMask
from training.prp import canonizers

Track = Callable[[Iterator, int], Iterator]  # (items, how many) -> the same items, shown as they are taken


def default_relevance(model: ProtoMask) -> Relevance:
    """PRP, the paper's saliency, where the backbone has LRP canonizers; gradient × input otherwise."""
    try:
        canonizers(model.config.backbone)
    except ValueError:
        return "gradient"
    return "prp"


def perturb(crops: torch.Tensor, seed: int) -> torch.Tensor:
    """The fixed second view of the stability metric (spec §7.5): colour ×1.125, hue 0.05, Gaussian noise
    (σ = 5/255), 3×3 blur, on the un-normalised crops (on their device)."""
    import torchvision.transforms.v2.functional as TF

    mean = torch.tensor(IMAGENET_MEAN, device=crops.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=crops.device)[:, None, None]
    x = (crops * std + mean).clamp(0, 1)
    for adjust in (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation):
        x = adjust(x, 1.125)
    x = TF.gaussian_blur(TF.adjust_hue(x, 0.05), [3, 3])
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x.device)  # the same on any device
    x = (x + noise * 5 / 255).clamp(0, 1)
    return (x - mean) / std


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _counters() -> dict[str, Counter]:
    return {"paper": Counter(), "regions": Counter()}


def _by_prototype(hits: Counter) -> dict[int, dict[int, int]]:
    """``{(prototype, part): n}`` as ``{prototype: {part: n}}``."""
    nested: dict[int, dict[int, int]] = defaultdict(dict)
    for (prototype, part), n in hits.items():
        nested[prototype][part] = n
    return nested


@dataclass
class Tally:
    """The per-sample values and counts behind the metrics, over some samples of a split. Tallies of disjoint
    samples add up (``+``), so that workers can each take a share of the split."""

    vlc: list[float] = field(default_factory=list)
    object_overlap: list[float] = field(default_factory=list)
    background_overlap: list[float] = field(default_factory=list)
    ior: list[float] = field(default_factory=list)
    stability: list[float] = field(default_factory=list)
    correct: int = 0  # correctly classified samples with a part 1, and how many of them hit it
    hits: int = 0
    with_parts: bool = False
    with_part_one: bool = False
    seen: dict[str, Counter] = field(default_factory=_counters)  # per variant: top-k appearances per prototype,
    part_hits: dict[str, Counter] = field(default_factory=_counters)  # and hits per (prototype, part)

    def __add__(self, other: Tally) -> Tally:
        return Tally(**{name: getattr(self, name) + getattr(other, name)
                        for name in ("vlc", "object_overlap", "background_overlap", "ior", "stability", "correct",
                                     "hits")},
                     with_parts=self.with_parts or other.with_parts,
                     with_part_one=self.with_part_one or other.with_part_one,
                     seen={v: self.seen[v] + other.seen[v] for v in self.seen},
                     part_hits={v: self.part_hits[v] + other.part_hits[v] for v in self.part_hits})

    def metrics(self) -> dict:
        """The metrics of the module docstring; a metric whose ground truth no sample carried is left out."""
        result: dict = {}
        if self.vlc:
            result["vlc"] = _mean(self.vlc)
        if self.object_overlap:
            result.update(object_overlap=_mean(self.object_overlap),
                          background_overlap=_mean(self.background_overlap), ior=_mean(self.ior))
        if self.with_parts:
            result.update(consistency=consistency(self.seen["paper"], _by_prototype(self.part_hits["paper"])),
                          part_consistency=consistency(self.seen["regions"], _by_prototype(self.part_hits["regions"])),
                          part_stability=_mean(self.stability) if self.stability else 0.0)
        if self.with_part_one:
            result.update(part_hit_rate=self.hits / self.correct if self.correct else 0.0, part_hit_n=self.correct)
        return result


def _tally(model: ProtoMask, dataset: ShardDataset, keys: list[str], *, k: int, relevance: Relevance,
           track: Track | None) -> Tally:
    """One pass over the samples ``keys`` (the model in eval mode, on any device)."""
    t = Tally()
    samples = read_samples(dataset, keys)
    for key, members in samples if track is None else track(samples, len(keys)):
        record = SampleRecord.model_validate_json(members["json"])
        crops, valid, label, _ = model_inputs(model, members, record)
        with torch.no_grad():
            out = model(crops[None], valid[None])
        top = out.similarities[0].topk(min(k, out.similarities.shape[1])).indices.tolist()
        regions = region_masks(model, members, record)
        maps = saliency(model, members, record, crops, valid, [(p, int(out.nearest_mask[0, p])) for p in top],
                        relevance=relevance, masks=regions)
        binary = np.stack([percentile_mask(m) for m in maps])
        t.vlc.append(location_change(binary))
        obj = ground_truth_object(members)
        if obj is not None:
            for level, mask in zip(maps, binary):
                t.object_overlap.append(object_overlap(mask, obj))
                t.background_overlap.append(background_overlap(mask, obj))
                t.ior.append(inside_outside_relevance(level, obj))
        parts = ground_truth_parts(members, record)
        if not parts:
            continue
        t.with_parts = True
        predicted, evidence = top_evidence(model, out, k)
        matched = [regions[e.mask_index] for e in evidence]  # the saliency of our columns: the matched region
        if 1 in parts and record.part_names is not None:
            t.with_part_one = True
            if predicted == label:
                t.correct += 1
                t.hits += overlaps(matched[0], parts[1])
        with torch.no_grad():  # the perturbation is seeded by the key: the same view in any share of the split
            second = model(perturb(crops, zlib.crc32(key.encode()))[None], valid[None]).nearest_mask[0]
        for variant, pairs in (("paper", zip(top, binary)), ("regions", zip((e.prototype for e in evidence), matched))):
            for prototype, mask in pairs:
                t.seen[variant][prototype] += 1
                for part in hit_parts(mask, parts):
                    t.part_hits[variant][prototype, part] += 1
        for e, mask in zip(evidence, matched):
            first, other = hit_parts(mask, parts), hit_parts(regions[int(second[e.prototype])], parts)
            if first | other:
                t.stability.append(1 - len(first ^ other) / len(first | other))
    return t


def interpretability_metrics(model: ProtoMask, dataset: ShardDataset, keys: Iterable[str], *, k: int = 5,
                             relevance: Relevance | None = None, track: Track | None = None) -> dict:
    """The metrics of the module docstring over the samples ``keys`` (the model in eval mode, on any device);
    ``relevance``: the saliency of the paper metrics (default: ``default_relevance``); ``track`` wraps this
    process's samples with a progress display. In a process group each rank takes every world-size-th key and
    all ranks get the metrics of all keys: every rank must call it."""
    relevance = relevance or default_relevance(model)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    tally = _tally(model, dataset, sorted(keys)[rank::world], k=k, relevance=relevance, track=track)
    if distributed:
        tallies: list = [None] * world
        dist.all_gather_object(tallies, tally)
        tally = sum(tallies[1:], tallies[0])
    return {"relevance": relevance, **tally.metrics()}

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

from collections import defaultdict
from collections.abc import Iterable

import numpy as np
import torch

from schemas.shard import SampleRecord
from training.data import IMAGENET_MEAN, IMAGENET_STD, ShardDataset, decode_sample
from training.explain import (Relevance, ground_truth_object, ground_truth_parts, hit_parts, overlaps, read_samples,
                              region_masks, saliency, top_evidence)
from training.metrics import (background_overlap, consistency, inside_outside_relevance, location_change,
                              object_overlap, percentile_mask)
from training.model import ProtoMask
from training.prp import canonizers


def default_relevance(model: ProtoMask) -> Relevance:
    """PRP, the paper's saliency, where the backbone has LRP canonizers; gradient × input otherwise."""
    try:
        canonizers(model.config.backbone)
    except ValueError:
        return "gradient"
    return "prp"


def perturb(crops: torch.Tensor, seed: int) -> torch.Tensor:
    """The fixed second view of the stability metric (spec §7.5): colour ×1.125, hue 0.05, Gaussian noise
    (σ = 5/255), 3×3 blur, on the un-normalised crops."""
    import torchvision.transforms.v2.functional as TF

    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    x = (crops * std + mean).clamp(0, 1)
    for adjust in (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation):
        x = adjust(x, 1.125)
    x = TF.gaussian_blur(TF.adjust_hue(x, 0.05), [3, 3])
    x = (x + torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)) * 5 / 255).clamp(0, 1)
    return (x - mean) / std


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def interpretability_metrics(model: ProtoMask, dataset: ShardDataset, keys: Iterable[str], *, k: int = 5,
                             relevance: Relevance | None = None) -> dict:
    """The metrics of the module docstring over the samples ``keys`` (the model in eval mode, on the CPU);
    ``relevance``: the saliency of the paper metrics (default: ``default_relevance``)."""
    relevance = relevance or default_relevance(model)
    patches = model.config.regions == "patches"
    vlc, object_share, background_share, ior, stability = [], [], [], [], []
    correct = hits = 0
    seen: dict[str, dict[int, int]] = {"paper": defaultdict(int), "regions": defaultdict(int)}
    part_hits: dict[str, dict[int, dict[int, int]]] = {"paper": defaultdict(dict), "regions": defaultdict(dict)}
    with_parts = with_part_one = False
    for index, (_, members) in enumerate(read_samples(dataset, keys)):
        record = SampleRecord.model_validate_json(members["json"])
        crops, valid, label, _ = decode_sample(members, record.masks_per_image, model.config.input_size, None,
                                             whole_image=patches)
        with torch.no_grad():
            out = model(crops[None], valid[None])
        top = out.similarities[0].topk(min(k, out.similarities.shape[1])).indices.tolist()
        regions = region_masks(model, members, record)
        maps = saliency(model, members, record, crops, valid, [(p, int(out.nearest_mask[0, p])) for p in top],
                        relevance=relevance, masks=regions)
        binary = np.stack([percentile_mask(m) for m in maps])
        vlc.append(location_change(binary))
        obj = ground_truth_object(members)
        if obj is not None:
            for level, mask in zip(maps, binary):
                object_share.append(object_overlap(mask, obj))
                background_share.append(background_overlap(mask, obj))
                ior.append(inside_outside_relevance(level, obj))
        parts = ground_truth_parts(members, record)
        if not parts:
            continue
        with_parts = True
        predicted, evidence = top_evidence(model, out, k)
        matched = [regions[e.mask_index] for e in evidence]  # the saliency of our columns: the matched region
        if 1 in parts and record.part_names is not None:
            with_part_one = True
            if predicted == label:
                correct += 1
                hits += overlaps(matched[0], parts[1])
        with torch.no_grad():
            second = model(perturb(crops, index)[None], valid[None]).nearest_mask[0]
        for variant, pairs in (("paper", zip(top, binary)), ("regions", zip((e.prototype for e in evidence), matched))):
            for prototype, mask in pairs:
                seen[variant][prototype] += 1
                for part in hit_parts(mask, parts):
                    part_hits[variant][prototype][part] = part_hits[variant][prototype].get(part, 0) + 1
        for e, mask in zip(evidence, matched):
            first, other = hit_parts(mask, parts), hit_parts(regions[int(second[e.prototype])], parts)
            if first | other:
                stability.append(1 - len(first ^ other) / len(first | other))
    result: dict = {"relevance": relevance}
    if vlc:
        result["vlc"] = _mean(vlc)
    if object_share:
        result.update(object_overlap=_mean(object_share), background_overlap=_mean(background_share), ior=_mean(ior))
    if with_parts:
        result.update(consistency=consistency(seen["paper"], part_hits["paper"]),
                      part_consistency=consistency(seen["regions"], part_hits["regions"]),
                      part_stability=_mean(stability) if stability else 0.0)
    if with_part_one:
        result.update(part_hit_rate=hits / correct if correct else 0.0, part_hit_n=correct)
    return result

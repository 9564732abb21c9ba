"""Explanations: each prototype's evidence is exactly the mask it matched.

* ``explain_sample``: predicted class and the top-k prototypes by contribution (similarity × the
  predicted class's last-layer weight), each with the mask it matched; the saliency map is zero
  outside that mask's pixels (the reference pasted relevance into the mask's box, spec §6.1).
* ``part_hit_rate``: on data with ground-truth parts, the share of correctly classified images whose
  top prototype's mask overlaps the discriminative part (part id 1).
* ``render_explanation`` / ``render_gallery``: PNGs of one explanation and of every prototype's push
  source, grouped by class.
"""

from __future__ import annotations

import io
import itertools
import json
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from pipeline.masks import decode_masks
from pipeline.shards import ShardError, iter_samples
from schemas.shard import MASKS_MEMBER, SampleRecord
from training.data import ShardDataset, decode_sample
from training.model import ProtoMask

OVERLAP = 0.5  # a mask "hits" a part when their intersection covers half of the smaller of the two
OUTLINE = (255, 40, 40)


def read_samples(dataset: ShardDataset, keys: Iterable[str]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The members of each wanted sample, reading only the shards that hold them (in key order)."""
    shard_of = {r["key"]: r["shard"] for r in dataset.rows}
    wanted: dict[int, set[str]] = defaultdict(set)
    for key in keys:
        if key not in shard_of:
            raise ShardError(f"{dataset.root}: no ok sample with key {key!r}")
        wanted[shard_of[key]].add(key)
    for shard in sorted(wanted):
        for key, members in iter_samples(dataset.tar_path(shard)):
            if key in wanted[shard]:
                yield key, members


@dataclass
class Evidence:
    prototype: int
    prototype_class: int
    mask_index: int
    similarity: float
    contribution: float


@dataclass
class Explanation:
    key: str
    label: int
    predicted: int
    evidence: list[Evidence]  # top-k by contribution to the predicted class, largest first
    saliency: np.ndarray  # [k, H, W] float32 at the image's size: zero outside each matched mask


def region_masks(model: ProtoMask, members: dict[str, bytes], record: SampleRecord) -> np.ndarray:
    """[N, H, W] bool pixels of the regions the model embeds: the stored masks, or the patch grid cells."""
    if model.config.regions == "masks":
        return decode_masks(members[MASKS_MEMBER], record.width)
    g = model.grid
    rows = np.linspace(0, record.height, g + 1).round().astype(int)
    cols = np.linspace(0, record.width, g + 1).round().astype(int)
    cells = np.zeros((g * g, record.height, record.width), bool)
    for i in range(g):
        for j in range(g):
            cells[i * g + j, rows[i] : rows[i + 1], cols[j] : cols[j + 1]] = True
    return cells


def explain_sample(model: ProtoMask, members: dict[str, bytes], k: int = 3, relevance: bool = False) -> Explanation:
    """Top-k prototypes of one sample and their saliency, zero outside each matched region's pixels:
    the binary region, or (``relevance``) gradient × input of the prototype's similarity, mapped from the
    crop back onto the region's box and masked by the region."""
    record = SampleRecord.model_validate_json(members["json"])
    patches = model.config.regions == "patches"
    crops, valid, label, key = decode_sample(members, record.masks_per_image, model.config.input_size, None,
                                             whole_image=patches)
    crops = crops[None].requires_grad_(relevance)
    with torch.set_grad_enabled(relevance):
        out = model(crops, valid[None])
    predicted = int(out.logits.argmax(1))
    contribution = (out.similarities[0] * model.last_layer.weight[predicted]).detach()
    top = contribution.topk(min(k, contribution.numel())).indices.tolist()
    masks = region_masks(model, members, record)
    evidence = [
        Evidence(p, int(model.prototype_class[p]), int(out.nearest_mask[0, p]), float(out.similarities[0, p].detach()),
                 float(contribution[p]))
        for p in top
    ]
    saliency = np.stack([masks[e.mask_index].astype(np.float32) for e in evidence])
    if relevance:
        for i, e in enumerate(evidence):
            (grad,) = torch.autograd.grad(out.similarities[0, e.prototype], crops, retain_graph=True)
            crop_index = 0 if patches else e.mask_index
            rel = (grad * crops)[0, crop_index].sum(0).clamp_min(0).detach().numpy()  # [S, S], crop space
            x0, y0, x1, y1 = (0, 0, record.width - 1, record.height - 1) if patches else record.boxes[e.mask_index]
            box = np.asarray(Image.fromarray(rel).resize((x1 - x0 + 1, y1 - y0 + 1), Image.BILINEAR))
            canvas = np.zeros_like(saliency[i])
            canvas[y0 : y1 + 1, x0 : x1 + 1] = box
            saliency[i] = np.clip(canvas, 0, None) * saliency[i]
    return Explanation(key, label, predicted, evidence, saliency)


def overlaps(mask: np.ndarray, part: np.ndarray) -> bool:
    """Intersection covers at least ``OVERLAP`` of the smaller of mask and part."""
    smaller = min(int(mask.sum()), int(part.sum()))
    return smaller > 0 and int((mask & part).sum()) >= OVERLAP * smaller


def _parts(members: dict[str, bytes], record: SampleRecord) -> dict[int, np.ndarray]:
    """Ground-truth parts as pixel masks: the regions of ``parts.png`` (synthetic), or one pixel per
    visible CUB keypoint (``extra.parts``, original pixels scaled to the stored image)."""
    if "parts.png" in members:
        labels = np.asarray(Image.open(io.BytesIO(members["parts.png"])))
        return {int(i): labels == i for i in np.unique(labels) if i}
    parts = {}
    for part_id, x, y in record.extra.get("parts", []):
        px = min(int(x * record.width / record.original_width), record.width - 1)
        py = min(int(y * record.height / record.original_height), record.height - 1)
        point = np.zeros((record.height, record.width), bool)
        point[py, px] = True
        parts[int(part_id)] = point
    return parts


def _hit_parts(region: np.ndarray, parts: dict[int, np.ndarray]) -> set[int]:
    return {i for i, part in parts.items() if overlaps(region, part)}


def perturb(crops: torch.Tensor, seed: int) -> torch.Tensor:
    """The fixed second view of the stability metric (spec §7.5): colour ×1.125, hue 0.05, Gaussian noise
    (σ = 5/255), 3×3 blur, on the un-normalised crops."""
    import torchvision.transforms.v2.functional as TF

    from training.data import IMAGENET_MEAN, IMAGENET_STD

    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    x = (crops * std + mean).clamp(0, 1)
    for adjust in (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation):
        x = adjust(x, 1.125)
    x = TF.gaussian_blur(TF.adjust_hue(x, 0.05), [3, 3])
    x = (x + torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)) * 5 / 255).clamp(0, 1)
    return (x - mean) / std


@torch.no_grad()
def part_metrics(model: ProtoMask, dataset: ShardDataset, keys: Iterable[str], k: int = 5) -> dict:
    """Part-based interpretability on samples with ground-truth parts (spec §7.4–§7.5, fixed per §9):

    * ``part_hit_rate``: share of correctly classified samples whose top prototype's region overlaps
      part 1 (the discriminative part of the synthetic data; CUB has none, so it stays 0 there);
    * ``part_consistency`` (×100): per prototype that appears in any top-k, the mean over the parts it
      ever hit of how often it hit that part when in a top-k (binary saliency, no int-cast bug); mean
      over those prototypes;
    * ``part_stability`` (×100): per (sample, top-k prototype), 1 − |Δ| / |∪| of the parts its region hits
      in the sample and in a fixed perturbed view of the same crops (pairs hitting no part are skipped).
    """
    correct = hits = 0
    appearances: dict[int, int] = defaultdict(int)
    part_hits: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    stability = []
    for index, (_, members) in enumerate(read_samples(dataset, keys)):
        record = SampleRecord.model_validate_json(members["json"])
        parts = _parts(members, record)
        if not parts:
            continue
        explanation = explain_sample(model, members, k)
        if explanation.predicted == explanation.label and 1 in parts and record.part_names is not None:
            correct += 1
            hits += overlaps(explanation.saliency[0] > 0, parts[1])
        regions = region_masks(model, members, record)
        crops, valid, _, _ = decode_sample(members, record.masks_per_image, model.config.input_size, None,
                                           whole_image=model.config.regions == "patches")
        second = model(perturb(crops, index)[None], valid[None]).nearest_mask[0]
        for e, saliency in zip(explanation.evidence, explanation.saliency):
            first = _hit_parts(saliency > 0, parts)
            appearances[e.prototype] += 1
            for part in first:
                part_hits[e.prototype][part] += 1
            other = _hit_parts(regions[int(second[e.prototype])], parts)
            if first | other:
                stability.append(1 - len(first ^ other) / len(first | other))
    scores = [sum(n / appearances[p] for n in part_hits[p].values()) / len(part_hits[p]) if part_hits[p] else 0.0
              for p in appearances]
    return {
        "part_hit_rate": hits / correct if correct else 0.0,
        "part_hit_n": correct,
        "part_consistency": 100 * sum(scores) / len(scores) if scores else 0.0,
        "part_stability": 100 * sum(stability) / len(stability) if stability else 0.0,
    }


def _outlined(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """The image with the mask's boundary drawn in red and the outside dimmed."""
    inside = np.asarray(image, dtype=np.float32)
    dimmed = np.where(mask[..., None], inside, inside * 0.35)
    edge = mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1))
    dimmed[edge] = OUTLINE
    return Image.fromarray(dimmed.astype(np.uint8))


def _tile(images: list[Image.Image], size: int) -> Image.Image:
    canvas = Image.new("RGB", (size * len(images), size), "white")
    for i, im in enumerate(images):
        canvas.paste(im.resize((size, size)), (i * size, 0))
    return canvas


def render_explanation(explanation: Explanation, members: dict[str, bytes], sources: dict[int, Image.Image],
                       classes: list[str], path: Path, size: int = 160) -> None:
    """One row per top prototype: the image with the matched mask outlined, and the prototype's source crop."""
    image = Image.open(io.BytesIO(members["jpg"])).convert("RGB")
    rows = [_tile([image], size)]
    for e, sal in zip(explanation.evidence, explanation.saliency):
        source = sources.get(e.prototype, Image.new("RGB", (size, size), "grey"))
        row = _tile([_outlined(image, sal > 0), source], size)
        ImageDraw.Draw(row).text((4, 4), f"p{e.prototype} {classes[e.prototype_class]} +{e.contribution:.2f}",
                                 fill=(255, 255, 0))
        rows.append(row)
    width = max(r.width for r in rows)
    canvas = Image.new("RGB", (width, sum(r.height for r in rows) + 20), "white")
    ImageDraw.Draw(canvas).text((4, 4), f"{explanation.key}: true {classes[explanation.label]}, "
                                        f"predicted {classes[explanation.predicted]}", fill=(0, 0, 0))
    y = 20
    for r in rows:
        canvas.paste(r, (0, y))
        y += r.height
    canvas.save(path)


def _box_crop(image: Image.Image, mask: np.ndarray) -> Image.Image:
    ys, xs = np.nonzero(mask)
    return image.crop((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))


def prototype_sources(model: ProtoMask, dataset: ShardDataset,
                      push_log: list[dict]) -> dict[int, tuple[Image.Image, Image.Image]]:
    """Per pushed prototype: (training image with the pushed-onto region outlined, the region's box crop)."""
    by_key = defaultdict(list)
    for entry in push_log:
        if entry["key"] is not None:
            by_key[entry["key"]].append(entry)
    sources = {}
    for key, members in read_samples(dataset, by_key):
        record = SampleRecord.model_validate_json(members["json"])
        masks = region_masks(model, members, record)
        image = Image.open(io.BytesIO(members["jpg"])).convert("RGB")
        for entry in by_key[key]:
            mask = masks[entry["mask_index"]]
            sources[entry["prototype"]] = (_outlined(image, mask), _box_crop(image, mask))
    return sources


def render_gallery(sources: dict[int, tuple[Image.Image, Image.Image]], prototype_class: list[int],
                   classes: list[str], out: Path, size: int = 128) -> list[Path]:
    """One PNG per class: a row per prototype (source image with mask, crop)."""
    paths = []
    for c, name in enumerate(classes):
        protos = [p for p, pc in enumerate(prototype_class) if pc == c and p in sources]
        if not protos:
            continue
        rows = [_tile(list(sources[p]), size) for p in protos]
        canvas = Image.new("RGB", (2 * size, size * len(rows)), "white")
        for i, (p, row) in enumerate(zip(protos, rows)):
            canvas.paste(row, (0, i * size))
            ImageDraw.Draw(canvas).text((4, i * size + 4), f"p{p}", fill=(255, 255, 0))
        path = out / f"gallery_{c:03d}_{name}.png"
        canvas.save(path)
        paths.append(path)
    return paths


def run_explain(run_dir: Path, shards: Path | None, out: Path, *, keys: list[str] | None = None, k: int = 3,
                limit: int = 8, relevance: bool = False) -> dict:
    """``protomask explain``: the prototype gallery and local explanations (default: first test samples;
    default shards: the ones the model was trained on)."""
    from schemas.config import TrainConfig, load_config
    from training.data import split_keys
    from training.export import load_model, trained_on

    model, classes = load_model(run_dir)
    dataset = ShardDataset.open(shards or trained_on(run_dir))
    out.mkdir(parents=True, exist_ok=True)
    push = json.loads((run_dir / "push_log.json").read_text())["push"]
    sources = prototype_sources(model, dataset, push)
    gallery = render_gallery(sources, model.prototype_class.tolist(), classes, out)
    if keys is None:  # the first test samples of each class in turn
        config = load_config(TrainConfig, run_dir / "train_config.yaml", {})
        label_of = {r["key"]: r["label"] for r in dataset.rows}
        by_class = defaultdict(list)
        for key in split_keys(dataset, config.data.val_fraction, config.seed)["test"]:
            by_class[label_of[key]].append(key)
        rounds = itertools.zip_longest(*(by_class[c] for c in sorted(by_class)))
        keys = [k for k in itertools.chain.from_iterable(rounds) if k is not None][:limit]
    crops = {p: crop for p, (_, crop) in sources.items()}
    records = []
    for key, members in read_samples(dataset, keys):
        explanation = explain_sample(model, members, k, relevance)
        path = out / f"explain_{key}.png"
        render_explanation(explanation, members, crops, classes, path)
        records.append({
            "key": key, "label": classes[explanation.label], "predicted": classes[explanation.predicted],
            "png": path.name,
            "evidence": [e.__dict__ for e in explanation.evidence],
        })
    summary = {"gallery": [p.name for p in gallery], "explanations": records}
    (out / "explanations.json").write_text(json.dumps(summary, indent=1))
    return summary

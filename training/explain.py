"""Explanations: each prototype's evidence is exactly the mask it matched.

* ``explain_sample``: predicted class and the top-k prototypes by contribution (similarity × the
  predicted class's last-layer weight), each with the mask it matched; the saliency map (the mask, gradient ×
  input, or PRP relevance) is zero outside that mask's pixels (the reference pasted PRP relevance into the mask's
  box, spec §6.1).
* ``saliency``: the same maps for any (prototype, matched region) pairs of a sample (the metrics of
  ``training.interpretability`` use it on the top-k prototypes by similarity).
* ``render_explanation`` / ``render_gallery``: PNGs of one explanation (saliency heatmap inside each
  matched mask, beside the prototype's push source) and of every prototype's push source, grouped by
  class, flagging prototypes pushed onto another class's image, off their class's part, or onto a region whose
  box is about the whole image.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from pipeline.masks import WHOLE_IMAGE, box_fraction, decode_masks, grow_box, mask_boxes
from pipeline.shards import ShardError, iter_samples
from schemas.shard import MASKS_MEMBER, OBJECT_MEMBER, PARTS_MEMBER, SampleRecord
from schemas.storage import Location, makedirs, put, read_text, size
from training.data import ShardDataset, decode_sample, read_options
from training.model import ModelOutput, ProtoMask
from training.prp import prp_relevance

OVERLAP = 0.5  # a mask "hits" a part when their intersection covers half of the smaller of the two
OUTLINE = (255, 40, 40)
TILE, GAP = 224, 8  # px of one image tile in the PNGs, and between tiles
FLAG, GOOD, INK, MUTED, BACKGROUND = (215, 25, 28), (26, 130, 50), (20, 20, 20), (90, 90, 90), (236, 236, 236)
HEAT = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], np.float32)  # viridis
Relevance = Literal["mask", "gradient", "prp"]


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


def model_inputs(model: ProtoMask, members: dict[str, bytes], record: SampleRecord
                 ) -> tuple[torch.Tensor, torch.Tensor, int, str]:
    """``decode_sample`` of one sample at the model's input size and regions, crops and valid on its device."""
    crops, valid, label, key = decode_sample(members, record.masks_per_image, model.config.input_size, None,
                                             **read_options(model.config))
    device = next(model.parameters()).device
    return crops.to(device), valid.to(device), label, key


def explain_sample(model: ProtoMask, members: dict[str, bytes], k: int = 3, *, relevance: Relevance = "mask"
                   ) -> Explanation:
    """Top-k prototypes of one sample by contribution to the predicted class, and their saliency (``saliency``)."""
    record = SampleRecord.model_validate_json(members["json"])
    crops, valid, label, key = model_inputs(model, members, record)
    with torch.no_grad():
        out = model(crops[None], valid[None])
    predicted, evidence = top_evidence(model, out, k)
    maps = saliency(model, members, record, crops, valid, [(e.prototype, e.mask_index) for e in evidence],
                    relevance=relevance)
    return Explanation(key, label, predicted, evidence, maps)


def top_evidence(model: ProtoMask, out: ModelOutput, k: int) -> tuple[int, list[Evidence]]:
    """The predicted class of one sample's model output and its top-k prototypes by contribution to that class."""
    predicted = int(out.logits.argmax(1))
    contribution = out.similarities[0] * model.prototype_weights()[predicted].detach()
    top = contribution.topk(min(k, contribution.numel())).indices.tolist()
    return predicted, [Evidence(p, int(model.prototype_class[p]), int(out.nearest_mask[0, p]),
                                float(out.similarities[0, p]), float(contribution[p])) for p in top]


def saliency(model: ProtoMask, members: dict[str, bytes], record: SampleRecord, crops: torch.Tensor,
             valid: torch.Tensor, matches: list[tuple[int, int]], *, relevance: Relevance,
             masks: np.ndarray | None = None) -> np.ndarray:
    """[k, H, W] float32 saliency of each (prototype, matched region) of one sample (``crops`` [K, 3, S, S] and
    ``valid`` [K] as ``model_inputs`` gives them, on the model's device), at the image's size and zero outside the
    region's pixels: the binary region (``mask``), or the positive part of the relevance of the prototype's
    similarity in the region's crop (``gradient``: gradient × input; ``prp``: PRP, computed on that crop only),
    mapped from the crop back onto the region's box and masked by the region (the reference pasted PRP relevance
    into the box, spec §6.1).
    ``masks``: the sample's ``region_masks``, where the caller has them already."""
    masks = region_masks(model, members, record) if masks is None else masks
    maps = np.stack([masks[m].astype(np.float32) for _, m in matches]) if matches else np.zeros((0, record.height,
                                                                                                  record.width))
    if relevance == "mask" or not matches:
        return maps
    patches = model.config.regions == "patches"
    crop_of = [0 if patches else m for _, m in matches]
    if relevance == "gradient":
        x = crops[None].clone().requires_grad_(True)
        similarities = model(x, valid[None]).similarities[0]
        grads = [torch.autograd.grad(similarities[p], x, retain_graph=True)[0][0, c]
                 for (p, _), c in zip(matches, crop_of)]
        relevance_maps = torch.stack(grads) * crops[crop_of]
    else:
        prototypes, cells = torch.tensor([(p, m if patches else 0) for p, m in matches], device=crops.device).T
        relevance_maps = prp_relevance(model, crops[crop_of], prototypes=prototypes, cells=cells)
    for i, ((_, m), rel) in enumerate(zip(matches, relevance_maps.sum(1).clamp_min(0).detach().cpu().numpy())):
        x0, y0, x1, y1 = ((0, 0, record.width - 1, record.height - 1) if patches
                          else grow_box(record.boxes[m], model.config.crop_margin, (record.height, record.width)))
        box = np.asarray(Image.fromarray(rel).resize((x1 - x0 + 1, y1 - y0 + 1), Image.BILINEAR))
        canvas = np.zeros_like(maps[i])
        canvas[y0 : y1 + 1, x0 : x1 + 1] = box
        maps[i] = np.clip(canvas, 0, None) * maps[i]
    return maps


def overlaps(mask: np.ndarray, part: np.ndarray) -> bool:
    """Intersection covers at least ``OVERLAP`` of the smaller of mask and part."""
    smaller = min(int(mask.sum()), int(part.sum()))
    return smaller > 0 and int((mask & part).sum()) >= OVERLAP * smaller


def ground_truth_parts(members: dict[str, bytes], record: SampleRecord) -> dict[int, np.ndarray]:
    """Ground-truth parts as pixel masks: the regions of ``parts.png`` (synthetic), or one pixel per
    visible CUB keypoint (``extra.parts``, original pixels scaled to the stored image)."""
    if PARTS_MEMBER in members:
        labels = np.asarray(Image.open(io.BytesIO(members[PARTS_MEMBER])))
        return {int(i): labels == i for i in np.unique(labels) if i}
    parts = {}
    for part_id, x, y in record.extra.get("parts", []):
        px = min(int(x * record.width / record.original_width), record.width - 1)
        py = min(int(y * record.height / record.original_height), record.height - 1)
        point = np.zeros((record.height, record.width), bool)
        point[py, px] = True
        parts[int(part_id)] = point
    return parts


def ground_truth_object(members: dict[str, bytes]) -> np.ndarray | None:
    """The ground-truth object mask [H, W] bool (``object.png``), or None where the shards carry none."""
    if OBJECT_MEMBER not in members:
        return None
    return np.asarray(Image.open(io.BytesIO(members[OBJECT_MEMBER])).convert("L")) > 127


def hit_parts(region: np.ndarray, parts: dict[int, np.ndarray]) -> set[int]:
    return {i for i, part in parts.items() if overlaps(region, part)}


@functools.cache
def _font(size: int, *, bold: bool = False) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans where installed, else Pillow's own scalable font (its bitmap font without FreeType)."""
    try:
        return ImageFont.truetype("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)


def _grow(mask: np.ndarray, *, border: bool = False) -> np.ndarray:
    """4-neighbour dilation; pixels beyond the image count as ``border``."""
    m = np.pad(mask, 1, constant_values=border)
    return m[1:-1, 1:-1] | m[:-2, 1:-1] | m[2:, 1:-1] | m[1:-1, :-2] | m[1:-1, 2:]


def _resized(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The mask at ``size`` (w, h): covered to at least half, or at all where that leaves nothing."""
    level = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.BOX))
    return level >= 128 if (level >= 128).any() else level > 0


def _colormap(level: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] -> [H, W, 3] RGB float (viridis)."""
    return np.stack([np.interp(level, np.linspace(0, 1, len(HEAT)), HEAT[:, i]) for i in range(3)], -1)


def _tile_size(image: Image.Image) -> tuple[int, int]:
    """(w, h) of the image scaled to fit a ``TILE``² tile, aspect kept."""
    scale = TILE / max(image.size)
    return max(1, round(image.width * scale)), max(1, round(image.height * scale))


def _on_tile(shown: Image.Image) -> Image.Image:
    """A ``TILE``² tile with ``shown`` centred on light grey."""
    tile = Image.new("RGB", (TILE, TILE), BACKGROUND)
    tile.paste(shown, ((TILE - shown.width) // 2, (TILE - shown.height) // 2))
    return tile


def _fit(image: Image.Image) -> Image.Image:
    """The image scaled to fit a ``TILE``² tile, aspect kept, centred on light grey."""
    return _on_tile(image.resize(_tile_size(image), Image.LANCZOS))


def _outlined(image: Image.Image, mask: np.ndarray, *, heat: np.ndarray | None = None) -> Image.Image:
    """A ``TILE``² tile of the image with the mask's boundary in red and the outside dimmed; with ``heat``
    (zero outside the mask) the inside coloured by heat relative to its 99th percentile inside the mask (a few hot
    pixels do not wash the rest out), more opaque where hotter."""
    size = _tile_size(image)
    pixels = np.asarray(image.resize(size, Image.LANCZOS), np.float32)
    inside = _resized(mask, size)
    shown = np.where(inside[..., None], pixels, pixels * 0.35)
    if heat is not None:
        level = np.asarray(Image.fromarray(heat.astype(np.float32)).resize(size, Image.BILINEAR))
        hot = level[inside & (level > 0)]
        level = np.clip(level / np.percentile(hot, 99), 0, 1) if hot.size else level
        alpha = (0.2 + 0.5 * level)[..., None]
        shown = np.where(inside[..., None], (1 - alpha) * pixels + alpha * _colormap(level), shown)
    edge = inside & _grow(~inside, border=True)
    shown[edge | (_grow(edge) & ~inside)] = OUTLINE  # 2 px: the mask's own boundary pixels and the ones outside
    return _on_tile(Image.fromarray(shown.astype(np.uint8)))


def _box_crop(image: Image.Image, box: np.ndarray, margin: float) -> Image.Image:
    """The crop the model reads of a region with box ``box``: grown by ``margin`` (``model.crop_margin``)."""
    x0, y0, x1, y1 = grow_box(box, margin, (image.height, image.width))
    return image.crop((x0, y0, x1 + 1, y1 + 1))


def _blank(text: str) -> Image.Image:
    tile = Image.new("RGB", (TILE, TILE), (200, 200, 200))
    ImageDraw.Draw(tile).text((TILE // 2, TILE // 2), text, fill=(80, 80, 80), font=_font(15), anchor="mm")
    return tile


def _clip(text: str, size: int, width: int, *, bold: bool = False) -> str:
    """The text, cut with an ellipsis to fit ``width`` px."""
    font = _font(size, bold=bold)
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def _flag(draw: ImageDraw.ImageDraw, xy: tuple[int, int], words: list[str], size: int = 16) -> None:
    """A red dot, then the flags in red."""
    x, y = xy
    draw.ellipse((x, y + 2, x + size - 2, y + size), fill=FLAG)
    draw.text((x + size + 4, y), ", ".join(words), fill=FLAG, font=_font(size, bold=True))


@dataclass
class PrototypeSource:
    """The training region a prototype was pushed onto, drawn at tile size, and whether it is suspect."""

    prototype: int
    prototype_class: int
    key: str | None  # None: not pushed (its class has no training crop)
    source_class: int | None  # label of the training image pushed onto
    mask_index: int | None
    distance: float | None  # squared L2 distance before projection
    on_part: bool | None  # region overlaps its class's ground-truth part 1; None: the image has no parts
    box_fraction: float | None  # share of the image the region's box covers
    view: Image.Image  # the training image with the region outlined (TILE²)
    crop: Image.Image  # the region's box crop (TILE²)

    @property
    def flags(self) -> list[str]:
        """What is suspect: "other class" (pushed onto another class's image), "off-part" (misses its class's
        ground-truth part 1), "whole image" (the region's box covers at least ``WHOLE_IMAGE`` of the image)."""
        other = self.key is not None and self.source_class != self.prototype_class
        whole = self.box_fraction is not None and self.box_fraction >= WHOLE_IMAGE
        return [word for word, bad in (("other class", other), ("off-part", self.on_part is False),
                                       ("whole image", whole)) if bad]

    def describe(self, classes: list[str]) -> dict:
        """The facts of ``explanations.json``'s ``prototypes`` entries."""
        return {"prototype": self.prototype, "class": classes[self.prototype_class], "key": self.key,
                "source_class": None if self.source_class is None else classes[self.source_class],
                "mask_index": self.mask_index, "distance": self.distance, "on_part": self.on_part,
                "box_fraction": self.box_fraction, "flags": self.flags}


def _discriminative_part(members: dict[str, bytes], record: SampleRecord) -> np.ndarray | None:
    """Pixels of ground-truth part 1 (the class's discriminative part, as in ``part_hit_rate``), or None."""
    return None if record.part_names is None else ground_truth_parts(members, record).get(1)


def prototype_sources(model: ProtoMask, dataset: ShardDataset, push_log: list[dict]) -> dict[int, PrototypeSource]:
    """Per prototype of the push log: the training region it was pushed onto, the class of that image and
    whether the region overlaps its class's ground-truth part (where the shards carry parts)."""
    by_key = defaultdict(list)
    sources = {}
    for entry in push_log:
        if entry["key"] is None:
            sources[entry["prototype"]] = PrototypeSource(
                entry["prototype"], entry["class"], None, None, None, None, None, None, _blank("not pushed"),
                _blank(""))
        else:
            by_key[entry["key"]].append(entry)
    for key, members in read_samples(dataset, by_key):
        record = SampleRecord.model_validate_json(members["json"])
        masks = region_masks(model, members, record)
        image = Image.open(io.BytesIO(members["jpg"])).convert("RGB")
        part = _discriminative_part(members, record)
        for entry in by_key[key]:
            mask = masks[entry["mask_index"]]
            box = mask_boxes(mask[None])[0]
            own = record.label == entry["class"]
            sources[entry["prototype"]] = PrototypeSource(
                entry["prototype"], entry["class"], key, record.label, entry["mask_index"], float(entry["distance"]),
                None if part is None else own and overlaps(mask, part),
                box_fraction(box, mask.shape), _outlined(image, mask),
                _fit(_box_crop(image, box, model.config.crop_margin)))
    return sources


def _heat_legend(draw: ImageDraw.ImageDraw, xy: tuple[int, int]) -> None:
    """A colour bar: 0 … the tile's 99th percentile."""
    x, y = xy
    draw.text((x, y), "heat 0", fill=INK, font=_font(14))
    x0 = x + 56
    for i in range(160):
        draw.line((x0 + i, y + 2, x0 + i, y + 16), fill=tuple(int(v) for v in _colormap(np.array(i / 159))))
    draw.text((x0 + 166, y), "its 99th percentile", fill=INK, font=_font(14))


def render_explanation(explanation: Explanation, members: dict[str, bytes], sources: dict[int, PrototypeSource],
                       classes: list[str], path: Location) -> None:
    """The test image, then a row per top prototype: the image with the saliency as a heatmap inside the
    matched mask (outlined), the training image the prototype was pushed onto with that region outlined,
    and the region's crop; captioned with the prototype, its class, similarity and contribution."""
    image = Image.open(io.BytesIO(members["jpg"])).convert("RGB")
    width, caption = 3 * TILE + 4 * GAP, 48
    top = TILE + 2 * GAP + 26
    canvas = Image.new("RGB", (width, top + len(explanation.evidence) * (caption + TILE + GAP)), "white")
    draw = ImageDraw.Draw(canvas)
    canvas.paste(_fit(image), (GAP, GAP))
    x, right = 2 * GAP + TILE, width - 3 * GAP - TILE
    correct = explanation.predicted == explanation.label
    draw.text((x, GAP), f"test image {explanation.key}", fill=INK, font=_font(20, bold=True))
    draw.text((x, GAP + 34), _clip(f"true: {classes[explanation.label]}", 18, right), fill=INK, font=_font(18))
    draw.text((x, GAP + 62), _clip(f"predicted: {classes[explanation.predicted]}", 18, right),
              fill=GOOD if correct else FLAG, font=_font(18, bold=True))
    draw.text((x, GAP + 100), f"top {len(explanation.evidence)} prototypes by contribution", fill=INK, font=_font(16))
    _heat_legend(draw, (x, GAP + 130))
    draw.text((x, GAP + 156), "red line: the mask's outline", fill=INK, font=_font(14))
    for i, title in enumerate(("matched mask, heatmap", "pushed onto (training image)", "its region")):
        draw.text((GAP + i * (TILE + GAP), TILE + 2 * GAP), title, fill=MUTED, font=_font(15))
    for n, (e, saliency) in enumerate(zip(explanation.evidence, explanation.saliency)):
        y = top + n * (caption + TILE + GAP)
        draw.line((GAP, y, width - GAP, y), fill=(200, 200, 200))
        draw.text((GAP, y + 4), _clip(f"#{n + 1}  p{e.prototype} · similarity {e.similarity:.2f} · contribution "
                                      f"{e.contribution:+.2f} · class {classes[e.prototype_class]}", 16,
                                      width - 2 * GAP, bold=True), fill=INK, font=_font(16, bold=True))
        source = sources.get(e.prototype)
        if source is None or source.key is None:
            line, views = "not pushed", (_blank("no push source"), _blank(""))
        else:
            line = (f"pushed onto {source.key}, mask {source.mask_index}, distance {source.distance:.3g}, "
                    f"class {classes[source.source_class]}")
            views = (source.view, source.crop)
        flags = [] if source is None else source.flags
        draw.text((GAP, y + 26), _clip(line, 14, width - 2 * GAP - (210 if flags else 0)), fill=MUTED, font=_font(14))
        if flags:
            _flag(draw, (width - GAP - 200, y + 24), flags, 14)
        for i, tile in enumerate((_outlined(image, saliency > 0, heat=saliency), *views)):
            canvas.paste(tile, (GAP + i * (TILE + GAP), y + caption))
    _save_png(canvas, path)


def _save_png(image: Image.Image, path: Location) -> None:
    """One PNG, whole or not at all (``storage.put``)."""
    put(path, lambda f: image.save(f, format="PNG"))


def render_gallery(sources: dict[int, PrototypeSource], classes: list[str], out: Location) -> list[Location]:
    """One PNG per class: a row per prototype (the training image with the pushed-onto region outlined, the
    region's crop, its class, the class of the image it was pushed onto, the push distance, the share of the image
    its box covers; flagged in red when that image is of another class, the region misses the class's ground-truth
    part or its box is about the whole image)."""
    paths = []
    panel, head = 360, 44
    for c, name in enumerate(classes):
        protos = sorted(p for p, s in sources.items() if s.prototype_class == c)
        if not protos:
            continue
        flagged = sum(bool(sources[p].flags) for p in protos)
        width = 2 * TILE + panel + 4 * GAP
        canvas = Image.new("RGB", (width, head + len(protos) * (TILE + GAP)), "white")
        draw = ImageDraw.Draw(canvas)
        draw.text((GAP, 10), _clip(f"class {c}: {name} · {len(protos)} prototypes, {flagged} flagged", 20, width,
                                   bold=True), fill=INK, font=_font(20, bold=True))
        for i, p in enumerate(protos):
            s, y, x = sources[p], head + i * (TILE + GAP), 3 * GAP + 2 * TILE
            canvas.paste(s.view, (GAP, y))
            canvas.paste(s.crop, (2 * GAP + TILE, y))
            draw.text((x, y + 4), f"prototype p{p}", fill=INK, font=_font(20, bold=True))
            draw.text((x, y + 34), _clip(f"class: {name}", 16, panel - GAP), fill=INK, font=_font(16))
            if s.key is None:
                draw.text((x, y + 60), "not pushed: no training crop", fill=MUTED, font=_font(16))
            else:
                other = "other class" in s.flags
                lines = [(f"pushed onto {s.key}, mask {s.mask_index}", INK),
                         (f"its class: {classes[s.source_class]}", FLAG if other else INK),
                         (f"push distance: {s.distance:.4g}", INK),
                         ("ground-truth parts: none" if s.on_part is None else
                          f"on its class's part: {'yes' if s.on_part else 'no'}", FLAG if s.on_part is False else INK),
                         (f"its box: {s.box_fraction:.0%} of the image", FLAG if "whole image" in s.flags else INK)]
                for j, (line, colour) in enumerate(lines):
                    draw.text((x, y + 60 + 24 * j), _clip(line, 16, panel - GAP), fill=colour, font=_font(16))
            if s.flags:
                _flag(draw, (x, y + TILE - 26), s.flags, 18)
                draw.rectangle((GAP - 4, y - 4, width - 2, y + TILE + 3), outline=FLAG, width=3)
                draw.ellipse((GAP + 6, y + 6, GAP + 26, y + 26), fill=FLAG, outline="white", width=2)
        path = out / f"gallery_{c:03d}_{name}.png"
        _save_png(canvas, path)
        paths.append(path)
    return paths


def _after_pruning(log: dict) -> list[dict]:
    """The push log's entries of the prototypes the model kept, renumbered as in the model (push ran
    before pruning, so its indices count the pruned prototypes too)."""
    pruned = set(log.get("prune", {}).get("pruned", []))
    kept = [entry for entry in log["push"] if entry["prototype"] not in pruned]
    return [{**entry, "prototype": index} for index, entry in enumerate(kept)]


def run_explain(run_dir: Location | Path, shards: Location | Path | None, out: Location | Path, *,
                keys: list[str] | None = None, k: int = 3, limit: int = 8, relevance: Relevance = "mask") -> dict:
    """``protomask explain``: the prototype gallery and local explanations (default: first test samples;
    default shards: the ones the model was trained on); every folder a path or an S3 prefix."""
    from schemas.config import TrainConfig, load_config
    from training.data import split_keys
    from training.export import load_model, trained_on

    run_dir, out = Location.parse(run_dir), Location.parse(out)
    model, classes = load_model(run_dir)
    if not isinstance(model, ProtoMask):
        raise ValueError(f"{run_dir}: a {model.config.head} head has no prototypes to explain")
    dataset = ShardDataset.open(shards or trained_on(run_dir))
    makedirs(out)
    push_log = run_dir / "push_log.json"
    if size(push_log) is not None:
        push = _after_pruning(json.loads(read_text(push_log)))
    else:  # a model without push (ProtoPool): every prototype under the class it adds most to
        push = [{"prototype": p, "class": int(c), "key": None} for p, c in enumerate(model.prototype_class.tolist())]
    sources = prototype_sources(model, dataset, push)
    gallery = render_gallery(sources, classes, out)
    if keys is None:  # the first test samples of each class in turn
        config = load_config(TrainConfig, run_dir / "train_config.yaml", {})
        label_of = {r["key"]: r["label"] for r in dataset.rows}
        by_class = defaultdict(list)
        for key in split_keys(dataset, config.data.val_fraction, config.seed)["test"]:
            by_class[label_of[key]].append(key)
        rounds = itertools.zip_longest(*(by_class[c] for c in sorted(by_class)))
        keys = [k for k in itertools.chain.from_iterable(rounds) if k is not None][:limit]
    records = []
    for key, members in read_samples(dataset, keys):
        explanation = explain_sample(model, members, k, relevance=relevance)
        path = out / f"explain_{key}.png"
        render_explanation(explanation, members, sources, classes, path)
        records.append({
            "key": key, "label": classes[explanation.label], "predicted": classes[explanation.predicted],
            "png": path.name,
            "evidence": [e.__dict__ for e in explanation.evidence],
        })
    summary = {"gallery": [p.name for p in gallery], "relevance": relevance,
               "prototypes": [sources[p].describe(classes) for p in sorted(sources)], "explanations": records}
    put(out / "explanations.json", json.dumps(summary, indent=1))
    return summary

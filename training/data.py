"""Training input: cached shards → batches of padded, ImageNet-normalised mask crops.

``ShardDataset`` checks a shard directory against its manifest, ``split_keys`` holds out a
stratified validation set, and ``ShardStream`` reads only the shards that hold wanted keys, splits
them over DDP ranks and decodes JPEGs on a thread pool. A training stream gives every rank exactly
``steps_per_epoch()`` full batches (DDP hangs at collectives otherwise) and reads ``INTERLEAVE`` of its
shards at once, so that shards holding few classes (e.g. cut from a class-sorted listing by another
tool) still give mixed batches; an evaluation stream gives every wanted sample exactly once over all
ranks.
"""

from __future__ import annotations

import io
import itertools
import json
import sys
import threading
import zlib
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image

from pipeline.manifest import load_card, read_rows
from pipeline.masks import crop_boxes, grow_box
from pipeline.shards import ShardError, iter_samples
from schemas.config import DataConfig, ModelConfig
from schemas.manifest import DatasetCard, ShardStats
from schemas.storage import Location, size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN_255 = np.array(IMAGENET_MEAN, np.float32).reshape(3, 1, 1) * 255
_STD_255 = np.array(IMAGENET_STD, np.float32).reshape(3, 1, 1) * 255
ROW_FIELDS = ["key", "shard", "label", "split", "n_masks"]
INTERLEAVE = 4  # shards a training stream reads at once, round-robin, per rank

Unit = tuple[int, list[str]]  # a shard id and the wanted keys a rank decodes from it


@dataclass
class ShardDataset:
    """A finished shard directory (a local folder or an S3 prefix): its manifest and the rows of its successful
    samples."""

    root: Location
    card: DatasetCard
    rows: list[dict]  # ok samples only, sorted by key: key, shard, label, split, n_masks

    def __post_init__(self) -> None:
        self._stats: dict[int, ShardStats] = {s.shard: s for s in self.card.shards}

    @classmethod
    def open(cls, shards_dir: Location | Path) -> ShardDataset:
        """Load the manifest and rows; refuse a missing or truncated shard tar (ShardError naming it)."""
        root = Location.parse(shards_dir)
        card = load_card(root)
        for stats in card.shards:
            tar = root / stats.file("tar")
            if (found := size(tar)) is None:
                raise ShardError(f"{tar}: shard listed in the manifest of {root} is missing")
            if found != stats.tar_bytes:
                raise ShardError(f"{tar}: {found} bytes, the manifest says {stats.tar_bytes} (truncated or replaced)")
        try:
            table = read_rows(root, card.shards)
        except (OSError, pa.ArrowException) as exc:
            raise ShardError(f"{root}: cannot read the shard rows: {exc}") from exc
        rows = table.filter(pc.equal(table["status"], "ok")).select(ROW_FIELDS).to_pylist()
        per_shard = Counter(r["shard"] for r in rows)
        for stats in card.shards:
            if per_shard[stats.shard] != stats.ok:
                raise ShardError(f"{root / stats.file('parquet')}: {per_shard[stats.shard]} ok rows, "
                                 f"the manifest says {stats.ok}")
        return cls(root=root, card=card, rows=sorted(rows, key=lambda r: r["key"]))

    @property
    def classes(self) -> list[str]:
        return self.card.classes

    @property
    def num_classes(self) -> int:
        return len(self.card.classes)

    @property
    def masks_per_image(self) -> int:
        return self.card.masks_per_image

    def tar_path(self, shard: int) -> Location:
        return self.root / self._stats[shard].file("tar")


def split_keys(dataset: ShardDataset, val_fraction: float, seed: int) -> dict[str, list[str]]:
    """Sorted keys of "train", "val" and "test".

    "val" is a seeded, stratified draw from the manifest's train split (per class
    ``round(n_c * val_fraction)``, at least 1 when ``val_fraction > 0`` and the class has >= 2 train
    images, never the class's last train image) plus the manifest's own "val" samples; "test" is the
    manifest's test split.
    """
    by_class: dict[int, list[str]] = defaultdict(list)
    out: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for row in dataset.rows:  # sorted by key
        if row["split"] == "train":
            by_class[row["label"]].append(row["key"])
        elif row["split"] in ("val", "test"):
            out[row["split"]].append(row["key"])
    rng = np.random.default_rng(seed)
    for label in sorted(by_class):
        keys = by_class[label]
        n = round(len(keys) * val_fraction)
        if val_fraction > 0 and len(keys) >= 2:
            n = max(n, 1)
        held = set(rng.permutation(len(keys))[: min(n, len(keys) - 1)].tolist())
        for i, key in enumerate(keys):
            out["val" if i in held else "train"].append(key)
    return {split: sorted(keys) for split, keys in out.items()}


def read_options(model: ModelConfig, *, whole_image: bool = False) -> dict[str, Any]:
    """``decode_sample``'s ``whole_image`` and ``margin`` for what a model of config ``model`` reads;
    ``whole_image``: each whole image whatever the model's regions (``schedule.pretrain_on: image``)."""
    if whole_image or model.regions == "patches":
        return {"whole_image": True, "margin": 0.0}
    return {"whole_image": False, "margin": model.crop_margin}


def decode_sample(
    members: dict[str, bytes], k: int, size: int, augment: Callable[[np.ndarray], np.ndarray] | None, *,
    whole_image: bool = False, margin: float = 0.0, hide: Callable[[np.ndarray], np.ndarray] | None = None,
    out: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int, str]:
    """Crops ``[k, 3, size, size]`` float32 (ImageNet-normalised, zero padding), valid ``[k]`` bool,
    label and key of one sample, from its ``jpg`` and ``json`` members: each mask's box, grown by ``margin``
    (``model.crop_margin``, ``pipeline.masks.grow_box``), is cut from the image and resized
    (``pipeline.masks.crop_boxes``), then ``augment`` is called once per crop.
    ``whole_image``: the whole image instead, as ``[1, 3, size, size]`` (patch baseline).
    ``hide``: the valid mask → the crops shown (``hide_crops``); hidden crops are zeros, not decoded, and not valid.
    ``out``: a float32 array of that shape to decode into (the sample's slice of a batch, so that
    collating copies nothing); every element is written, and the crops returned share its memory.

    PIL, OpenCV (one thread: the decoding threads are the parallelism) and numpy only: no torch kernel
    runs here, so decoding threads never start OpenMP teams that compete with the training thread's.
    """
    record = json.loads(members["json"])
    key, label, n = record["key"], int(record["label"]), int(record["n_masks"])
    if whole_image:
        k = n = 1
    if not 0 < n <= k:
        raise ShardError(f"sample {key}: {n} masks, expected 1..{k}")
    crops = np.empty((k, 3, size, size), np.float32) if out is None else out
    if crops.shape != (k, 3, size, size):
        raise ValueError(f"out has shape {crops.shape}, expected {(k, 3, size, size)}")
    shown = np.arange(k) < n
    if hide is not None:
        shown = hide(shown)
    crops[~shown] = 0
    if (data := members.get("jpg")) is None:
        raise ShardError(f"sample {key}: member {key}.jpg is missing")
    image = Image.open(io.BytesIO(data))
    if whole_image:
        image.draft("RGB", (size, size))  # JPEG DCT scaling: decode no larger than needed
        boxes = [[0, 0, image.width - 1, image.height - 1]]
    else:
        if image.size != (record["width"], record["height"]):
            raise ShardError(f"sample {key}: image is {image.width}x{image.height}, "
                             f"the json says {record['width']}x{record['height']}")
        boxes = [grow_box(box, margin, (image.height, image.width)) for box in record["boxes"][:n]]
    pixels = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    indices = np.flatnonzero(shown)
    for i, crop in zip(indices, crop_boxes(pixels, [boxes[i] for i in indices], size)):
        crop = augment(crop) if augment is not None else crop
        np.subtract(crop.transpose(2, 0, 1), _MEAN_255, out=crops[i])  # uint8 → float32 in the same pass
        crops[i] /= _STD_255
    return torch.from_numpy(crops), torch.from_numpy(shown), label, key


def hide_crops(valid: np.ndarray, p: float, seed: Sequence[int]) -> np.ndarray:
    """``data.crop_dropout``: each valid crop hidden with probability ``p``, one of them kept when all would be."""
    rng = np.random.default_rng([*seed, 1])  # apart from the augmentation's stream of the same seed
    shown = valid & (rng.random(len(valid)) >= p)
    if not shown.any():
        shown[rng.choice(np.flatnonzero(valid))] = True
    return shown


_GREY = np.array([0.299, 0.587, 0.114])
_YIQ = np.array([_GREY, [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_INV = np.linalg.inv(_YIQ)
_EYE = np.eye(3)
_TO_GREY = np.outer(np.ones(3), _GREY)  # every channel becomes the pixel's grey


def _geometry(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """RandomHorizontalFlip(0.5), RandomPerspective(distortion_scale=0.05, p=1) and RandomAffine(
    degrees=15, shear=15) as one warp. Each stage is written as the map from its output pixel to its
    input pixel, so the warp (output → input) is their product in order; outside the crop is black.
    Parameters are drawn in two generator calls: this runs once per crop with the GIL held."""
    h, w = image.shape[:2]
    bw, bh = int(0.05 * (w // 2)) + 1, int(0.05 * (h // 2)) + 1  # v2.RandomPerspective's corner ranges
    low = np.array([0, 0, w - bw, 0, w - bw, h - bh, 0, h - bh])
    moved = rng.integers(low, low + [bw, bh] * 4).reshape(4, 2).astype(np.float32)
    flip, angle, shear = rng.random(3) * [1, 30, 30] - [0, 15, 15]
    c, s, t = np.cos(np.radians(angle)), np.sin(np.radians(angle)), np.tan(np.radians(shear))
    linear = np.array([[c - t * s, s + t * c], [-s, c]])  # unshear @ unrotate (v2.RandomAffine's signs)
    centre = np.array([w / 2, h / 2])
    affine = np.vstack([np.hstack([linear, (centre - linear @ centre)[:, None]]), [0, 0, 1]])  # about the centre
    warp = cv2.getPerspectiveTransform(moved, np.float32([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]])) @ affine
    if flip < 0.5:
        warp[0] = w * warp[2] - warp[0]  # x -> w - x after the rest
    # warped as RGBA: OpenCV's 4-channel path is vectorised, ~1.7x faster than 3 channels
    rgba = cv2.warpPerspective(cv2.cvtColor(image, cv2.COLOR_RGB2RGBA), warp, (w, h),
                               flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT,
                               borderValue=0)
    return cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)


def _colour(image: np.ndarray, rng: np.random.Generator, *, strength: float = 0.15, hue: float = 0.025
            ) -> np.ndarray:
    """ColorJitter(brightness=strength, contrast=strength, saturation=strength, hue=hue) in random order (default:
    the reference's .15 and .025). Each step
    is an affine colour map (hue: a rotation about the grey axis in YIQ instead of an HSV round trip),
    so the four are composed into one matrix and applied once, without intermediate clipping."""
    mean = np.array(cv2.mean(image)[:3])
    matrix, offset = _EYE, np.zeros(3)
    for step in rng.permutation(4):
        if step == 3:  # hue
            t = 2 * np.pi * rng.uniform(-hue, hue)
            m = _YIQ_INV @ np.array([[1, 0, 0], [0, np.cos(t), np.sin(t)], [0, -np.sin(t), np.cos(t)]]) @ _YIQ
            matrix, offset = m @ matrix, m @ offset
            continue
        f = rng.uniform(1 - strength, 1 + strength)
        if step == 2:  # saturation: towards each pixel's grey
            m = f * _EYE + (1 - f) * _TO_GREY
            matrix, offset = m @ matrix, m @ offset
        else:  # brightness (0), contrast (1): towards the mean grey of the image so far
            add = (1 - f) * (_GREY @ (matrix @ mean + offset)) if step == 1 else 0.0
            matrix, offset = f * matrix, f * offset + add
    return cv2.transform(image, np.hstack([matrix, offset[:, None]]))  # rounds and saturates to uint8


def make_augment(seed: int | Sequence[int], kind: str = "reference") -> Callable[[np.ndarray], np.ndarray]:
    """Augmentation of one HxWx3 uint8 RGB crop, before normalisation (``DataConfig.augment``).

    ``reference``: spec §2.6 "protomask medium + photometric medium": flip, perspective and affine (one
    ``cv2.warpPerspective``), then the colour jitter (one ``cv2.transform`` by a 3x4 colour matrix), with
    torchvision v2's parameter ranges. ``flip``: RandomHorizontalFlip(0.5) only. Parameters come from a
    numpy generator seeded by ``seed`` (reproducible and thread-safe, unlike the v2 classes, which draw
    from torch's global RNG); each call draws new ones.
    """
    rng = np.random.default_rng(seed)
    if kind == "flip":
        return lambda image: image[:, ::-1] if rng.random() < 0.5 else image
    if kind != "reference":
        raise ValueError(f"augment: unknown kind {kind!r} (reference, flip)")
    return lambda image: _colour(_geometry(image, rng), rng)


def _view_photometry(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The reference's photometric augmentation of one PIP-Net view: ColorJitter(.25, .25, .25, hue .05), then
    posterize to 2–8 bits, then a 3×3 blur half of the time."""
    image = _colour(image, rng, strength=0.25, hue=0.05)
    bits = int(rng.integers(2, 9))
    image = image & np.uint8((0xFF << (8 - bits)) & 0xFF)
    return cv2.blur(image, (3, 3)) if rng.random() < 0.5 else image


def make_view_augments(seed: Sequence[int], kind: str) -> tuple[Callable[[np.ndarray], np.ndarray], ...]:
    """Two augmentations of one image for PIP-Net's views: the same geometry (``kind``'s flip, perspective and
    affine, drawn from one seed for both, so a cell shows the same content in both views) and each its own
    photometry (``_view_photometry``)."""
    def view(index: int) -> Callable[[np.ndarray], np.ndarray]:
        shape, colour = np.random.default_rng([*seed, 0]), np.random.default_rng([*seed, index])
        if kind == "reference":
            return lambda image: _view_photometry(_geometry(image, shape), colour)
        if kind == "flip":
            return lambda image: _view_photometry(image[:, ::-1] if shape.random() < 0.5 else image, colour)
        return lambda image: _view_photometry(image, colour)

    return view(1), view(2)


def _assign(units: list[Unit], world: int, quota: int | None) -> list[list[Unit]]:
    """Largest unit first onto the least-loaded rank (ties: the given order, then the lowest rank).

    With a ``quota`` (>= total / world), a unit that would push a rank past it is split over the ranks
    with room, so every sample fits the equal per-rank budget; only such a shard is read by two ranks.
    """
    parts: list[list[Unit]] = [[] for _ in range(world)]
    load = [0] * world
    for shard, keys in sorted(units, key=lambda u: -len(u[1])):
        while keys:
            r = min(range(world), key=load.__getitem__)
            take = len(keys) if quota is None else min(len(keys), quota - load[r])
            parts[r].append((shard, keys[:take]))
            load[r] += take
            keys = keys[take:]
    return parts


def _shuffled(items: Iterable, size: int, rng: np.random.Generator) -> Iterator:
    """A shuffle buffer of ``size`` items; drains completely at the end of ``items``."""
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = int(rng.integers(size))
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def _interleave(iterators: Iterable[Iterator], width: int) -> Iterator:
    """Round-robin over up to ``width`` of ``iterators`` at a time, one item each in turn; an exhausted
    one is replaced by the next of ``iterators`` (in its place), until all are exhausted. Every iterator
    is run to its end, so an error it raises at its end (``ShardStream._read``) still surfaces."""
    waiting = iter(iterators)
    active = list(itertools.islice(waiting, width))
    i = 0
    while active:
        i %= len(active)
        try:
            item = next(active[i])
        except StopIteration:
            following = next(waiting, None)
            if following is None:
                del active[i]
            else:
                active[i] = following
            continue
        yield item
        i += 1


def _chunks(items: Iterable, n: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


class BatchBuffers:
    """Float32 batch arrays, each reused once nothing refers to it any more.

    A fresh array of a batch's size (38 MB at B=8, K=8, 224 px) is mmapped by malloc and zeroed by
    the kernel page by page on first write, which cost as much as decoding the batch (bench/p3).
    A buffer counts as free only when the pool holds the sole reference to it: every numpy view and
    every tensor from ``torch.from_numpy`` keeps its owner alive, so reuse never overwrites a batch
    that anyone still holds; a consumer that keeps batches just makes the pool allocate more (it keeps
    at most ``keep`` arrays for reuse).
    """

    def __init__(self, shape: tuple[int, ...], keep: int) -> None:
        self.shape, self.keep = shape, keep
        self._pool: list[np.ndarray] = []
        self._lock = threading.Lock()

    def get(self, n: int) -> np.ndarray:
        """A ``[n, *shape[1:]]`` view of a free buffer (contents undefined)."""
        with self._lock:
            for base in self._pool:
                if sys.getrefcount(base) == 3:  # the pool's list, this loop variable, getrefcount's argument
                    return base[:n]
            base = np.empty(self.shape, np.float32)
            if len(self._pool) < self.keep:
                self._pool.append(base)
            return base[:n]


class ShardStream:
    """Batches ``{"crops" [B,K,3,S,S] float32, "valid" [B,K] bool, "label" [B] int64, "key" list[str]}``
    of ``keys`` for one DDP rank.

    Training: shards shuffled per (seed, epoch) and spread over ranks by sample count; each rank reads
    ``INTERLEAVE`` of its shards at once, one sample from each in turn (the next shard, in a seeded
    order, replacing one that ends), through a shuffle buffer; augmentation (``config.augment``), and
    exactly ``steps_per_epoch()`` full batches per rank: a rank that runs out cycles over its own
    samples again. The order is fixed by (seed, epoch, rank). Evaluation: shards in order, split over
    ranks whole, every sample once, the last batch may be short and a rank may get none.
    """

    def __init__(self, dataset: ShardDataset, keys: Iterable[str], config: DataConfig, *, input_size: int,
                 batch_size: int, train: bool, rank: int = 0, world_size: int = 1, seed: int = 0,
                 whole_image: bool = False, margin: float = 0.0, views: int = 1) -> None:
        """``config`` gives the shuffle buffer, augmentation and decoding threads; ``batch_size`` is the
        images per batch this stream yields (a training step's share of one rank, or an evaluation batch);
        ``input_size``, ``whole_image`` and ``margin`` say what the model reads (``for_model``, ``read_options``).
        ``views``: 2 adds ``"crops2"``, a second view of every image (``make_view_augments``; training only)."""
        if views not in (1, 2) or (views == 2 and not train):
            raise ValueError(f"views: {views}; a training stream has 1 or 2, an evaluation stream 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        row_of = {r["key"]: r for r in dataset.rows}
        wanted = sorted(set(keys))
        if unknown := [k for k in wanted if k not in row_of]:
            raise ValueError(f"{len(unknown)} keys are not ok samples of {dataset.root} (e.g. {unknown[0]})")
        by_shard: dict[int, list[str]] = defaultdict(list)
        for key in wanted:
            by_shard[row_of[key]["shard"]].append(key)
        self.dataset, self.config, self.input_size = dataset, config, input_size
        self.train, self.rank, self.world_size, self.seed = train, rank, world_size, seed
        self.batch_size = batch_size
        self.epoch = 0
        self._labels = {k: row_of[k]["label"] for k in wanted}
        self._units: list[Unit] = sorted(by_shard.items())
        self._augment = config.augment if train and config.augment != "none" else None
        self._whole_image, self._margin = whole_image, margin
        self._crop_dropout = config.crop_dropout if train and not whole_image else 0.0
        k = 1 if whole_image else dataset.masks_per_image
        self._buffers = [BatchBuffers((batch_size, k, 3, input_size, input_size), config.loader_threads + 2)
                         for _ in range(views)]

    @classmethod
    def for_model(cls, dataset: ShardDataset, keys: Iterable[str], config: DataConfig, model: ModelConfig, *,
                  whole_image: bool = False, **kwargs: Any) -> ShardStream:
        """The stream of the crops (or whole images) a model of config ``model`` reads; ``whole_image``: each whole
        image whatever the model's regions (``read_options``)."""
        return cls(dataset, keys, config, input_size=model.input_size,
                   **read_options(model, whole_image=whole_image), **kwargs)

    def set_epoch(self, epoch: int) -> None:
        """Training streams reshuffle and reassign shards per epoch."""
        self.epoch = epoch

    def steps_per_epoch(self) -> int:
        """Batches this rank yields per epoch: the same on every rank when training."""
        b = self.batch_size
        if self.train:
            return -(-len(self._labels) // (self.world_size * b))
        return -(-sum(len(keys) for _, keys in self._eval_units()) // b)

    def _eval_units(self) -> list[Unit]:
        return sorted(_assign(self._units, self.world_size, None)[self.rank])

    def _read(self, unit: Unit, salt: int) -> Iterator[tuple[Location, str, dict[str, bytes], int]]:
        """(tar, key, the json and jpg members, salt) of the unit's keys; other samples are skipped."""
        shard, keys = unit
        tar, wanted = self.dataset.tar_path(shard), set(keys)
        for key, members in iter_samples(tar):
            if key in wanted:
                wanted.discard(key)
                yield tar, key, {e: members[e] for e in ("json", "jpg") if e in members}, salt
        if wanted:
            raise ShardError(f"{tar}: {len(wanted)} samples of the manifest are missing from the tar "
                             f"(e.g. {min(wanted)})")

    def _train_samples(self, epoch: int) -> Iterator[tuple[Location, str, dict[str, bytes], int]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self._units))  # same on all ranks
        steps, b = self.steps_per_epoch(), self.batch_size
        parts = _assign([self._units[i] for i in order], self.world_size, steps * b)
        mine = parts[self.rank] or [u for part in parts for u in part]  # fewer samples than ranks x batch
        rng = np.random.default_rng([self.seed, epoch, self.rank])

        def one_pass(salt: int) -> Iterator:
            units = (self._read(mine[i], salt) for i in rng.permutation(len(mine)))
            return _shuffled(_interleave(units, INTERLEAVE), self.config.shuffle_buffer, rng)

        return itertools.islice(itertools.chain.from_iterable(map(one_pass, itertools.count())), steps * b)

    def _batch(self, samples: list[tuple[Location, str, dict[str, bytes], int]], epoch: int) -> dict:
        """Decode and collate one batch (runs on a decoding thread; numpy only, see decode_sample)."""
        crops = [buffers.get(len(samples)) for buffers in self._buffers]
        decoded = []
        for j, (tar, key, members, salt) in enumerate(samples):
            seed = [self.seed, epoch, self.rank, salt, zlib.crc32(key.encode())]
            if len(crops) == 2:
                augments = make_view_augments(seed, self._augment or "none")
            else:
                augments = (make_augment(seed, self._augment) if self._augment else None,)
            hide = partial(hide_crops, p=self._crop_dropout, seed=seed) if self._crop_dropout else None
            try:
                for view, augment in zip(crops, augments):
                    sample = decode_sample(members, self.dataset.masks_per_image, self.input_size, augment,
                                           whole_image=self._whole_image, margin=self._margin, hide=hide,
                                           out=view[j])
            except (KeyError, OSError, ValueError) as exc:  # ShardError is a ValueError
                raise ShardError(f"{tar}: sample {key}: {exc}") from exc
            if sample[2:] != (self._labels[key], key):
                raise ShardError(f"{tar}: sample {key} says key {sample[3]} label {sample[2]}, "
                                 f"the manifest says label {self._labels[key]}")
            decoded.append(sample)
        _, valid, labels, keys = zip(*decoded)
        return {**{name: torch.from_numpy(view) for name, view in zip(("crops", "crops2"), crops)},
                "valid": torch.from_numpy(np.stack([v.numpy() for v in valid])),
                "label": torch.tensor(labels, dtype=torch.int64), "key": list(keys)}

    def __iter__(self) -> Iterator[dict]:
        epoch, threads = self.epoch, self.config.loader_threads
        if self.train:
            samples = self._train_samples(epoch)
        else:
            samples = itertools.chain.from_iterable(self._read(u, 0) for u in self._eval_units())
        chunks = _chunks(samples, self.batch_size)
        if threads == 0:
            for chunk in chunks:
                yield self._batch(chunk, epoch)
            return
        with ThreadPoolExecutor(threads, thread_name_prefix="shard-decode") as pool:
            pending: deque = deque()  # at most threads + 1 batches in flight bounds the memory
            try:
                for chunk in chunks:
                    pending.append(pool.submit(self._batch, chunk, epoch))
                    if len(pending) > threads:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for future in pending:
                    future.cancel()

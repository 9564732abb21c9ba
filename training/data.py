"""Training input: cached shards → batches of padded, ImageNet-normalised mask crops.

``ShardDataset`` checks a shard directory against its manifest, ``split_keys`` holds out a
stratified validation set, and ``ShardStream`` reads only the shards that hold wanted keys, splits
them over DDP ranks and decodes JPEGs on a thread pool. A training stream gives every rank exactly
``steps_per_epoch()`` full batches (DDP hangs at collectives otherwise); an evaluation stream gives
every wanted sample exactly once over all ranks.
"""

from __future__ import annotations

import io
import itertools
import json
import zlib
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode

from pipeline.manifest import MANIFEST, load_card, read_rows
from pipeline.masks import crop_boxes
from pipeline.plan import shard_name
from pipeline.shards import ShardError, iter_samples
from schemas.config import DataConfig
from schemas.manifest import DatasetCard

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN_255 = np.array(IMAGENET_MEAN, np.float32).reshape(3, 1, 1) * 255
_STD_255 = np.array(IMAGENET_STD, np.float32).reshape(3, 1, 1) * 255
ROW_FIELDS = ["key", "shard", "label", "split", "n_masks"]

Unit = tuple[int, list[str]]  # a shard id and the wanted keys a rank decodes from it


@dataclass
class ShardDataset:
    """A finished shard directory: its manifest and the rows of its successful samples."""

    root: Path
    card: DatasetCard
    rows: list[dict]  # ok samples only, sorted by key: key, shard, label, split, n_masks

    @classmethod
    def open(cls, shards_dir: Path) -> ShardDataset:
        """Load the manifest and rows; refuse a missing or truncated shard tar (ShardError naming it)."""
        root = Path(shards_dir)
        card = load_card(root)
        for stats in card.shards:
            tar = root / f"{stats.name}.tar"
            if not tar.is_file():
                raise ShardError(f"{tar}: shard listed in {root / MANIFEST} is missing")
            if (size := tar.stat().st_size) != stats.tar_bytes:
                raise ShardError(f"{tar}: {size} bytes, the manifest says {stats.tar_bytes} (truncated or replaced)")
        try:
            table = read_rows(root, card.shards)
        except (OSError, pa.ArrowException) as exc:
            raise ShardError(f"{root}: cannot read the shard rows: {exc}") from exc
        rows = table.filter(pc.equal(table["status"], "ok")).select(ROW_FIELDS).to_pylist()
        per_shard = Counter(r["shard"] for r in rows)
        for stats in card.shards:
            if per_shard[stats.shard] != stats.ok:
                raise ShardError(f"{root / stats.name}.parquet: {per_shard[stats.shard]} ok rows, "
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

    def tar_path(self, shard: int) -> Path:
        return self.root / f"{shard_name(shard)}.tar"


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


def decode_sample(
    members: dict[str, bytes], k: int, size: int, augment: Callable[[Image.Image], Image.Image] | None,
    whole_image: bool = False, out: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int, str]:
    """Crops ``[k, 3, size, size]`` float32 (ImageNet-normalised, zero padding), valid ``[k]`` bool,
    label and key of one sample, from its ``jpg`` and ``json`` members: each mask's box is cut from the
    image and resized (``pipeline.masks.crop_boxes``), then ``augment`` is called once per crop.
    ``whole_image``: the whole image instead, as ``[1, 3, size, size]`` (patch baseline).
    ``out``: a zero-filled float32 array of that shape to decode into (the sample's slice of a batch,
    so that collating copies nothing); the crops returned share its memory.

    Pure PIL and numpy: no torch kernel runs here, so decoding threads never start OpenMP teams that
    compete with the training thread's.
    """
    record = json.loads(members["json"])
    key, label, n = record["key"], int(record["label"]), int(record["n_masks"])
    if whole_image:
        k = n = 1
    if not 0 < n <= k:
        raise ShardError(f"sample {key}: {n} masks, expected 1..{k}")
    crops = np.zeros((k, 3, size, size), np.float32) if out is None else out
    if crops.shape != (k, 3, size, size):
        raise ValueError(f"out has shape {crops.shape}, expected {(k, 3, size, size)}")
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
        boxes = record["boxes"][:n]
    image = image if image.mode == "RGB" else image.convert("RGB")
    for i, crop in enumerate(crop_boxes(image, boxes, size)):
        pixels = np.asarray(augment(crop) if augment is not None else crop)
        np.subtract(pixels.transpose(2, 0, 1), _MEAN_255, out=crops[i])  # uint8 → float32 in the same pass
        crops[i] /= _STD_255
    return torch.from_numpy(crops), torch.from_numpy(np.arange(k) < n), label, key


_GREY = np.array([0.299, 0.587, 0.114])
_YIQ = np.array([_GREY, [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_INV = np.linalg.inv(_YIQ)
_LEVELS = np.arange(256, dtype=np.float64)
_EYE = np.eye(3)
_TO_GREY = np.outer(np.ones(3), _GREY)  # every channel becomes the pixel's grey


def _homography(src: list[list[int]], dst: list[list[int]]) -> np.ndarray:
    """The 3x3 matrix H (H[2, 2] = 1) that maps the four points ``src`` onto ``dst``."""
    a, b = [], []
    for (x, y), (u, v) in zip(src, dst):
        a += [[x, y, 1, 0, 0, 0, -x * u, -y * u], [0, 0, 0, x, y, 1, -x * v, -y * v]]
        b += [u, v]
    return np.append(np.linalg.solve(np.array(a, dtype=float), np.array(b, dtype=float)), 1.0).reshape(3, 3)


def _geometry(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """RandomHorizontalFlip(0.5), RandomPerspective(distortion_scale=0.05, p=1) and RandomAffine(
    degrees=15, shear=15) as one warp. Each stage is written as the map from its output pixel to its
    input pixel, so the warp (output → input) is their product in order."""
    w, h = image.size

    def draw(low: int, high: int) -> int:
        return int(rng.integers(low, high))

    flip = np.array([[-1.0, 0, w], [0, 1, 0], [0, 0, 1]]) if rng.random() < 0.5 else np.eye(3)
    bw, bh = int(0.05 * (w // 2)) + 1, int(0.05 * (h // 2)) + 1  # v2.RandomPerspective's corner ranges
    corners = [[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]]
    moved = [[draw(0, bw), draw(0, bh)], [draw(w - bw, w), draw(0, bh)],
             [draw(w - bw, w), draw(h - bh, h)], [draw(0, bw), draw(h - bh, h)]]
    angle, shear = np.radians(rng.uniform(-15, 15)), np.radians(rng.uniform(-15, 15))
    c, s = np.cos(angle), np.sin(angle)
    unrotate = np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]])
    unshear = np.array([[1, np.tan(shear), 0], [0, 1, 0], [0, 0, 1]])  # v2.RandomAffine's sign convention
    centre = np.array([[1.0, 0, -w / 2], [0, 1, -h / 2], [0, 0, 1]])
    uncentre = np.array([[1.0, 0, w / 2], [0, 1, h / 2], [0, 0, 1]])
    warp = flip @ _homography(moved, corners) @ uncentre @ unshear @ unrotate @ centre
    return F.perspective(image, None, None, interpolation=InterpolationMode.BILINEAR,
                         coefficients=(warp.ravel()[:8] / warp[2, 2]).tolist())


def _channel_means(image: Image.Image) -> np.ndarray:
    """Per-channel mean from the histogram: ``ImageStat.Stat(image).mean`` (the same doubles: integer
    sums are exact) without its Python loop over the 768 bins, which held the GIL for ~45 us a crop."""
    hist = np.array(image.histogram(), dtype=np.float64).reshape(-1, 256)
    return hist @ _LEVELS / hist.sum(axis=1)


def _colour(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """ColorJitter(brightness=.15, contrast=.15, saturation=.15, hue=.025) in random order. Each step
    is an affine colour map (hue: a rotation about the grey axis in YIQ instead of an HSV round trip),
    so the four are composed into one matrix and applied once, without intermediate clipping."""
    mean = _channel_means(image)
    matrix, offset = _EYE, np.zeros(3)
    for step in rng.permutation(4):
        if step == 3:  # hue
            t = 2 * np.pi * rng.uniform(-0.025, 0.025)
            m = _YIQ_INV @ np.array([[1, 0, 0], [0, np.cos(t), np.sin(t)], [0, -np.sin(t), np.cos(t)]]) @ _YIQ
            matrix, offset = m @ matrix, m @ offset
            continue
        f = rng.uniform(0.85, 1.15)
        if step == 2:  # saturation: towards each pixel's grey
            m = f * _EYE + (1 - f) * _TO_GREY
            matrix, offset = m @ matrix, m @ offset
        else:  # brightness (0), contrast (1): towards the mean grey of the image so far
            add = (1 - f) * (_GREY @ (matrix @ mean + offset)) if step == 1 else 0.0
            matrix, offset = f * matrix, f * offset + add
    return image.convert("RGB", tuple(np.hstack([matrix, offset[:, None]]).ravel().tolist()))


def make_augment(seed: int | Sequence[int]) -> Callable[[Image.Image], Image.Image]:
    """Spec §2.6 "protomask medium + photometric medium" for one RGB crop, before normalisation.

    Flip, perspective and affine (one warp through ``transforms.v2.functional.perspective``), then the
    colour jitter (one colour matrix), with torchvision v2's parameter ranges. Parameters come from a
    numpy generator seeded by ``seed`` (reproducible and thread-safe, unlike the v2 classes, which draw
    from torch's global RNG); each call draws new ones.
    """
    rng = np.random.default_rng(seed)
    return lambda image: _colour(_geometry(image, rng), rng)


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


def _chunks(items: Iterable, n: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


class ShardStream:
    """Batches ``{"crops" [B,K,3,S,S] float32, "valid" [B,K] bool, "label" [B] int64, "key" list[str]}``
    of ``keys`` for one DDP rank.

    Training: shards shuffled per (seed, epoch) and spread over ranks by sample count, a shuffle
    buffer, augmentation (``config.augment``), and exactly ``steps_per_epoch()`` full batches per rank:
    a rank that runs out cycles over its own samples again. Evaluation: shards in order, split over
    ranks whole, every sample once, the last batch may be short and a rank may get none.
    """

    def __init__(self, dataset: ShardDataset, keys: Iterable[str], config: DataConfig, input_size: int,
                 train: bool, rank: int, world_size: int, seed: int, whole_image: bool = False) -> None:
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
        self.epoch = 0
        self._labels = {k: row_of[k]["label"] for k in wanted}
        self._units: list[Unit] = sorted(by_shard.items())
        self._augment = train and config.augment
        self._whole_image = whole_image

    def set_epoch(self, epoch: int) -> None:
        """Training streams reshuffle and reassign shards per epoch."""
        self.epoch = epoch

    def steps_per_epoch(self) -> int:
        """Batches this rank yields per epoch: the same on every rank when training."""
        b = self.config.batch_size
        if self.train:
            return -(-len(self._labels) // (self.world_size * b))
        return -(-sum(len(keys) for _, keys in self._eval_units()) // b)

    def _eval_units(self) -> list[Unit]:
        return sorted(_assign(self._units, self.world_size, None)[self.rank])

    def _read(self, unit: Unit, salt: int) -> Iterator[tuple[Path, str, dict[str, bytes], int]]:
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

    def _train_samples(self, epoch: int) -> Iterator[tuple[Path, str, dict[str, bytes], int]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self._units))  # same on all ranks
        steps, b = self.steps_per_epoch(), self.config.batch_size
        parts = _assign([self._units[i] for i in order], self.world_size, steps * b)
        mine = parts[self.rank] or [u for part in parts for u in part]  # fewer samples than ranks x batch
        rng = np.random.default_rng([self.seed, epoch, self.rank])

        def one_pass(salt: int) -> Iterator:
            units = (self._read(mine[i], salt) for i in rng.permutation(len(mine)))
            return _shuffled(itertools.chain.from_iterable(units), self.config.shuffle_buffer, rng)

        return itertools.islice(itertools.chain.from_iterable(map(one_pass, itertools.count())), steps * b)

    def _batch(self, samples: list[tuple[Path, str, dict[str, bytes], int]], epoch: int) -> dict:
        """Decode and collate one batch (runs on a decoding thread; numpy only, see decode_sample)."""
        k = 1 if self._whole_image else self.dataset.masks_per_image
        crops = np.zeros((len(samples), k, 3, self.input_size, self.input_size), np.float32)
        decoded = []
        for j, (tar, key, members, salt) in enumerate(samples):
            augment = None
            if self._augment:
                augment = make_augment([self.seed, epoch, self.rank, salt, zlib.crc32(key.encode())])
            try:
                sample = decode_sample(members, self.dataset.masks_per_image, self.input_size, augment,
                                       self._whole_image, out=crops[j])
            except (KeyError, OSError, ValueError) as exc:  # ShardError is a ValueError
                raise ShardError(f"{tar}: sample {key}: {exc}") from exc
            if sample[2:] != (self._labels[key], key):
                raise ShardError(f"{tar}: sample {key} says key {sample[3]} label {sample[2]}, "
                                 f"the manifest says label {self._labels[key]}")
            decoded.append(sample)
        _, valid, labels, keys = zip(*decoded)
        return {"crops": torch.from_numpy(crops),
                "valid": torch.from_numpy(np.stack([v.numpy() for v in valid])),
                "label": torch.tensor(labels, dtype=torch.int64), "key": list(keys)}

    def __iter__(self) -> Iterator[dict]:
        epoch, threads = self.epoch, self.config.loader_threads
        if self.train:
            samples = self._train_samples(epoch)
        else:
            samples = itertools.chain.from_iterable(self._read(u, 0) for u in self._eval_units())
        chunks = _chunks(samples, self.config.batch_size)
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

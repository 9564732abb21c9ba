"""P3: training input images/s from our shards ÷ the reference layout, same images, same masks, same K.

Ours: training.data.ShardStream over the shards of the cub_mini photos listed --passes times, so
that an epoch is long enough to time (superpixel, K=8), cropped
at read time to 224 px, training mode (shuffle buffer, augmentation), --workers decoding threads,
batches of 8.
Reference (spec §2.6, §4.3, §4.5): bench.common.write_reference writes one full-resolution RGB PNG
per stored mask (zeros outside it) beside the original image; a torch DataLoader with --workers
worker processes (persistent, so their start is not timed) reads per sample the original image and
K mask PNGs (an image with fewer masks repeats its masks, largest first, as the reference's balanced
file lists do), fills the background back from the original ("original" fill) and runs, per mask,
the reference's albumentations pipeline: RandomCropNearBBox(max_part_shift=0) on the mask's box,
Resize(224, 224), HorizontalFlip, Perspective(0-0.05), Affine(rotate and shear ±15°, ellipse,
BORDER_WRAP), ColorJitter(0.15, 0.15, 0.15, 0.025), Normalize, ToTensorV2 (albumentations is the
`bench` extra: pip install -e .[bench]).
A second pair of rows does the same without augmentation (the evaluation and push input; the
reference without its augmentation transforms), and a third gives the reference layout with our
augmentation (training.data.make_augment) instead of albumentations, to separate layout from
augmentation.

One round = one epoch over all images on each side; one untimed epoch each first.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as bench/p3_... or python -m bench.p3_...

import numpy as np
import torch
from PIL import Image

from bench.common import (CUB_MINI, Figure, ReferenceSample, median, paired_ratios, parser, report,
                          segment_cub, side_by_side, timed, write_reference)
from pipeline.masks import crop_boxes
from schemas.config import DataConfig
from training.data import IMAGENET_MEAN, IMAGENET_STD, ShardDataset, ShardStream, make_augment

TARGET = ">= 5"
BATCH = 8


def albumentations_pipeline(size: int, augment: bool):
    """The reference's per-mask transform list (spec §2.6), train or eval."""
    import albumentations as A
    import cv2
    from albumentations.pytorch import ToTensorV2

    geometry = [
        A.HorizontalFlip(p=0.5), A.Perspective(scale=(0, 0.05), p=1),
        A.Affine(rotate=(-15, 15), shear=(-15, 15), rotate_method="ellipse", border_mode=cv2.BORDER_WRAP, p=1),
        A.ColorJitter(brightness=(0.85, 1.15), contrast=(0.85, 1.15), saturation=(0.85, 1.15), hue=(-0.025, 0.025), p=1),
    ] if augment else []
    return A.Compose([A.RandomCropNearBBox(max_part_shift=0.0, p=1), A.Resize(size, size), *geometry,
                      A.Normalize(), ToTensorV2()])


class ReferenceDataset(torch.utils.data.Dataset):
    """The reference's per-sample work on its layout: original + K mask PNGs → [K, 3, S, S] float32.

    ``augment``: "albumentations" (the reference's own pipeline), "ours" (make_augment after the
    reference's crop and resize) or None."""

    def __init__(self, samples: list[ReferenceSample], k: int, size: int, augment: str | None) -> None:
        self.samples, self.k, self.size, self.augment = samples, k, size, augment
        self.epoch = 0
        self._pipeline = albumentations_pipeline(size, augment == "albumentations") if augment != "ours" else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, n: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[n]
        with Image.open(sample.original) as im:
            original = np.asarray(im.convert("RGB"))
        crops = []
        for i in range(self.k):
            i %= len(sample.masks)  # balance_masks: repeat the masks, largest first
            with Image.open(sample.masks[i]) as im:
                masked = np.asarray(im.convert("RGB"))
            filled = np.where(masked.any(-1, keepdims=True), masked, original)  # fill_background "original"
            if self._pipeline is not None:
                crops.append(self._pipeline(image=filled, cropping_bbox=sample.boxes[i])["image"])
                continue
            crop = make_augment([self.epoch, n, i])(crop_boxes(filled, [sample.boxes[i]], self.size)[0])
            crops.append(torch.from_numpy(((np.asarray(crop, np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD)
                                          .transpose(2, 0, 1).copy()))
        return torch.stack(crops), sample.label


MODES = {"augmented": ("albumentations", True), "no augmentation": (None, False),
         "reference layout with our augmentation": ("ours", True)}


def measure(workers: int, size: int, rounds: int, passes: int, root: Path = CUB_MINI) -> Figure:
    torch.set_num_threads(1)
    values: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        card = segment_cub(Path(tmp) / "shards", root, masks_per_image=8, passes=passes)
        reference = write_reference(Path(tmp) / "shards", root, Path(tmp) / "reference")
        dataset = ShardDataset.open(Path(tmp) / "shards")
        keys = [r["key"] for r in dataset.rows]
        n = len(keys)
        for mode, (ref_augment, augment) in MODES.items():
            data = DataConfig(loader_threads=workers, augment=augment)
            stream = ShardStream(dataset, keys, data, input_size=size, batch_size=BATCH, train=True)
            ref_set = ReferenceDataset(reference, card.masks_per_image, size, ref_augment)
            loader = torch.utils.data.DataLoader(ref_set, batch_size=BATCH, shuffle=True, num_workers=workers,
                                                 persistent_workers=workers > 0)
            epoch = [0]

            def ours() -> float:
                epoch[0] += 1
                stream.set_epoch(epoch[0])
                return n / timed(lambda: sum(len(b["key"]) for b in stream))

            def ref() -> float:
                ref_set.epoch += 1  # persistent workers keep their copy: the draws differ by sample anyway
                return n / timed(lambda: sum(len(b[1]) for b in loader))

            values[mode] = side_by_side({"protomask shards (ShardStream)": ours,
                                         "reference layout (DataLoader)": ref}, rounds)
            del loader
    extra_rows = []
    for mode in list(MODES)[1:]:
        ratios = paired_ratios(values[mode], *values[mode])
        extra_rows += [{"": f"{name}, {mode}", "images/s": median(v), "rounds": " ".join(f"{x:.4g}" for x in v)}
                       for name, v in values[mode].items()]
        extra_rows.append({"": f"ratio, {mode}", "images/s": median(ratios),
                           "rounds": " ".join(f"{x:.4g}" for x in ratios)})
    return Figure.from_rounds(
        "P3", f"training input, {n} images (cub_mini x {passes}), K={card.masks_per_image}, {size} px, augmented "
              f"(reference: albumentations), {workers} decoding threads / loader processes",
        TARGET, values["augmented"], "images/s",
        included="one epoch: read, decode, crop, resize, augment, normalise, batch; loader start excluded",
        params={"images": n, "masks_per_image": card.masks_per_image, "size": size, "workers": workers,
                "batch_size": BATCH, "passes": passes, **{mode: v for mode, v in values.items() if mode != "augmented"}},
        extra_rows=extra_rows,
    )


def main() -> None:
    p = parser(__doc__, rounds=5)
    p.add_argument("--workers", type=int, default=2, help="decoding threads (ours) = DataLoader processes (reference)")
    p.add_argument("--passes", type=int, default=4, help="times the 60 cub_mini photos are listed: one epoch "
                                                        "(one round) reads them all (default 4)")
    p.add_argument("--size", type=int, default=224, help="crop size on both sides")
    p.add_argument("--root", type=Path, default=CUB_MINI, help="a CUB-200-2011 folder")
    args = p.parse_args()
    report(measure(args.workers, args.size, args.rounds, args.passes, args.root), args.json)


if __name__ == "__main__":
    main()

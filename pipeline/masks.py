"""From proposed masks to the stored masks and crops: drop degenerate, sort by area, keep K."""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.segmenters.base import Proposal

cv2.setNumThreads(1)  # crops are cut on many threads already (decoding threads, I/O threads): no pool within


@dataclass
class MaskSet:
    masks: np.ndarray  # [n, H, W] bool, n <= K, largest first
    boxes: np.ndarray  # [n, 4] int: x_min, y_min, x_max, y_max (inclusive)
    areas: np.ndarray  # [n] int
    scores: np.ndarray  # [n] float32


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """Inclusive bounding boxes of [n, H, W] masks (all-zero masks give [0, 0, -1, -1])."""
    n = masks.shape[0]
    flat = masks.view(np.uint8) if masks.dtype == bool else masks.astype(bool).view(np.uint8)
    rows, cols = flat.max(axis=2), flat.max(axis=1)  # [n, H], [n, W]; max of uint8 is vectorised, any() is not
    boxes = np.zeros((n, 4), dtype=np.int64)
    for i in range(n):
        ys, xs = np.flatnonzero(rows[i]), np.flatnonzero(cols[i])
        boxes[i] = (xs[0], ys[0], xs[-1], ys[-1]) if len(xs) else (0, 0, -1, -1)
    return boxes


WHOLE_IMAGE = 0.9  # a region whose box covers this share of the image or more shows no part: its crop is the image


def box_fraction(box: Sequence[int], shape: tuple[int, ...]) -> float:
    """Share of an image of ``shape`` (height, width) that the inclusive box ``[x_min, y_min, x_max, y_max]`` covers."""
    x0, y0, x1, y1 = box
    return (x1 - x0 + 1) * (y1 - y0 + 1) / (shape[0] * shape[1])


def grow_box(box: Sequence[int], margin: float, shape: tuple[int, ...]) -> list[int]:
    """The inclusive box grown by ``margin`` times its width (height) on the left and right (top and bottom), clipped
    to an image of ``shape`` (height, width): the crop of a mask with context around it (R-CNN's context padding)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    if not margin:
        return [x0, y0, x1, y1]
    dx, dy = round(margin * (x1 - x0 + 1)), round(margin * (y1 - y0 + 1))
    return [max(x0 - dx, 0), max(y0 - dy, 0), min(x1 + dx, shape[1] - 1), min(y1 + dy, shape[0] - 1)]


def select_masks(proposal: Proposal, k: int, *, max_box_fraction: float = 1.0) -> MaskSet:
    """Keep the K largest masks whose box is wider and taller than 1 px and covers at most ``max_box_fraction``
    of the image (ties broken by proposal order); when every such mask's box covers more, the largest of them
    alone, so that no image is left without a mask."""
    masks = proposal.masks.astype(bool, copy=False)
    areas = np.count_nonzero(masks.reshape(masks.shape[0], -1), axis=1)
    order, boxes, too_wide = [], [], None
    for i in np.argsort(-areas, kind="stable"):  # largest first; boxes only until K are kept
        box = mask_boxes(masks[i : i + 1])[0]
        if box[2] <= box[0] or box[3] <= box[1]:  # not wider and taller than 1 px (an empty mask: [0, 0, -1, -1])
            continue
        if box_fraction(box, masks.shape[1:]) > max_box_fraction:
            if too_wide is None:
                too_wide = (i, box)
            continue
        order.append(i)
        boxes.append(box)
        if len(order) == k:
            break
    if not order and too_wide is not None:
        order, boxes = [too_wide[0]], [too_wide[1]]
    order = np.array(order, dtype=np.int64)
    return MaskSet(
        masks=masks[order],
        boxes=np.array(boxes, dtype=np.int64).reshape(-1, 4),
        areas=areas[order].astype(np.int64),
        scores=np.asarray(proposal.scores, dtype=np.float32)[order],
    )


def crop_boxes(image: np.ndarray, boxes: Iterable[Sequence[int]], size: int) -> list[np.ndarray]:
    """Each inclusive box ``[x_min, y_min, x_max, y_max]`` of the HxWx3 uint8 ``image``, resized to
    size x size (aspect not kept): area-averaged when both sides shrink (no aliasing), bilinear
    otherwise; only the box's pixels are read. The writer's crop members and the readers' crops at
    read time are this function."""
    crops = []
    for x0, y0, x1, y1 in boxes:
        patch = image[y0 : y1 + 1, x0 : x1 + 1]
        shrink = patch.shape[0] >= size and patch.shape[1] >= size
        crops.append(cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR))
    return crops


def encode_masks(masks: np.ndarray) -> bytes:
    """The ``masks.npy.gz`` member: gzip (fixed mtime) of the .npy of the bit-packed masks."""
    buf = io.BytesIO()
    np.save(buf, pack_masks(masks), allow_pickle=False)
    return gzip.compress(buf.getvalue(), compresslevel=6, mtime=0)


def decode_masks(data: bytes, width: int) -> np.ndarray:
    """Inverse of encode_masks: [n, H, W] bool."""
    return unpack_masks(np.load(io.BytesIO(gzip.decompress(data)), allow_pickle=False), width)


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """[n, H, W] bool → uint8 [n, H, ceil(W / 8)] (np.packbits along the width)."""
    return np.packbits(masks.astype(bool), axis=-1)


def unpack_masks(packed: np.ndarray, width: int) -> np.ndarray:
    """Inverse of pack_masks."""
    return np.unpackbits(packed, axis=-1, count=width).astype(bool)

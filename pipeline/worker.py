"""One shard end to end on one worker: decode → segment → masks/crops → encode → write.

Decoding runs ahead on I/O threads and encoding runs behind on the same pool, so the segmenter (the
only expensive step on a GPU) never waits for files.
"""

from __future__ import annotations

import io
import json
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
from PIL import Image

from pipeline.image import ImageError, LoadedImage, load_image, load_object_mask
from pipeline.masks import select_masks
from pipeline.segmenters import Proposal, create_segmenter
from pipeline.shards import EncodedSample, encode_sample, write_shard
from pipeline.sources.base import inside_root
from schemas.config import SegmentConfig
from schemas.manifest import ShardStats
from schemas.shard import SampleRecord
from schemas.storage import Location, read_bytes

PREFETCH = 4  # decoded images waiting for the segmenter


class Decoded(NamedTuple):
    """One input read from disk, every array at the size of ``image.pixels``."""

    image: LoadedImage
    parts: np.ndarray | None  # ground-truth part label map
    object_mask: np.ndarray | None  # ground-truth object mask, 255 = object, 0 = background


class ShardProcessor:
    """Holds one segmenter; turns planned rows of a shard into a finished shard under ``config.out``."""

    def __init__(self, config: SegmentConfig, config_hash: str, part_names: list[str] | None = None) -> None:
        self.config = config
        self.config_hash = config_hash
        self.part_names = part_names
        self.segmenter = create_segmenter(config.segmenter)

    def _decode(self, row: dict) -> Decoded:
        """Read one planned input and its maps under ``config.root`` (a folder, or objects read one request each)."""
        def file(field: str) -> Location:
            return inside_root(self.config.root, row[field], f"input {row['key']}")

        loaded = load_image(file("source_path"), self.config.max_side, self.config.max_image_pixels)
        height, width = loaded.pixels.shape[:2]
        parts = object_mask = None
        if row["parts_path"]:
            with Image.open(io.BytesIO(read_bytes(file("parts_path")))) as im:
                parts = np.asarray(im.convert("L").resize((width, height), Image.NEAREST))
        if row["object_path"]:
            object_mask = load_object_mask(file("object_path"), (width, height))
        return Decoded(loaded, parts, object_mask)

    def _encode(self, row: dict, decoded: Decoded, proposal: Proposal) -> EncodedSample:
        cfg = self.config
        loaded, parts = decoded.image, decoded.parts
        image, original = loaded.pixels, loaded.original_size
        mask_set = select_masks(proposal, cfg.masks_per_image, max_box_fraction=cfg.max_box_fraction)
        if len(mask_set.masks) == 0:
            raise ImageError(f"segmenter returned no mask wider and taller than 1 px ({image.shape[1]}x{image.shape[0]} image)")
        record = SampleRecord(
            key=row["key"], label=row["label"], class_name=row["class_name"], split=row["split"],
            source_path=row["source_path"], width=image.shape[1], height=image.shape[0],
            original_width=original[0], original_height=original[1], masks_per_image=cfg.masks_per_image,
            n_masks=len(mask_set.masks), boxes=mask_set.boxes.tolist(), areas=mask_set.areas.tolist(),
            scores=[round(float(s), 6) for s in mask_set.scores], crop_size=cfg.crop_size,
            part_names=self.part_names if parts is not None else None,
            has_object=decoded.object_mask is not None, extra=json.loads(row["extra"]),
        )
        return encode_sample(record, image, mask_set, parts, cfg.jpeg_quality, loaded.jpeg,
                             object_mask=decoded.object_mask)

    def _segment(self, images: list[np.ndarray]) -> list[Proposal | BaseException]:
        """The segmenter's proposals for a batch of images; when the batch fails, each image again on its own, so
        that a failure is recorded against its own input."""
        try:
            return list(self.segmenter.propose_batch(images))
        except Exception as exc:  # noqa: BLE001 - retried one by one below
            if len(images) == 1:
                return [exc]
        results: list[Proposal | BaseException] = []
        for image in images:
            try:
                results.append(self.segmenter.propose_batch([image])[0])
            except Exception as exc:  # noqa: BLE001 - recorded as this input's error row
                results.append(exc)
        return results

    def process(self, shard: int, rows: list[dict], on_image: Callable[[], None] | None = None) -> ShardStats:
        """Segment every row (``segmenter.batch_size`` images per call) and write the shard; a bad input becomes
        an error row, never an exception."""
        start = time.perf_counter()
        samples: list[EncodedSample] = []
        out_rows: list[dict] = []
        ahead = max(PREFETCH, 2 * self.segmenter.batch_size)
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"shard{shard}-io") as pool:
            decoded: deque[Future] = deque(pool.submit(self._decode, r) for r in rows[:ahead])
            encoded: list[Future | BaseException | None] = [None] * len(rows)
            waiting: list[tuple[int, Decoded]] = []

            def segment_waiting() -> None:
                for (i, read), proposal in zip(waiting, self._segment([w[1].image.pixels for w in waiting])):
                    encoded[i] = (proposal if isinstance(proposal, BaseException)
                                  else pool.submit(self._encode, rows[i], read, proposal))
                    if on_image is not None:
                        on_image()
                waiting.clear()

            for i in range(len(rows)):
                job = decoded.popleft()
                if i + ahead < len(rows):
                    decoded.append(pool.submit(self._decode, rows[i + ahead]))
                try:
                    waiting.append((i, job.result()))
                except Exception as exc:  # noqa: BLE001 - any failure of one input is recorded, not raised
                    encoded[i] = exc
                    if on_image is not None:
                        on_image()
                if len(waiting) == self.segmenter.batch_size:
                    segment_waiting()
            segment_waiting()
            for row, result in zip(rows, encoded):
                error: BaseException | None = result if isinstance(result, BaseException) else result.exception()
                sample = None if error else result.result()
                if sample is not None:
                    samples.append(sample)
                out_rows.append(self._row(row, sample, error))
        return write_shard(self.config.out, shard, samples, out_rows, self.config_hash, time.perf_counter() - start)

    @staticmethod
    def _row(row: dict, sample: EncodedSample | None, error: BaseException | None) -> dict:
        meta = json.loads(sample.members["json"]) if sample else {}
        message = None
        if error is not None:
            message = str(error) if isinstance(error, ImageError) else f"{type(error).__name__}: {error}"
        return {
            "key": row["key"], "shard": row["shard"], "source_path": row["source_path"], "label": row["label"],
            "class_name": row["class_name"], "split": row["split"], "status": "ok" if sample else "error",
            "error_message": message, "width": meta.get("width"), "height": meta.get("height"),
            "original_width": meta.get("original_width"), "original_height": meta.get("original_height"),
            "n_masks": meta.get("n_masks", 0),
            "sample_bytes": sum(len(v) for v in sample.members.values()) if sample else 0,
        }

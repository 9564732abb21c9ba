"""P1: segmentation job throughput ÷ a bare loop (decode + the same segmenter) on the same images.

The inputs are the cub_mini photos listed ``--repeat`` times (a listing file), so fixed costs (actor
start, model load) are amortised as in a real job. Ray is started once, before both timings."""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import ray

from bench.common import CUB_MINI, report
from pipeline.image import load_image
from pipeline.job import run_segment
from pipeline.segmenters import create_segmenter
from pipeline.sources import cub
from schemas.config import SegmentConfig


def write_listing(root: Path, folder: Path, repeat: int) -> tuple[int, Path]:
    """A listing file naming the CUB photos under ``root`` ``repeat`` times; returns (entries, path)."""
    items = cub.list_items(root).items * repeat
    listing = folder / "list.csv"
    with listing.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        writer.writerows([i.path, i.class_name, i.split] for i in items)
    return len(items), listing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=8, help="times the 60 photos are listed")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    root = CUB_MINI
    items = cub.list_items(root).items * args.repeat
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        _, listing = write_listing(root, Path(tmp), args.repeat)
        config = SegmentConfig(source="listing", root=root, listing=listing, out=Path(tmp) / "shards",
                               shard_size=60, crop_size=224, masks_per_image=8, num_workers=1, cpus_per_worker=1)
        segmenter = create_segmenter(config.segmenter)
        start = time.perf_counter()
        for item in items:
            image, _ = load_image(root / item.path, config.max_side, config.max_image_pixels)
            segmenter(image)
        bare = len(items) / (time.perf_counter() - start)
        start = time.perf_counter()
        run_segment(config, progress=False)
        job = len(items) / (time.perf_counter() - start)
    ray.shutdown()
    report(f"P1 segmentation job vs bare loop ({len(items)} images, superpixel, 1 worker)", [
        {"what": "bare loop: decode + segment", "images_per_s": bare},
        {"what": "job: + masks, crops, JPEG, tar/parquet, Ray", "images_per_s": job},
        {"what": "ratio (target >= 0.95)", "images_per_s": job / bare},
    ], args.json)


if __name__ == "__main__":
    main()

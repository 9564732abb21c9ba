"""P1: segmentation job throughput ÷ a bare loop calling the same segmenter on the same images.

Inputs: the cub_mini photos listed --passes times (a `listing` source), --shard-size inputs a shard.
Bare loop (this process): per input, decode (pipeline.image.load_image) and call the segmenter.
Job: pipeline.job.run_segment, one 1-CPU worker, on a local Ray started once before both sides.
The job's rate is its steady state: the images of the shards after the first ÷ the time from the
first shard's completion marker to the last, so the worker's one-time start (process, imports,
segmenter construction), the plan and the manifest are excluded, as the bare loop has none of them.
Everything else the job does per image is included: decoding, segmenting, selecting and packing the
masks, the image member (the input's own bytes for plain RGB JPEGs such as cub_mini's, else JPEG
encoding), the tar and parquet writes with fsync and checksums, the progress counter. The end-to-end
rate (run_segment call to return, one-time costs included) is reported beside it.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as bench/p1_... or python -m bench.p1_...

from bench.common import (CUB_MINI, Figure, ShardClock, local_ray, median, parser, report, shard_images,
                          side_by_side, timed, write_listing)
from pipeline.image import load_image
from pipeline.job import run_segment
from pipeline.segmenters import create_segmenter
from pipeline.sources import cub
from schemas.config import SegmentConfig
from schemas.storage import Location

TARGET = ">= 0.95"


def measure(passes: int, shard_size: int, rounds: int, root: Path = CUB_MINI) -> Figure:
    items = cub.list_items(root).items * passes
    end_to_end: list[float] = []
    with tempfile.TemporaryDirectory() as tmp, local_ray(1):
        n, listing = write_listing(root, Path(tmp), passes)
        config = SegmentConfig(source="listing", root=root, listing=listing, out=Path(tmp) / "out",
                               shard_size=shard_size, masks_per_image=8, num_workers=1,
                               cpus_per_worker=1)
        segmenter = create_segmenter(config.segmenter)
        segmenter(load_image(root / items[0].path, config.max_side, config.max_image_pixels)[0])  # warm

        def bare() -> float:
            def loop() -> None:
                for item in items:
                    segmenter(load_image(root / item.path, config.max_side, config.max_image_pixels)[0])

            return n / timed(loop)

        def job() -> float:
            out = Path(tempfile.mkdtemp(dir=tmp))
            with ShardClock(out) as clock:
                seconds = timed(lambda: run_segment(config.model_copy(update={"out": Location.parse(out)}),
                                                    progress=False))
            end_to_end.append(n / seconds)
            return clock.steady_rate(shard_images(out), workers=1)

        values = side_by_side({"job (steady state)": job, "bare loop": bare}, rounds, warmup=False)
    e2e = median(end_to_end)
    return Figure.from_rounds(
        "P1", f"segmentation job ÷ bare loop, superpixel, {n} images, shards of {shard_size}, 1 worker",
        TARGET, values, "images/s",
        included="bare loop: decode + segment; job: steady state after the first shard, everything per image "
                 "and per shard included; Ray start excluded from both",
        params={"passes": passes, "images": n, "shard_size": shard_size, "segmenter": "superpixel",
                "masks_per_image": 8, "end_to_end_images_per_s": end_to_end},
        extra_rows=[{"": "job end to end (worker start, plan, manifest included)", "images/s": e2e,
                     "rounds": " ".join(f"{v:.4g}" for v in end_to_end)}],
    )


def main() -> None:
    p = parser(__doc__, rounds=5)
    p.add_argument("--passes", type=int, default=4, help="times the 60 cub_mini photos are listed (default 4)")
    p.add_argument("--shard-size", type=int, default=60)
    p.add_argument("--root", type=Path, default=CUB_MINI, help="a CUB-200-2011 folder")
    args = p.parse_args()
    report(measure(args.passes, args.shard_size, args.rounds, args.root), args.json)


if __name__ == "__main__":
    main()

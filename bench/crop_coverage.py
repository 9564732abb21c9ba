"""How much of its image a crop shows, with and without ``model.crop_margin``: over every mask of a shard folder,
and over the masks a run's prototypes were pushed onto.

    python bench/crop_coverage.py --shards S [--run-dir R ...] [--margins 0 0.25 0.5 1]

A row per margin (and per run): the mean share of the image the crops cover, and how many cover at least
``WHOLE_IMAGE`` of it (the gallery's "whole image" flag, measured here on the crop as the model reads it).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Collection
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or with python -m

from bench.common import print_table
from pipeline.masks import WHOLE_IMAGE, box_fraction, grow_box
from pipeline.shards import iter_samples
from schemas.shard import SampleRecord
from schemas.storage import Location
from training.data import ShardDataset


Crop = tuple[list[int], tuple[int, int]]  # a mask's box and its image's (height, width)
Boxes = dict[str, tuple[list[list[int]], tuple[int, int]]]  # per sample key: its masks' boxes, its image's shape


def boxes_by_key(shards: Location | Path, keys: Collection[str] | None = None) -> Boxes:
    """Each sample's mask boxes and its image's (height, width); only those of ``keys`` when given."""
    dataset = ShardDataset.open(shards)
    wanted = {r["shard"] for r in dataset.rows if keys is None or r["key"] in keys}  # tars holding none: not read
    out = {}
    for shard in sorted(wanted):
        for key, members in iter_samples(dataset.tar_path(shard)):
            if keys is None or key in keys:
                record = SampleRecord.model_validate_json(members["json"])
                out[key] = (record.boxes, (record.height, record.width))
    return out


def pushed(run_dir: Path) -> list[dict]:
    """The last push of a run (``push_log.json``), without the prototypes it left unpushed."""
    return [e for e in json.loads((run_dir / "push_log.json").read_text())["push"] if e["key"] is not None]


def pushed_crops(push: list[dict], boxes: Boxes) -> list[Crop]:
    """The masks a push (``pushed``) put the prototypes onto."""
    return [(boxes[e["key"]][0][e["mask_index"]], boxes[e["key"]][1]) for e in push]


def covered_shares(crops: list[Crop], margin: float) -> np.ndarray:
    """The share of its image each crop covers once its box is grown by ``margin``."""
    return np.array([box_fraction(grow_box(box, margin, shape), shape) for box, shape in crops])


def coverage_row(name: str, margin: float, crops: list[Crop]) -> dict:
    shares = covered_shares(crops, margin)
    return {"crops": name, "margin": margin, "n": len(shares), "mean share of the image": f"{shares.mean():.0%}",
            f"covering >= {WHOLE_IMAGE:.0%}": f"{int((shares >= WHOLE_IMAGE).sum())} ({np.mean(shares >= WHOLE_IMAGE):.0%})"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=Path, required=True)
    p.add_argument("--run-dir", type=Path, nargs="*", default=[], help="runs trained on these shards (push_log.json)")
    p.add_argument("--margins", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0])
    args = p.parse_args()
    boxes = boxes_by_key(args.shards)
    every = [(box, shape) for masks, shape in boxes.values() for box in masks]
    rows = [coverage_row("every mask", m, every) for m in args.margins]
    for run in args.run_dir:
        crops = pushed_crops(pushed(run), boxes)
        rows += [coverage_row(f"pushed onto: {run.name}", m, crops) for m in args.margins]
    print_table("crop coverage", rows)


if __name__ == "__main__":
    main()

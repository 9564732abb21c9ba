"""P5: bytes on disk per image, our shards ÷ the reference layout (spec §4.3): one full-resolution RGB
PNG per mask (image pixels inside the mask, zeros outside) plus the original image, same images and K."""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import CUB_MINI, report
from pipeline.job import run_segment
from pipeline.manifest import read_rows
from pipeline.shards import iter_samples
from pipeline.masks import decode_masks
from schemas.shard import MASKS_MEMBER
from schemas.config import SegmentConfig


def reference_bytes(shards: Path, root: Path) -> int:
    """What the reference writes for the same masks: mask_i.png per kept mask + the original file."""
    total = 0
    for tar in sorted(shards.glob("*.tar")):
        for _, members in iter_samples(tar):
            import json

            record = json.loads(members["json"])
            image = np.asarray(Image.open(io.BytesIO(members["jpg"])).convert("RGB"))
            masks = decode_masks(members[MASKS_MEMBER], record["width"])
            for mask in masks:
                buf = io.BytesIO()
                Image.fromarray(image * mask[..., None]).save(buf, format="PNG")
                total += len(buf.getvalue())
            total += (root / record["source_path"]).stat().st_size
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=CUB_MINI)
    parser.add_argument("--masks-per-image", type=int, default=8)
    parser.add_argument("--crop-size", type=int, default=224)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = SegmentConfig(source="cub", root=args.root, out=Path(tmp) / "shards",
                               masks_per_image=args.masks_per_image, crop_size=args.crop_size, shard_size=64)
        card = run_segment(config, progress=False)
        n = card.counts["ok"]
        ours = card.total_bytes + sum(p.stat().st_size for p in config.out.glob("*.parquet"))
        ref = reference_bytes(config.out, args.root)
        members: dict[str, int] = {}
        for tar in config.out.glob("*.tar"):
            for _, sample in iter_samples(tar):
                for ext, data in sample.items():
                    kind = "crops" if ext.startswith("crop_") else ext
                    members[kind] = members.get(kind, 0) + len(data)
    rows = [{"layout": "protomask shards", "bytes_per_image": ours / n},
            {"layout": "reference PNG per mask + original", "bytes_per_image": ref / n},
            {"layout": "ratio (target <= 0.2)", "bytes_per_image": ours / ref}]
    rows += [{"layout": f"  of which {k}", "bytes_per_image": v / n} for k, v in sorted(members.items())]
    report(f"P5 bytes per image (K={args.masks_per_image}, crops {args.crop_size}px, {n} images)", rows, args.json)


if __name__ == "__main__":
    main()

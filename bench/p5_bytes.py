"""P5: bytes on disk per image, our shard directory ÷ the reference layout, same images, masks and K.

Ours: every file `protomask segment` writes for the cub_mini photos (superpixel, K=8, default
format: image, masks and boxes, crops cut at read time): tars, parquets, stats markers, manifest,
plan, config; and the same with --crop-size 224 (crop members also stored), for comparison. Reference (spec §4.1 step 5, §4.3), written by
bench.common.write_reference from the same masks: one full-resolution RGB PNG per mask (image pixels
inside the mask, zeros outside) + segmentation_info.json, plus the original image files. The
reference's duplicated masks (balance_masks) and its copies into split folders are not counted.

Nothing is timed: the sizes are deterministic, so there is one round. The table also breaks our bytes
down by member (tar framing included).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as bench/p5_... or python -m bench.p5_...

from bench.common import CUB_MINI, Figure, parser, report, segment_cub, tree_bytes, write_reference
from pipeline.shards import iter_samples
from schemas.manifest import shard_glob

TARGET = "<= 0.2"
TAR_BLOCK = 512


def tar_footprint(size: int) -> int:
    """Bytes a member of ``size`` bytes takes in a tar: its header block + data padded to blocks."""
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


def member_bytes(shards: Path) -> dict[str, int]:
    """Tar footprint per member kind (``crop_NN.jpg`` counted together as ``crops``)."""
    kinds: dict[str, int] = {}
    for tar in sorted(shards.glob(shard_glob(part="tar"))):
        for _, members in iter_samples(tar):
            for ext, data in members.items():
                kind = "crop_NN.jpg" if ext.startswith("crop_") else ext
                kinds[kind] = kinds.get(kind, 0) + tar_footprint(len(data))
    return kinds


def measure(root: Path = CUB_MINI, masks_per_image: int = 8, crop_size: int = 224) -> Figure:
    with tempfile.TemporaryDirectory() as tmp:
        shards, stored, ref_dir = Path(tmp) / "shards", Path(tmp) / "stored", Path(tmp) / "reference"
        segment_cub(shards, root, masks_per_image)
        segment_cub(stored, root, masks_per_image, crop_size)
        samples = write_reference(shards, root, ref_dir)
        n = len(samples)
        ours, with_crops = tree_bytes(shards), tree_bytes(stored)
        originals = sum(s.original.stat().st_size for s in samples)
        pngs = sum(p.stat().st_size for s in samples for p in s.masks)
        reference = tree_bytes(ref_dir) + originals
        kinds = member_bytes(shards)
        stored_kinds = member_bytes(stored)
    rows = [{"": f"  ours: {kind} (tar header and padding included)", "bytes/image": size / n}
            for kind, size in sorted(kinds.items(), key=lambda kv: -kv[1])]
    rows += [
        {"": "  ours: tar end blocks, parquets, markers, manifest, plan, config", "bytes/image": (ours - sum(kinds.values())) / n},
        {"": "  reference: mask PNGs", "bytes/image": pngs / n},
        {"": "  reference: original images", "bytes/image": originals / n},
        {"": "  reference: segmentation_info.json", "bytes/image": (reference - pngs - originals) / n},
        {"": f"ours with --crop-size {crop_size} (crops also stored)", "bytes/image": with_crops / n},
        {"": "  of which crop_NN.jpg", "bytes/image": stored_kinds["crop_NN.jpg"] / n},
        {"": f"ratio with --crop-size {crop_size}", "bytes/image": with_crops / reference},
    ]
    return Figure(
        figure="P5", title=f"bytes on disk per image, {n} cub_mini images, K={masks_per_image}",
        target=TARGET, ratio=ours / reference, ratios=[ours / reference], ours=ours / n, reference=reference / n,
        unit="bytes/image", rounds={"protomask shard directory": [ours / n], "reference layout": [reference / n]},
        included="every file of each layout; nothing timed",
        params={"images": n, "masks_per_image": masks_per_image, "members": kinds,
                "masks_stored": sum(len(s.masks) for s in samples), "crop_size_stored_variant": crop_size,
                "stored_variant_bytes_per_image": with_crops / n, "stored_variant_members": stored_kinds},
        extra_rows=rows,
    )


def main() -> None:
    p = parser(__doc__, rounds=1)
    p.add_argument("--root", type=Path, default=CUB_MINI, help="a CUB-200-2011 folder")
    p.add_argument("--masks-per-image", type=int, default=8)
    p.add_argument("--crop-size", type=int, default=224, help="crop size of the stored-crops variant")
    args = p.parse_args()
    report(measure(args.root, args.masks_per_image, args.crop_size), args.json)


if __name__ == "__main__":
    main()

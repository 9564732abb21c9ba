"""P3: training input images/s from our shards ÷ the reference layout (spec §4.3/§4.5): per sample, K
full-resolution RGB mask PNGs (zeros outside the mask) and the original image are read, the
background is filled back from the original, each mask's box is cropped and resized to 224, augmented
and normalised. Same images, same K, same augmentation and the same number of decoding threads."""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import CUB_MINI, report
from pipeline.job import run_segment
from pipeline.masks import decode_masks
from pipeline.shards import iter_samples
from schemas.config import DataConfig, SegmentConfig
from schemas.shard import MASKS_MEMBER
from training.data import IMAGENET_MEAN, IMAGENET_STD, ShardDataset, ShardStream, make_augment


def write_reference(shards: Path, root: Path, out: Path) -> list[dict]:
    """The reference's files for our masks: mask_<i>.png per mask + the original path and boxes."""
    samples = []
    for tar in sorted(shards.glob("*.tar")):
        for key, members in iter_samples(tar):
            record = json.loads(members["json"])
            image = np.asarray(Image.open(root / record["source_path"]).convert("RGB").resize(
                (record["width"], record["height"])))
            paths = []
            for i, mask in enumerate(decode_masks(members[MASKS_MEMBER], record["width"])):
                path = out / f"{key}_mask_{i}.png"
                Image.fromarray(image * mask[..., None]).save(path)
                paths.append(path)
            samples.append({"original": root / record["source_path"], "masks": paths, "boxes": record["boxes"],
                            "size": (record["width"], record["height"])})
    return samples


def reference_sample(sample: dict, size: int, seed: int) -> np.ndarray:
    original = np.asarray(Image.open(sample["original"]).convert("RGB").resize(sample["size"]))
    augment = make_augment(seed)
    crops = []
    for path, (x0, y0, x1, y1) in zip(sample["masks"], sample["boxes"]):
        masked = np.asarray(Image.open(path).convert("RGB"))
        filled = np.where(masked.any(-1, keepdims=True), masked, original)  # "original" background fill
        crop = Image.fromarray(filled[y0 : y1 + 1, x0 : x1 + 1]).resize((size, size), Image.BILINEAR)
        crops.append((np.asarray(augment(crop), np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD)
    return np.stack(crops)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        config = SegmentConfig(source="cub", root=CUB_MINI, out=Path(tmp) / "shards", masks_per_image=8,
                               crop_size=args.size, shard_size=16, num_workers=2, cpus_per_worker=1)
        run_segment(config, progress=False)
        ray.shutdown()
        (Path(tmp) / "ref").mkdir()
        reference = write_reference(config.out, CUB_MINI, Path(tmp) / "ref")
        dataset = ShardDataset.open(config.out)
        keys = [r["key"] for r in dataset.rows]
        stream = ShardStream(dataset, keys, DataConfig(batch_size=8, loader_threads=args.threads), args.size,
                             True, 0, 1, 0)
        start = time.perf_counter()
        n = sum(len(b["key"]) for b in stream)
        ours = n / (time.perf_counter() - start)
        start = time.perf_counter()
        with ThreadPoolExecutor(args.threads) as pool:
            m = len(list(pool.map(lambda s: reference_sample(s[1], args.size, s[0]), enumerate(reference))))
        ref = m / (time.perf_counter() - start)
    report(f"P3 training input, {n} images, K=8, {args.size} px, {args.threads} threads", [
        {"input": "protomask shards (ShardStream)", "images_per_s": ours},
        {"input": "reference layout (PNG per mask + original)", "images_per_s": ref},
        {"input": "ratio (target >= 5)", "images_per_s": ours / ref},
    ], args.json)


if __name__ == "__main__":
    main()

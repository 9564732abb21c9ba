"""``protomask`` console script. Each subcommand parses flags, merges them over ``--config`` (flags
win), and calls the library function of its stage."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from schemas.config import ConfigError, SegmentConfig, load_config

# flag dest -> dotted config key
SEGMENT_FLAGS = {
    "source": "source", "root": "root", "out": "out", "listing": "listing",
    "segmenter": "segmenter.name", "checkpoint": "segmenter.checkpoint", "model_type": "segmenter.model_type",
    "device": "segmenter.device", "masks_per_image": "masks_per_image", "crop_size": "crop_size",
    "shard_size": "shard_size", "max_side": "max_side", "num_workers": "num_workers",
    "cpus_per_worker": "cpus_per_worker", "overwrite": "overwrite",
}


def _add_segment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment", help="images -> masks -> WebDataset shards + manifests (a Ray job)")
    p.add_argument("--config", type=Path, help="YAML/JSON SegmentConfig; flags override it")
    p.add_argument("--source", choices=["synthetic", "cub", "imagefolder", "listing"])
    p.add_argument("--root", type=Path, help="dataset root (synthetic: where the images are generated)")
    p.add_argument("--out", type=Path, help="shard directory")
    p.add_argument("--listing", type=Path, help="CSV/Parquet with path,label[,split] (source=listing)")
    p.add_argument("--segmenter", choices=["superpixel", "sam", "grid"])
    p.add_argument("--checkpoint", type=Path, help="SAM checkpoint .pth (segmenter=sam)")
    p.add_argument("--model-type", choices=["vit_b", "vit_l", "vit_h"])
    p.add_argument("--device", choices=["auto", "cuda", "cpu"])
    p.add_argument("--masks-per-image", type=int, help="K: masks kept per image")
    p.add_argument("--crop-size", type=int)
    p.add_argument("--shard-size", type=int, help="images per shard")
    p.add_argument("--max-side", type=int)
    p.add_argument("--num-workers", type=int, help="segmenter workers (default: GPUs, else CPUs)")
    p.add_argument("--cpus-per-worker", type=float)
    p.add_argument("--overwrite", action="store_true", default=None, help="replace shards of another config")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--no-progress", action="store_true")


def cmd_segment(args: argparse.Namespace) -> int:
    from pipeline.job import run_segment
    from pipeline.manifest import format_inspect, inspect

    overrides = {key: getattr(args, dest) for dest, key in SEGMENT_FLAGS.items()}
    config = load_config(SegmentConfig, args.config, overrides)
    card = run_segment(config, address=args.address, progress=not args.no_progress)
    print(format_inspect(inspect(config.out)))
    return 0 if card.counts["ok"] else 1


def cmd_manifest(args: argparse.Namespace) -> int:
    from pipeline.manifest import format_inspect, inspect, verify

    if args.action == "inspect":
        summary = inspect(args.dir)
        print(json.dumps(summary, indent=1) if args.json else format_inspect(summary))
        return 0
    problems = verify(args.dir)
    for line in problems:
        print(line)
    print(f"{args.dir}: {'FAILED, ' + str(len(problems)) + ' problem(s)' if problems else 'OK'}")
    return 1 if problems else 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The embedded default end to end: synthetic images → superpixel masks → shards (+ verify)."""
    from pipeline.job import run_segment
    from pipeline.manifest import format_inspect, inspect, verify

    config = SegmentConfig(
        source="synthetic", root=args.out / "synthetic", out=args.out / "shards", masks_per_image=6,
        crop_size=64, shard_size=32, cpus_per_worker=0.5 if args.num_workers else None,
        num_workers=args.num_workers,
    )
    t0 = time.perf_counter()
    card = run_segment(config, progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    print(format_inspect(inspect(config.out)))
    problems = verify(config.out)
    print(f"segmented {card.counts['inputs']} images in {seconds:.1f} s "
          f"({card.counts['inputs'] / seconds:.1f} images/s, job start-up included); "
          f"verify: {'OK' if not problems else problems}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="protomask", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_segment(sub)
    m = sub.add_parser("manifest", help="inspect or verify a shard directory")
    m.add_argument("action", choices=["inspect", "verify"])
    m.add_argument("dir", type=Path)
    m.add_argument("--json", action="store_true", help="inspect: print JSON")
    d = sub.add_parser("demo", help="run the whole job on the embedded synthetic dataset (no downloads, no GPU)")
    d.add_argument("--out", type=Path, default=Path("demo"))
    d.add_argument("--num-workers", type=int, default=2)
    d.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    handlers = {"segment": cmd_segment, "manifest": cmd_manifest, "demo": cmd_demo}
    from pipeline.job import JobError
    from pipeline.shards import ShardError
    from pipeline.sources import SourceError

    try:
        return handlers[args.command](args)
    except (ConfigError, JobError, ShardError, SourceError) as exc:
        print(f"protomask {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

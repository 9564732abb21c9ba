"""Seed spread on real photos: the rows of bench/real_photos.py trained once per seed on the same shards.

Prints each seed's test balanced accuracy per model, each model's mean and standard deviation over the seeds, and
ProtoMask's paired difference to every other model (mean, standard error, seeds where ProtoMask is not lower): the
figures behind docs/results.md's comparison over seeds.

    python bench/seeds.py --seeds 4861 1 2 3 4 5 6 7 8 9 --models ProtoMask 'patch baseline'   # ~65 min, 2 cores
    python bench/seeds.py --seeds 4861 1 --set model.input_size=96                           # a change, two seeds
    python bench/seeds.py --seeds 4861 1 --models ProtoMask --segment-set segmenter.n_segments=24 --work W2  # masks

Runs land in --work/runs/<model>-seed<N>; a finished run whose config and shards are unchanged is reused from
--work/seeds.json, so an interrupted sweep goes on where it stopped. A --work folder holds one segmentation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as bench/seeds.py or python -m bench...

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from bench.common import print_table
from bench.real_photos import (CUB_DEV, MODELS, check_root, identity, measure, model_config, segment,
                               segment_config)
from protomask.cli import config_file, settings
from schemas.config import ConfigError
from schemas.files import atomic_write


def summarise(accuracy: dict[str, dict[int, float]]) -> list[dict]:
    """``accuracy[model][seed]`` → one row per model (mean and sample SD over its seeds) and, for ProtoMask against
    every other model, one row of the paired differences over the seeds both have (mean, its standard error, and
    on how many seeds ProtoMask is not lower). Differences are in points (accuracies × 100)."""
    rows = []
    for model, by_seed in accuracy.items():
        values = [100 * v for v in by_seed.values()]
        rows.append({"row": model, "seeds": len(values), "mean": statistics.fmean(values),
                     "sd": statistics.stdev(values) if len(values) > 1 else math.nan})
    ours = accuracy.get("ProtoMask", {})
    for model, by_seed in accuracy.items():
        paired = sorted(set(ours) & set(by_seed)) if model != "ProtoMask" else []
        if not paired:
            continue
        diffs = [100 * (ours[s] - by_seed[s]) for s in paired]
        sd = statistics.stdev(diffs) if len(diffs) > 1 else math.nan
        rows.append({"row": f"ProtoMask − {model}", "seeds": len(diffs), "mean": statistics.fmean(diffs), "sd": sd,
                     "se": sd / math.sqrt(len(diffs)), "not_lower": sum(d >= 0 for d in diffs)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", required=True, help="training seeds (config field seed)")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=["ProtoMask", "patch baseline"])
    p.add_argument("--config", default="small-cpu", help="training config file or name in configs/")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                   help="a config field by its dotted name for every run, e.g. model.input_size=96 (repeatable)")
    p.add_argument("--root", type=Path, default=CUB_DEV, help="a CUB-200-2011 layout folder (default: cub_dev)")
    p.add_argument("--work", type=Path, default=Path("/tmp/protomask-bench-seeds"),
                   help="shards and runs; one folder per change (a run of another config replaces the one there)")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--masks-per-image", type=int, default=8, metavar="K",
                   help="segmentation: the K largest masks per image (a --work folder holds one segmentation)")
    p.add_argument("--segment-set", action="append", default=[], metavar="KEY=VALUE", dest="segment_settings",
                   help="segmentation: a field of the segment config by its dotted name, e.g. "
                        "segmenter.n_segments=24 (repeatable)")
    args = p.parse_args()
    check_root(args.root)
    shards = args.work / "shards"
    try:  # every config is checked before anything runs
        segment_overrides = settings(args.segment_settings, flag="--segment-set", example="segmenter.n_segments=24")
        segmentation = segment_config(args.root, shards, args.num_workers,
                                      overrides={"masks_per_image": args.masks_per_image, **segment_overrides})
        config_path, overrides = config_file(args.config), settings(args.settings)
        configs = {(name, seed): model_config(MODELS[name], config_path, shards,
                                              args.work / "runs" / f"{name.replace(' ', '-')}-seed{seed}",
                                              args.num_workers, overrides={**overrides, "seed": seed})
                   for name in args.models for seed in args.seeds}
    except ConfigError as exc:
        sys.exit(f"bench/seeds.py: {exc}")
    segment(segmentation)
    shards_id = segmentation.output_hash()
    saved = args.work / "seeds.json"
    done = {(r["model"], r["seed"]): r for r in json.loads(saved.read_text())["rows"]} if saved.is_file() else {}
    for seed in args.seeds:  # seed by seed, so that a stopped sweep leaves whole pairs
        for name in args.models:
            config = configs[name, seed]
            earlier = done.get((name, seed), {})
            if earlier.get("config") == identity(config) and earlier.get("segmentation") == shards_id:
                continue
            if config.run_dir.local.exists():
                shutil.rmtree(config.run_dir.local)  # a fresh run, not a resumed one
            done[name, seed] = {**measure(name, config), "seed": seed, "segmentation": shards_id}
            atomic_write(saved, json.dumps({"rows": list(done.values())}, indent=1))  # the sweep's resume state
    accuracy = {name: {seed: done[name, seed]["balanced_accuracy"] for seed in args.seeds} for name in args.models}
    print_table("test balanced accuracy by seed", [
        {"seed": seed, **{name: f"{accuracy[name][seed]:.1%}" for name in args.models}} for seed in args.seeds])
    print_table("over the seeds (points)", [{k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in r.items()}
                                            for r in summarise(accuracy)])
    print(f"\n{shlex.join(['python', 'bench/seeds.py', *sys.argv[1:]])}; runs in {args.work / 'runs'}")


if __name__ == "__main__":
    main()

"""The paper's comparison on one set of shards: ProtoMask, ProtoPNet, ProtoPool, PIP-Net and the black-box on the
same trunk (the whole image, a linear head), each trained with several seeds through the same loop, then
``protomask report`` over all runs (seeds of one model as mean ± std) and the paper's table printed as Markdown.

    .venv/bin/python bench/paper_table.py --work /tmp/paper              # the demo's synthetic shards, 3 seeds
    .venv/bin/python bench/paper_table.py --work /tmp/paper-cub --shards S --config small-cpu --seeds 1

Every model takes the base config (default: the demo's) with its own kind and loss terms (the references':
ProtoPNet and ProtoPool separation 0.08 without diversity, PIP-Net cross-entropy 2 and no last-layer phase) and
the same epochs; the whole-image models see ``--whole-image-size`` px (the demo's patch baseline: 112). A rerun
with the same --work skips finished runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as bench/paper_table.py or python -m bench...

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import yaml

from pipeline.job import run_segment
from protomask.cli import config_file
from schemas.config import SegmentConfig, TrainConfig, load_config
from training.report import aggregate, paper_markdown, write_report
from training.train import run_train

MODELS = {  # row name -> (model kind, its own settings)
    "ProtoMask": ("protomask", {}),
    "ProtoPNet": ("protopnet", {"loss.separation": 0.08, "loss.diversity": 0.0}),
    "ProtoPool": ("protopool", {"loss.separation": 0.08}),
    "PIP-Net": ("pipnet", {"loss.cross_entropy": 2.0, "schedule.last_layer_epochs": 0,
                           "schedule.lr_last_layer": 0.05}),
    "black-box": ("protomask", {"model.head": "linear", "model.regions": "patches"}),  # the same trunk, whole image
}


def demo_shards(work: Path, workers: int) -> Path:
    """The demo's synthetic shards (``protomask demo``'s segmentation), made once under ``work``."""
    config = SegmentConfig(source="synthetic", root=work / "synthetic", out=work / "shards", masks_per_image=6,
                           shard_size=32, num_workers=workers, cpus_per_worker=2 / workers)
    run_segment(config, progress=False)
    return config.out.local


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--shards", type=Path, help="default: the demo's synthetic shards, made under --work")
    p.add_argument("--config", default="demo", help="base training config: a file or a name from configs/")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--whole-image-size", type=int, default=112)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config field for every run")
    args = p.parse_args()
    start = time.perf_counter()
    shards = args.shards or demo_shards(args.work, args.workers)
    common = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)}
    base = load_config(TrainConfig, config_file(args.config), {**common, "shards": shards, "run_dir": args.work})
    runs = []
    for name in args.models:
        kind, own = MODELS[name]
        if own.get("model.regions", "patches" if kind != "protomask" else "masks") == "patches":  # the whole image
            own = {**own, "model.input_size": args.whole_image_size}
        if kind != "protomask":  # the base config's ProtoMask-only starts do not apply
            own = {**own, "schedule.addon_init": "random"}
        if kind in ("protopool", "pipnet"):
            own = {**own, "schedule.prototype_init": "uniform", "schedule.prune": False}
        if kind == "protopool":  # annealed to one-hot by the end of the joint phase
            own = {**own, "schedule.gumbel_epochs": base.schedule.warmup_epochs + base.schedule.joint_epochs}
        for seed in range(args.seeds):
            run_dir = args.work / "runs" / f"{re.sub('[^a-z0-9]', '', name.lower())}-seed{seed}"
            train = load_config(TrainConfig, config_file(args.config), {
                **common, "model.kind": kind, **own, "seed": seed, "shards": shards, "run_dir": run_dir,
                "num_workers": args.workers, "cpus_per_worker": 1 / args.workers})
            if not (run_dir / "metrics_test.json").is_file():
                t = time.perf_counter()
                test = run_train(train, progress=False)["test"]
                print(f"{name} seed {seed}: balanced accuracy {test['balanced_accuracy']:.1%} "
                      f"({(time.perf_counter() - t) / 60:.1f} min)", flush=True)
            runs.append((name, run_dir))
    report = write_report(runs, args.work / "report")
    results = json.loads((report.parent / "results.json").read_text())
    summaries = aggregate({name: results[name]["metrics"] for name in results})
    print(f"\nShards: {shards}; base config {args.config}; {args.seeds} seeds; {(time.perf_counter() - start) / 60:.1f} "
          f"min in all.\n\n{paper_markdown(summaries)}\n\nreport: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

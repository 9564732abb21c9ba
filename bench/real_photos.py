"""Real-photo benchmark: segment cub_dev (1,770 CUB photos of 30 species) once, then train ProtoMask,
the patch baseline and the two black-boxes on the same shards with one config (default: the
small-machine config, configs/small-cpu.yaml, on 2 workers), evaluate each on the test split and write
docs/results.md.

    make bench-real                      # or: .venv/bin/python bench/real_photos.py [--config NAME] [--models ...]

Rows: ProtoMask (prototypes on the mask crops), the patch baseline (prototypes on a grid of the whole
image), the black-box on the whole image and the black-box on the same crops (the linear head: global
pool per crop, max over crops). Same backbone, input size and epochs for all four. Balanced accuracy is
the paper's "accuracy" (mean per-class recall).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as bench/real_photos.py or python -m bench...

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from bench.common import REPO, machine, print_table
from bench.crop_coverage import boxes_by_key, covered_shares, pushed, pushed_crops
from pipeline.job import JobError, run_segment
from pipeline.masks import WHOLE_IMAGE
from pipeline.sources import SourceError
from protomask.cli import config_file
from schemas.config import ConfigError, SegmentConfig, TrainConfig, load_config
from schemas.storage import Location
from training.train import run_train

CUB_DEV = Path(os.environ.get("PROTOMASK_CUB_DEV", REPO.parent / "shared" / "data" / "cub_dev"))
BEGIN, END = "<!-- measured by bench/real_photos.py: begin -->", "<!-- measured by bench/real_photos.py: end -->"
MODELS = {  # row name -> model fields
    "ProtoMask": {"head": "prototypes", "regions": "masks"},
    "patch baseline": {"head": "prototypes", "regions": "patches", "crop_margin": 0.0},  # no mask boxes to grow
    "black-box, whole image": {"head": "linear", "regions": "patches", "crop_margin": 0.0},
    "black-box, crops": {"head": "linear", "regions": "masks"},
}


def check_root(root: Path) -> None:
    """Exit with one line unless ``root`` is a CUB-200-2011 layout folder (the data these benchmarks read)."""
    if not (root / "images.txt").is_file() and not (root / "CUB_200_2011" / "images.txt").is_file():
        sys.exit(f"{root}: not a CUB-200-2011 layout folder (set --root or PROTOMASK_CUB_DEV)")


def segment_config(root: Path, out: Path, workers: int, *, overrides: dict | None = None) -> SegmentConfig:
    """The benchmarks' segmentation: superpixel masks, the 8 largest per image, shards of 128, then ``overrides``
    (dotted SegmentConfig fields, e.g. ``segmenter.n_segments``)."""
    return load_config(SegmentConfig, None, {
        "source": "cub", "root": root, "out": out, "masks_per_image": 8, "shard_size": 128, "num_workers": workers,
        "cpus_per_worker": 2 / workers, **(overrides or {})})


def segment(config: SegmentConfig) -> float:
    """Run the segmentation job; rerunning skips finished shards. Returns the wall seconds; exits with one line
    when the job refuses (a source it cannot read, an output folder it cannot use)."""
    start = time.perf_counter()
    try:
        run_segment(config, progress=False)
    except (JobError, SourceError) as exc:
        sys.exit(f"segmenting {config.root} into {config.out}: {exc}")
    return time.perf_counter() - start


def model_config(model: dict, config_path: Path, shards: Path, run_dir: Path, workers: int, *,
                 overrides: dict | None = None) -> TrainConfig:
    """One row's training config: the file, then ``overrides`` (dotted names), then the row's model fields."""
    return load_config(TrainConfig, config_path, {
        **(overrides or {}), **{f"model.{k}": v for k, v in model.items()}, "shards": shards, "run_dir": run_dir,
        "num_workers": workers, "cpus_per_worker": 2 / workers})


def identity(config: TrainConfig) -> str:
    """What a row's figures depend on: the config without paths, and without the prototype settings
    when the head has no prototypes (a linear-head row stays valid when only those change)."""
    data = config.model_dump(mode="json", exclude={"shards", "run_dir"})
    if config.model.head == "linear":
        for key in ("prototypes_per_class", "prototype_dim", "patch_grid", "off_class_weight", "match_dropout"):
            data["model"].pop(key)
        data.pop("loss"), data.pop("parity")
        s = config.schedule  # all the linear head reads: its epochs (all joint), 2 rates, the StepLR, the average
        data["schedule"] = {"epochs": s.pretrain_epochs + s.warmup_epochs + s.joint_epochs + s.last_layer_epochs,
                            "lr_backbone": s.lr_backbone, "lr_addon": s.lr_addon, "step_size": s.step_size,
                            "gamma": s.gamma, "ema_half_life": s.ema_half_life}
    return json.dumps(data, sort_keys=True)


def measure(name: str, config: TrainConfig) -> dict:
    """Train one row's model from scratch; its row of figures (test metrics as the run wrote them)."""
    model, run_dir = config.model, config.run_dir
    start = time.perf_counter()
    trained = run_train(config)  # the run evaluates its exported model on the test split (metrics_test.json)
    wall = time.perf_counter() - start
    test = trained["test"]
    with (run_dir.local / "metrics.csv").open() as f:
        epochs = list(csv.DictReader(f))
    rate = [float(e["images_per_s"]) for e in epochs]
    classes = [float(e["classes_per_step"]) for e in epochs if e.get("classes_per_step")]
    on_masks = model.regions == "masks" and model.head != "linear"
    whole = whole_image_prototypes(run_dir.local, config.shards, model.crop_margin) if on_masks else None
    return {
        "model": name, "head": model.head, "regions": model.regions, "config": identity(config),
        "measured": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "balanced_accuracy": test["balanced_accuracy"], "top3": test["top3"], "accuracy": test["accuracy"],
        "train_accuracy": float(epochs[-1]["train_accuracy"]), "wall_min": wall / 60,
        "images_per_s": sum(rate) / len(rate), "peak_memory_mib": max(trained["peak_memory_mib"]),
        "micro_batch": trained["micro_batch"], "classes_per_step": sum(classes) / len(classes),
        "batch_size": config.data.batch_size, "epochs": len(epochs), "n_test": test["n"], "whole_image": whole,
    }


def whole_image_prototypes(run_dir: Path, shards: Location, crop_margin: float) -> list[int]:
    """[prototypes pushed onto a mask whose box covers at least WHOLE_IMAGE of its image, those whose crop as the
    model reads it (the box grown by ``crop_margin``) does, prototypes pushed]."""
    push = pushed(run_dir)
    crops = pushed_crops(push, boxes_by_key(shards, {e["key"] for e in push}))
    return [int((covered_shares(crops, margin) >= WHOLE_IMAGE).sum()) for margin in (0.0, crop_margin)] + [len(crops)]


def write_results(path: Path, rows: list[dict], info: dict) -> None:
    by_name = {r["model"]: r for r in rows}
    lines = [
        "# Real-photo results", "",
        f"Produced by `{info['command']}` on {info['date']} ({info['machine']}), {info['wall_min']:.0f} min in all.",
        f"Data: {info['data']}. Segmentation: {info['segmentation']}.",
        f"Training: `{info['config']}` on {info['workers']} Ray workers: {info['config_summary']}.", "",
        "| model | test balanced accuracy | top-3 | train accuracy (last epoch) | wall time | images/s | "
        "peak memory per worker | classes per step | prototypes on whole-image masks (crops) | measured |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['balanced_accuracy']:.1%} | {r['top3']:.1%} | {r['train_accuracy']:.1%} | "
                     f"{r['wall_min']:.1f} min | {r['images_per_s']:.1f} | {r['peak_memory_mib'] / 1024:.2f} GiB | "
                     f"{r['classes_per_step']:.1f} of {r['batch_size']} images | "
                     f"{'—' if r.get('whole_image') is None else '{} ({}) of {}'.format(*r['whole_image'])} | "
                     f"{r['measured']} |")
    lines += ["", "Balanced accuracy is the mean per-class recall on the test split "
              f"({rows[0]['n_test']} photos), the paper's \"accuracy\". Images/s counts training images over all "
              "workers per second of the training epochs (validation excluded), averaged over the epochs. "
              f"Prototypes on whole-image masks: pushed onto a mask whose box covers {WHOLE_IMAGE:.0%} of the image "
              "or more, so that it points at no part (mask regions only); in parentheses those whose crop, as the "
              "model reads it (the box grown by model.crop_margin), covers that much."]
    if "ProtoMask" in by_name:
        ours = by_name["ProtoMask"]["balanced_accuracy"]
        for ref in ("black-box, whole image", "black-box, crops", "patch baseline"):
            if ref in by_name:
                lines.append(f"- ProtoMask ÷ {ref}: {ours / by_name[ref]['balanced_accuracy']:.2f}")
    table = "\n".join([BEGIN, *lines[2:], END])
    text = path.read_text() if path.is_file() else ""
    if BEGIN in text and END in text:  # keep the prose around the measured part
        text = text[:text.index(BEGIN)] + table + text[text.index(END) + len(END):]
    else:
        text = lines[0] + "\n\n" + table + "\n"
    path.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=CUB_DEV, help="a CUB-200-2011 layout folder (default: cub_dev)")
    p.add_argument("--work", type=Path, default=Path("/tmp/protomask-bench-real"), help="shards and runs")
    p.add_argument("--config", default="small-cpu", help="training config file or name in configs/")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--masks-per-image", type=int, default=8, metavar="K",
                   help="segmentation: the K largest masks per image (a --work folder holds one K)")
    p.add_argument("--merge-levels", type=float, nargs="*", default=[], metavar="T",
                   help="segmentation: segmenter.merge_levels, coarser merges proposed too (default: none)")
    p.add_argument("--max-box-fraction", type=float, default=1.0, metavar="F",
                   help="segmentation: masks whose box covers more of the image are dropped (default 1: none)")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS),
                   help="train these; the others' rows are kept from the last run in --work when their config "
                        "is unchanged (a linear-head row ignores the prototype settings)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "results.md")
    args = p.parse_args()
    check_root(args.root)
    start = time.perf_counter()
    shards = args.work / "shards"
    try:  # every config is checked before anything runs
        segmentation = segment_config(args.root, shards, args.num_workers, overrides={
            "masks_per_image": args.masks_per_image, "segmenter.merge_levels": args.merge_levels,
            "max_box_fraction": args.max_box_fraction})
        config_path = config_file(args.config)
        configs = {name: model_config(model, config_path, shards,
                                      args.work / "runs" / name.replace(", ", "-").replace(" ", "-"), args.num_workers)
                   for name, model in MODELS.items()}
    except ConfigError as exc:
        sys.exit(f"bench/real_photos.py: {exc}")
    seg_s = segment(segmentation)
    saved = args.work / "results.json"
    earlier = {r["model"]: r for r in json.loads(saved.read_text())["rows"]} if saved.is_file() else {}
    rows = []
    for name, config in configs.items():
        run_dir = config.run_dir.local
        if name not in args.models:  # kept from an earlier run only if measured with the same config
            if earlier.get(name, {}).get("config") == identity(config):
                rows.append(earlier[name])
            continue
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a fresh run, not a resumed one
        rows.append(measure(name, config))
        print(json.dumps(rows[-1]), flush=True)
    print_table("real photos", [{k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in r.items() if k != "config"}
                                for r in rows])
    config = load_config(TrainConfig, config_path, {"shards": shards, "run_dir": args.work})
    m, s = config.model, config.schedule
    levels = f" with merge levels {', '.join(f'{t:g}' for t in args.merge_levels)}" if args.merge_levels else ""
    levels += f", boxes up to {args.max_box_fraction:.0%} of the image" if args.max_box_fraction < 1 else ""
    info = {
        "command": shlex.join(["python", "bench/real_photos.py", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": f"{machine()['cpus']} CPUs, {machine()['memory_gib']} GiB, {platform.machine()}, no GPU",
        "data": f"{args.root.name}", "wall_min": (time.perf_counter() - start) / 60,
        "segmentation": f"superpixel masks{levels}, K = {args.masks_per_image}, on {args.num_workers} workers "
                        f"({seg_s:.0f} s in this run; a rerun reuses the finished shards)",
        "config": str(config_path.relative_to(REPO)) if config_path.is_relative_to(REPO) else str(config_path),
        "workers": args.num_workers,
        "config_summary": f"{m.backbone} width {m.width}, {m.input_size} px"
                          + (f", mask boxes grown by {m.crop_margin:g} of their size on every side" if m.crop_margin
                             else "")
                          + f", {m.prototypes_per_class} prototypes "
                          f"per class of dimension {m.prototype_dim}"
                          + (f" matched in training over a random {1 - m.match_dropout:.0%} of the regions"
                             if m.match_dropout else "")
                          + f", epochs: {s.pretrain_epochs} pre-training"
                          + (" on whole images" if s.pretrain_on == "image" else "") + " + "
                          f"{s.warmup_epochs} warm-up + {s.joint_epochs} joint + {s.last_layer_epochs} last layer "
                          f"(the black-boxes train all {s.pretrain_epochs + s.warmup_epochs + s.joint_epochs + s.last_layer_epochs} "
                          f"epochs end to end), {config.data.batch_size} images per step"
                          + (f", the weights averaged over the joint phase's steps and again over the last-layer "
                             f"phase's (half-life {s.ema_half_life:g} epoch; the black-boxes' over all their epochs)"
                             if s.ema_half_life else ""),
    }
    write_results(args.out, rows, info)
    (args.work / "results.json").write_text(json.dumps({"rows": rows, "info": info}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""``protomask`` console script. Each subcommand parses flags, merges them over ``--config`` (flags
win), and calls the library function of its stage."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from schemas.config import ConfigError, SegmentConfig, TrainConfig, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # named configs: --config small-cpu


def config_file(value: str | None) -> Path | None:
    """``--config``: a file, or the name of one in configs/ (``small-cpu`` for ``configs/small-cpu.yaml``)."""
    if value is None or Path(value).is_file():
        return None if value is None else Path(value)
    named = CONFIGS / f"{value}.yaml"
    if named.is_file():
        return named
    names = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.yaml")))
    raise ConfigError(f"--config {value}: no such file, nor a named config ({names})")


def settings(pairs: list[str]) -> dict[str, object]:
    """``--set KEY=VALUE`` flags as dotted overrides, each value parsed as YAML (``3e-4``, ``true``, ``[1, 2]``)."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair}: expected KEY=VALUE, e.g. model.head=linear")
        out[key.strip()] = yaml.safe_load(value)
    return out


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
    p.add_argument("--crop-size", type=int, help="also store each crop as a JPEG of this size (default: none; "
                                                 "readers cut crops from the image at the boxes)")
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


TRAIN_FLAGS = {
    "shards": "shards", "run_dir": "run_dir", "epochs_warmup": "schedule.warmup_epochs",
    "epochs_joint": "schedule.joint_epochs", "epochs_last_layer": "schedule.last_layer_epochs",
    "backbone": "model.backbone", "weights": "model.weights", "batch_size": "data.batch_size",
    "num_workers": "num_workers", "cpus_per_worker": "cpus_per_worker", "use_gpu": "use_gpu", "seed": "seed",
}


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train ProtoMask on cached shards with Ray Train (rerun = resume)")
    p.add_argument("--config", help="YAML/JSON TrainConfig, or a name from configs/ (small-cpu, cub-gpu, demo); "
                                     "flags override it")
    p.add_argument("--shards", type=Path, help="shard directory written by `protomask segment`")
    p.add_argument("--run-dir", type=Path, help="checkpoints, metrics, exported model")
    p.add_argument("--epochs-warmup", type=int)
    p.add_argument("--epochs-joint", type=int)
    p.add_argument("--epochs-last-layer", type=int)
    p.add_argument("--backbone", choices=["resnet18", "resnet34", "resnet50", "vgg16", "densenet121", "convnet"])
    p.add_argument("--weights", help="pretrained backbone: a torchvision weights name (IMAGENET1K_V2, DEFAULT) "
                                      "or a state-dict file")
    p.add_argument("--batch-size", type=int, help="images per worker step")
    p.add_argument("--num-workers", type=int, help="Ray Train workers")
    p.add_argument("--cpus-per-worker", type=float)
    p.add_argument("--use-gpu", action="store_true", default=None)
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                   help="any config field by its dotted name, e.g. --set model.head=linear (repeatable; the value "
                        "is read as YAML)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    e = sub.add_parser("evaluate", help="metrics of a trained model on one split of a shard directory")
    e.add_argument("--run-dir", type=Path, required=True)
    e.add_argument("--shards", type=Path, required=True)
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    r = sub.add_parser("report", help="self-contained HTML report of one run, or several side by side")
    r.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    r.add_argument("--out", type=Path, help="default: RUN_DIR/report of the first run")
    r.add_argument("--names", nargs="+", help="a column name per run (default: the directory names)")
    x = sub.add_parser("explain", help="prototype gallery and per-image explanations (PNGs + JSON)")
    x.add_argument("--run-dir", type=Path, required=True)
    x.add_argument("--shards", type=Path, required=True)
    x.add_argument("--out", type=Path, required=True)
    x.add_argument("--keys", nargs="+", help="sample keys to explain (default: the first test samples)")
    x.add_argument("--top-k", type=int, default=3, help="prototypes shown per image")
    x.add_argument("--limit", type=int, default=8, help="test samples explained when no --keys")
    x.add_argument("--relevance", action="store_true",
                   help="gradient x input inside the matched mask instead of the binary mask")


def cmd_explain(args: argparse.Namespace) -> int:
    from training.explain import run_explain

    summary = run_explain(args.run_dir, args.shards, args.out, args.keys, args.top_k, args.limit, args.relevance)
    for record in summary["explanations"]:
        best = record["evidence"][0]
        print(f"{record['key']}: true {record['label']}, predicted {record['predicted']}; top prototype "
              f"p{best['prototype']} on mask {best['mask_index']} (+{best['contribution']:.2f})  {record['png']}")
    print(f"gallery: {', '.join(summary['gallery'])}  in {args.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from training.report import write_report

    names = args.names or [d.name for d in args.run_dirs]
    if len(names) != len(args.run_dirs):
        raise ConfigError(f"--names: {len(names)} names for {len(args.run_dirs)} run directories")
    path = write_report(dict(zip(names, args.run_dirs)), args.out or args.run_dirs[0] / "report")
    print(f"report: {path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from training.train import run_train

    overrides = {**settings(args.settings), **{key: getattr(args, dest) for dest, key in TRAIN_FLAGS.items()}}
    config = load_config(TrainConfig, config_file(args.config), overrides)
    result = run_train(config, address=args.address)
    print(format_side_by_side({"model": result["test"]}, "test"))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from training.train import run_evaluate

    print(format_side_by_side({"model": run_evaluate(args.run_dir, args.shards, args.split)}, args.split))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The embedded default end to end: synthetic images → superpixel masks → shards → train → evaluate."""
    from pipeline.job import run_segment
    from pipeline.manifest import format_inspect, inspect, verify
    from training.report import write_report
    from training.train import run_evaluate, run_train

    workers = args.num_workers
    segment = SegmentConfig(
        source="synthetic", root=args.out / "synthetic", out=args.out / "shards", masks_per_image=6,
        shard_size=32, num_workers=workers, cpus_per_worker=2 / workers,
    )
    t0 = time.perf_counter()
    card = run_segment(segment, progress=not args.no_progress)
    t_segment = time.perf_counter() - t0
    print(format_inspect(inspect(segment.out)))
    problems = verify(segment.out)
    print(f"\nsegmented {card.counts['inputs']} images in {t_segment:.1f} s "
          f"({card.counts['inputs'] / t_segment:.1f} images/s, Ray start-up included); verify: "
          f"{'OK' if not problems else problems}\n")
    if problems:
        return 1
    results = {}
    # the baseline sees the whole 128 px image: a larger input than one mask crop needs
    for name, model in (("protomask", {"regions": "masks"}), ("patch baseline", {"regions": "patches", "input_size": 112})):
        train = load_config(TrainConfig, CONFIGS / "demo.yaml", {
            **{f"model.{k}": v for k, v in model.items()}, "shards": segment.out,
            "run_dir": args.out / f"run_{model['regions']}", "num_workers": workers, "cpus_per_worker": 1 / workers,
        })
        t1 = time.perf_counter()
        run_train(train)
        print(f"\n{name}: trained with {workers} workers in {time.perf_counter() - t1:.1f} s\n")
        results[name] = run_evaluate(train.run_dir, segment.out, "test")
    print(format_side_by_side(results, "test"))
    report = write_report({"protomask": args.out / "run_masks", "patch baseline": args.out / "run_patches"},
                          args.out / "report")
    best = results["protomask"]
    print(f"\nProtoMask test accuracy {best['accuracy']:.1%} (chance {1 / len(card.classes):.0%}), part hit rate "
          f"{best['part_hit_rate']:.1%}; report: {report}")
    return 0


def format_side_by_side(results: dict[str, dict], split: str) -> str:
    names = list(results)
    keys = [k for k, v in results[names[0]].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    lines = [f"{split:<20}" + "".join(f"{n:>16}" for n in names)]
    lines += [f"{k:<20}" + "".join(f"{results[n].get(k, float('nan')):>16.4g}" for n in names) for k in keys]
    return "\n".join(lines)


def cluster_entry(command: str, argv: list[str]) -> int:
    """``ray submit`` entry scripts: run ``command`` attached to the running cluster (``--address auto``;
    a later ``--address`` in ``argv`` wins)."""
    args = list(argv)
    if args[:1] == ["--"]:  # tolerate a forwarded "--" separator
        args = args[1:]
    return main([command, "--address", "auto", *args])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="protomask", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_segment(sub)
    _add_train(sub)
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
    handlers = {"segment": cmd_segment, "manifest": cmd_manifest, "demo": cmd_demo, "train": cmd_train,
                "evaluate": cmd_evaluate, "explain": cmd_explain, "report": cmd_report}
    from pipeline.job import JobError
    from pipeline.shards import ShardError
    from pipeline.sources import SourceError
    from training import TrainError

    try:
        return handlers[args.command](args)
    except (ConfigError, JobError, ShardError, SourceError, TrainError) as exc:
        print(f"protomask {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""``protomask``: segment images into shards, inspect and verify them, train, evaluate, explain and report.

Every subcommand reads its settings from one pydantic config (schemas.config): ``--config FILE|NAME``,
then ``--set a.b=value``, then its flags, later ones winning. Folders are always flags: ``--shards``,
``--run-dir``, ``--out``. Errors print one line (exit 2: usage or config, 1: a failed job); ``-v`` shows
Ray's own output and tracebacks.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from protomask.flags import add_flags, overrides
from schemas.config import (ConfigError, DemoConfig, EvaluateConfig, ExplainConfig, ManifestConfig, ReportConfig,
                            SegmentConfig, Strict, TrainConfig, load_config)
from schemas.storage import Location

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


def settings(pairs: list[str], *, flag: str = "--set", example: str = "model.head=linear") -> dict[str, object]:
    """``--set KEY=VALUE`` flags (or another ``flag`` of that form) as dotted overrides, each value parsed as YAML
    (``3e-4``, ``true``, ``[1, 2]``)."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {pair}: expected KEY=VALUE, e.g. {example}")
        out[key.strip()] = yaml.safe_load(value)
    return out


# --- the commands: each declares its config, its flags and what it adds by hand ------------------------------

def _run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def cmd_segment(config: SegmentConfig, args: argparse.Namespace) -> int:
    from pipeline.job import run_segment
    from pipeline.manifest import format_inspect, inspect

    card = run_segment(config, address=args.address, progress=args.progress)
    print(format_inspect(inspect(config.out)))
    return 0 if card.counts["ok"] else 1


def cmd_manifest(config: ManifestConfig, args: argparse.Namespace) -> int:
    import json

    from pipeline.manifest import format_inspect, inspect, verify

    if args.action == "inspect":
        summary = inspect(config.shards)
        print(json.dumps(summary, indent=1) if config.as_json else format_inspect(summary))
        return 0
    problems = verify(config.shards)
    for line in problems:
        print(line)
    print(f"{config.shards}: {'FAILED, ' + str(len(problems)) + ' problem(s)' if problems else 'OK'}")
    return 1 if problems else 0


def cmd_train(config: TrainConfig, args: argparse.Namespace) -> int:
    from training.train import run_train

    start = time.perf_counter()
    result = run_train(config, address=args.address, progress=args.progress)
    print(train_summary(config.run_dir, result["test"], time.perf_counter() - start))
    return 0


def train_summary(run_dir: Location, test: dict, seconds: float) -> str:
    return (f"trained in {seconds / 60:.1f} min: test balanced accuracy {test['balanced_accuracy']:.1%}, top-3 "
            f"{test['top3']:.1%} ({test['n']} images); model {run_dir / 'model.pt'}, metrics "
            f"{run_dir / 'metrics_test.json'}; report: protomask report --run-dir {run_dir}")


def cmd_evaluate(config: EvaluateConfig, args: argparse.Namespace) -> int:
    from training.evaluate import metrics_file
    from training.train import run_evaluate

    result = run_evaluate(config.run_dir, config.shards, config.split, batch_size=config.batch_size,
                          relevance=config.relevance)
    print(format_side_by_side({"model": result}, config.split))
    print(f"written to {metrics_file(config.run_dir, config.split)}")
    return 0


def cmd_explain(config: ExplainConfig, args: argparse.Namespace) -> int:
    from training.explain import run_explain

    out = config.out or config.run_dir / "explain"
    summary = run_explain(config.run_dir, config.shards, out, keys=config.keys, k=config.top_k, limit=config.limit,
                          relevance=config.relevance)
    for record in summary["explanations"]:
        best = record["evidence"][0]
        print(f"{record['key']}: true {record['label']}, predicted {record['predicted']}; top prototype "
              f"p{best['prototype']} on mask {best['mask_index']} (+{best['contribution']:.2f})  {record['png']}")
    print(f"gallery: {', '.join(summary['gallery'])}  in {out}")
    return 0


def cmd_report(config: ReportConfig, args: argparse.Namespace) -> int:
    from training.report import write_report

    first = config.run_dir[0]
    if config.out is None and not first.is_local:
        raise ConfigError(f"--out: the report is written to a local folder; give one for the run in {first}")
    names = config.names or [d.name for d in config.run_dir]
    path = write_report(list(zip(names, config.run_dir)), config.out or first.local / "report")
    print(f"report: {path}")
    return 0


def cmd_demo(config: DemoConfig, args: argparse.Namespace) -> int:
    """The embedded default end to end: synthetic images → superpixel masks → shards → train → evaluate."""
    from pipeline.job import run_segment
    from pipeline.manifest import format_inspect, inspect, verify
    from training.report import write_report
    from training.train import run_train

    workers, out = config.num_workers, config.out
    segment = SegmentConfig(
        source="synthetic", root=out / "synthetic", out=out / "shards", masks_per_image=6,
        shard_size=32, num_workers=workers, cpus_per_worker=2 / workers, overwrite=config.overwrite,
    )
    runs = {"protomask": out / "run_masks", "patch baseline": out / "run_patches"}
    if config.overwrite:
        for folder in (*runs.values(), out / "report"):
            shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    card = run_segment(segment, progress=args.progress)
    t_segment = time.perf_counter() - t0
    print(format_inspect(inspect(segment.out)))
    problems = verify(segment.out)
    print(f"\nverify: {'OK' if not problems else problems} (segmentation {t_segment:.1f} s, Ray start-up included)")
    if problems:
        return 1
    results = {}
    # the baseline sees the whole 128 px image: a larger input than one mask crop needs
    for name, model in (("protomask", {"regions": "masks"}), ("patch baseline", {"regions": "patches", "input_size": 112})):
        train = load_config(TrainConfig, CONFIGS / "demo.yaml", {
            **{f"model.{k}": v for k, v in model.items()}, "shards": segment.out,
            "run_dir": runs[name], "num_workers": workers, "cpus_per_worker": 1 / workers,
        })
        print(f"\n{name}: training on {workers} workers")
        t1 = time.perf_counter()
        results[name] = run_train(train, progress=args.progress)["test"]
        print(train_summary(train.run_dir, results[name], time.perf_counter() - t1))
    print()
    print(format_side_by_side(results, "test"))
    report = write_report(list(runs.items()), out / "report")
    best = results["protomask"]
    print(f"\nProtoMask test balanced accuracy {best['balanced_accuracy']:.1%} (chance {1 / len(card.classes):.0%}), "
          f"part hit rate {best['part_hit_rate']:.1%}; report: {report}")
    return 0


def format_side_by_side(results: dict[str, dict], split: str) -> str:
    """One row per numeric metric, one column per model: the paper's metrics first, in its units and order
    (``PAPER_METRICS``: shares ×100 where it prints them so) and named beside ours, then the others."""
    from training.metrics import PAPER_METRICS

    names = list(results)
    numeric = [k for r in results.values() for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    keys = [k for k in PAPER_METRICS if k in numeric] + [k for k in dict.fromkeys(numeric) if k not in PAPER_METRICS]
    lines = [f"{split:<20}" + "".join(f"{n:>16}" for n in names)]
    for k in keys:
        paper, _, factor = PAPER_METRICS.get(k, ("", "", 1))
        values = "".join(f"{factor * results[n].get(k, float('nan')):>16.4g}" for n in names)
        note = f"  (the paper's {paper}{', ×100' if factor != 1 else ''})" if paper else ""
        lines.append(f"{k:<20}{values}{note}")
    return "\n".join(lines)


Handler = Callable[[Strict, argparse.Namespace], int]
# name -> (help, config, handler, options added by hand); every config field is also a flag (protomask.flags)
COMMANDS: dict[str, tuple[str, type[Strict], Handler, Callable[[argparse.ArgumentParser], None] | None]] = {
    "segment": ("images -> masks -> WebDataset shards + manifests (a Ray job; a rerun skips finished shards)",
                SegmentConfig, cmd_segment, _run_options),
    "manifest": ("inspect or verify a shard directory", ManifestConfig, cmd_manifest,
                 lambda p: p.add_argument("action", choices=["inspect", "verify"])),
    "train": ("train on cached shards with Ray Train (a rerun with the same --run-dir resumes)",
              TrainConfig, cmd_train, _run_options),
    "evaluate": ("every metric of a trained model on one split, into RUN_DIR/metrics_<split>.json",
                 EvaluateConfig, cmd_evaluate, None),
    "explain": ("prototype gallery and per-image explanations (PNGs + JSON)", ExplainConfig, cmd_explain, None),
    "report": ("self-contained HTML report of one run, or several side by side", ReportConfig, cmd_report, None),
    "demo": ("the whole job on the embedded synthetic dataset (no downloads, no GPU)", DemoConfig, cmd_demo,
             lambda p: p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")),
}
RENAMED = {"segmenter.name": "segmenter", "synthetic.seed": "synthetic_seed", "as_json": "json"}  # flag names that are not the field's


def build_parser() -> argparse.ArgumentParser:
    from schemas.version import CODE_VERSION, FORMAT_VERSION

    parser = argparse.ArgumentParser(prog="protomask", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"protomask {CODE_VERSION} (format {FORMAT_VERSION})")
    parser.add_argument("-v", "--verbose", action="store_true", help="Ray's own output, and tracebacks on errors")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--config", metavar="FILE|NAME", help=(
        "YAML/JSON config file, or a name from configs/ (" + ", ".join(sorted(p.stem for p in CONFIGS.glob("*.yaml")))
        + "); --set and flags override it"))
    common.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                        help="any config field by its dotted name, e.g. --set model.head=linear (repeatable; the value "
                             "is read as YAML)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, model, handler, extra) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           parents=[common])
        if extra is not None:
            extra(p)
        p.set_defaults(handler=handler, model=model, dests=add_flags(p, model, rename=RENAMED), progress=True)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (tests swap it)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):  # noqa: ANN201 - logging's own attribute
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


class _ConsoleFormatter(logging.Formatter):
    """Our INFO lines as plain text; warnings and errors prefixed with their level."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def configure_logging(verbose: bool) -> None:
    """Our loggers (``protomask.*``) at INFO, everything else at WARNING; all at DEBUG with ``-v``
    (which ``cluster.connect`` reads to let Ray's own output through)."""
    handler = _StderrHandler()
    handler.setFormatter(_ConsoleFormatter("%(name)s: %(message)s" if verbose else "%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.getLogger("protomask").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:  # printed on every Ray start; the stack runs with token auth on (docs)
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    from pipeline.job import JobError
    from pipeline.shards import ShardError
    from pipeline.sources import SourceError
    from training import TrainError
    from training.weights import WeightsError

    where = f"protomask {args.command}"
    try:
        config = load_config(args.model, config_file(args.config),
                             {**settings(args.settings), **overrides(args, args.dests)}, section=args.command)
        return args.handler(config, args)
    except ConfigError as exc:
        print(f"{where}: error: {exc}", file=sys.stderr)
        return 2
    except (JobError, ShardError, SourceError, TrainError, WeightsError, OSError) as exc:
        if args.verbose:
            raise
        if isinstance(exc, BrokenPipeError):  # `protomask ... | head`: the reader is gone; stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        print(f"{where}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{where}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, or a failure we do not know yet: one line, the traceback with -v
        if args.verbose:
            raise
        print(f"{where}: error: {type(exc).__name__}: {exc} (rerun with -v for the traceback)", file=sys.stderr)
        return 1


def cluster_entry(command: str, argv: list[str]) -> int:
    """``ray submit`` entry scripts: run ``command`` attached to the running cluster (``--address auto``;
    a later ``--address`` in ``argv`` wins)."""
    args = list(argv)
    if args[:1] == ["--"]:  # tolerate a forwarded "--" separator
        args = args[1:]
    return main([command, "--address", "auto", *args])


if __name__ == "__main__":
    sys.exit(main())

"""Shared by the benchmarks: side-by-side timing, the result table and JSON, and the inputs they
share (cub_mini, a segmented shard directory, the reference layout, a clock on finished shards).

Every benchmark measures both sides of its ratio in the same process, alternating them round by round
(A B, B A, A B, ...) so that a change in machine load hits both, and reports the median of the rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import operator
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local throw-away clusters: no token set-up

REPO = Path(__file__).resolve().parents[1]
CUB_MINI = Path(os.environ.get("PROTOMASK_CUB_MINI", REPO.parent / "shared" / "data" / "cub_mini"))


# ---------------------------------------------------------------------------------------------- timing


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of one call of ``fn``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def side_by_side(trials: dict[str, Callable[[], float]], rounds: int, warmup: bool = True) -> dict[str, list[float]]:
    """Run every trial once per round, the order reversed every other round; each trial returns its
    measured value (a rate or a time). One untimed round first when ``warmup``. Returns the values."""
    names = list(trials)
    if warmup:
        for name in names:
            trials[name]()
    values: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            values[name].append(float(trials[name]()))
    return values


def median(values: list[float]) -> float:
    return statistics.median(values)


def paired_ratios(values: dict[str, list[float]], a: str, b: str) -> list[float]:
    """``a / b`` round by round: both were measured back to back, so load shared by the pair cancels."""
    return [x / y for x, y in zip(values[a], values[b])]


# ---------------------------------------------------------------------------------------------- result

_OPS = {">=": operator.ge, "<=": operator.le}


def meets(value: float, target: str) -> bool:
    """``target`` is ``">= 0.95"`` or ``"<= 1.10"``."""
    op, bound = target.split()
    return _OPS[op](value, float(bound))


@dataclass
class Figure:
    """One benchmark's outcome. ``ratio`` is the median of the per-round ratios (``ratios``); ``ours``
    and ``reference`` are the medians of each side, for scale."""

    figure: str  # "P1"
    title: str
    target: str
    ratio: float
    ratios: list[float]  # one per round (a single value where nothing is timed)
    ours: float
    reference: float
    unit: str  # of ours and reference
    rounds: dict[str, list[float]]  # every measured value of the two sides, ours first
    included: str  # what the timed region holds
    params: dict
    extra_rows: list[dict] | None = None  # further rows for the table (other settings, a breakdown)

    @classmethod
    def from_rounds(cls, figure: str, title: str, target: str, values: dict[str, list[float]], unit: str,
                    included: str, params: dict, extra_rows: list[dict] | None = None) -> Figure:
        """From the values of two side-by-side trials (ours first, then the reference)."""
        a, b = list(values)[:2]
        ratios = paired_ratios(values, a, b)
        return cls(figure, title, target, median(ratios), ratios, median(values[a]), median(values[b]), unit,
                   {a: values[a], b: values[b]}, included, params, extra_rows)

    @property
    def met(self) -> bool:
        return meets(self.ratio, self.target)

    def as_dict(self) -> dict:
        return {**self.__dict__, "met": self.met, "machine": machine()}


def fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return str(value)


def print_table(title: str, rows: list[dict]) -> None:
    """``rows`` as aligned columns (the union of their keys, in first-seen order)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    width = {k: max(len(k), *(len(fmt(r.get(k, ""))) for r in rows)) for k in keys}
    print(f"\n{title}")
    print("  ".join(k.ljust(width[k]) for k in keys))
    for r in rows:
        print("  ".join(fmt(r.get(k, "")).ljust(width[k]) for k in keys))
    sys.stdout.flush()


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")


def report(result: Figure, out: Path | None) -> dict:
    """Print the figure's table (medians, ratio, target, extra rows) and write its JSON to ``out``."""
    rows = [{"": name, result.unit: median(v), "rounds": " ".join(fmt(x) for x in v)} for name, v in result.rounds.items()]
    rows.append({"": f"ratio, target {result.target}: {'met' if result.met else 'MISSED'}", result.unit: result.ratio,
                 "rounds": " ".join(fmt(x) for x in result.ratios)})
    print_table(f"{result.figure}: {result.title}", rows + (result.extra_rows or []))
    print(f"  timed: {result.included}")
    payload = result.as_dict()
    if out is not None:
        write_json(out, payload)
    return payload


def in_child(script: str, args: list[str]) -> Figure:
    """Run a benchmark script with ``args`` in a child process and return its Figure: a simulated
    ``ray.cluster_utils.Cluster`` needs a process without Ray already initialised."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "figure.json"
        subprocess.run([sys.executable, script, *args, "--json", str(out)], check=True)
        data = json.loads(out.read_text())
    return Figure(**{k: data[k] for k in Figure.__dataclass_fields__})


def machine() -> dict:
    """What the numbers were measured on, and how loaded it was."""
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in _lines("/proc/cpuinfo") if line.startswith("model name")), "")
    mem = next((int(line.split()[1]) // 1024 // 1024 for line in _lines("/proc/meminfo") if line.startswith("MemTotal")), 0)
    return {
        "cpus": os.cpu_count(), "cpu_model": cpu or platform.processor(), "memory_gib": mem,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def _lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def parser(doc: str, rounds: int) -> argparse.ArgumentParser:
    """The options every benchmark has: ``--rounds`` and ``--json``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=rounds, help=f"timed rounds per side, median reported (default {rounds})")
    p.add_argument("--json", type=Path, help="write the result here as JSON")
    return p


# ---------------------------------------------------------------------------------------------- inputs


@contextlib.contextmanager
def local_ray(num_cpus: int) -> Iterator[None]:
    """A throw-away local Ray for this process."""
    import ray

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


def write_listing(root: Path, folder: Path, passes: int) -> tuple[int, Path]:
    """A ``listing`` source file naming every CUB photo under ``root`` ``passes`` times; (entries, path)."""
    from pipeline.sources import cub

    items = cub.list_items(root).items * passes
    listing = folder / "list.csv"
    with listing.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        writer.writerows([i.path, i.class_name, i.split] for i in items)
    return len(items), listing


class ShardClock:
    """Notes when each shard's completion marker (``_job/<split>-NNNNN_stats.json``) appears in ``out``, from a
    thread polling every ``interval`` seconds, to time a job's steady state without touching it."""

    def __init__(self, out: Path, interval: float = 0.01) -> None:
        self.out, self.interval = out, interval
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> ShardClock:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._scan()

    def _scan(self) -> None:
        now = time.perf_counter()
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(_markers(self.out)):
                if _is_marker(entry.name) and entry.name not in self.seen:
                    self.seen[entry.name] = now

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self._scan()

    def steady_rate(self, images_per_shard: dict[str, int], workers: int) -> float:
        """Images per second after each worker's first shard: the images of the later shards over
        the time from the ``workers``-th marker to the last (worker start-up and warm-up excluded)."""
        order = sorted(self.seen, key=self.seen.get)
        if len(order) <= workers:
            raise ValueError(f"{len(order)} shards for {workers} workers: too few to time a steady state")
        later = order[workers:]
        return sum(images_per_shard[name] for name in later) / (self.seen[order[-1]] - self.seen[order[workers - 1]])


def _is_marker(name: str) -> bool:
    from schemas.manifest import SHARD_FILE, SHARD_SUFFIX

    return bool((match := SHARD_FILE.match(name)) and match["suffix"] == SHARD_SUFFIX["stats"])


def _markers(out: Path) -> Path:
    """The folder of a shard directory's completion markers."""
    from schemas.manifest import SHARD_DIR

    return out / SHARD_DIR["stats"]


def shard_images(out: Path) -> dict[str, int]:
    """Inputs per finished shard (from the markers), by marker file name."""
    return {p.name: json.loads(p.read_text())["count"] for p in _markers(out).iterdir() if _is_marker(p.name)}


def segment_cub(out: Path, root: Path = CUB_MINI, masks_per_image: int = 8, crop_size: int | None = None,
                workers: int = 2, passes: int = 1):
    """Segment the CUB photos under ``root`` into ``out`` (superpixel, local Ray); the dataset card.
    ``passes`` > 1 lists every photo that many times (a ``listing`` source beside ``out``)."""
    from pipeline.job import run_segment
    from schemas.config import SegmentConfig

    source = {"source": "cub"}
    if passes > 1:
        out.parent.mkdir(parents=True, exist_ok=True)
        source = {"source": "listing", "listing": write_listing(root, out.parent, passes)[1]}
    config = SegmentConfig(**source, root=root, out=out, masks_per_image=masks_per_image,
                           crop_size=crop_size, shard_size=16, num_workers=workers, cpus_per_worker=1)
    with local_ray(workers):
        return run_segment(config, progress=False)


@dataclass
class ReferenceSample:
    """One image in the reference layout (spec §4.3/§4.5)."""

    original: Path  # the original image file
    masks: list[Path]  # mask_<i>.png, largest first
    boxes: list[list[int]]  # inclusive [x_min, y_min, x_max, y_max] in original pixels
    label: int


def write_reference(shards: Path, root: Path, out: Path) -> list[ReferenceSample]:
    """The reference's files for the masks stored in ``shards`` (spec §4.1 step 5, §4.3): per image and
    mask, ``out/<class>/<stem>/mask_<i>.png`` = ``cv2.bitwise_and(img, img, mask)`` (the image's pixels
    inside the mask, 0 outside) at the original resolution as an RGB PNG (Pillow's default level 6,
    smaller than OpenCV's default level 1), the original image file where it is (``samples/`` in the
    reference), and ``segmentation_info.json`` with the boxes. Masks are not duplicated up to the
    largest mask count of the split (``balance_masks``, §4.4) and not copied into split folders
    (``split_dataset``, §4.3), both of which the reference does: its real layout is larger than this."""
    from pipeline.masks import decode_masks, mask_boxes
    from pipeline.shards import iter_samples
    from schemas.manifest import shard_glob
    from schemas.shard import MASKS_MEMBER

    samples, info = [], {}
    for tar in sorted(shards.glob(shard_glob(part="tar"))):
        for key, members in iter_samples(tar):
            record = json.loads(members["json"])
            source = root / record["source_path"]
            with Image.open(source) as im:
                image = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
            masks = decode_masks(members[MASKS_MEMBER], record["width"])
            if masks.shape[1:] != image.shape[:2]:  # the shard's image was downscaled (max_side)
                h, w = image.shape[:2]
                masks = masks[:, (np.arange(h) * masks.shape[1] // h)[:, None], np.arange(w) * masks.shape[2] // w]
            folder = out / Path(record["source_path"]).parent.name / Path(record["source_path"]).stem
            folder.mkdir(parents=True, exist_ok=True)
            paths = []
            for i, mask in enumerate(masks):
                paths.append(folder / f"mask_{i}.png")
                Image.fromarray(image * mask[..., None]).save(paths[-1], format="PNG")
            boxes = mask_boxes(masks).tolist()
            samples.append(ReferenceSample(source, paths, boxes, int(record["label"])))
            info[key] = {"masks": {i: p.name for i, p in enumerate(paths)}, "bounding_boxes": dict(enumerate(boxes)),
                         "size": {i: float(m.mean()) for i, m in enumerate(masks)}}
    (out / "segmentation_info.json").write_text(json.dumps({"superpixel": info}))
    return samples


def newest_checkpoint(run_dir: Path) -> Path:
    """The checkpoint file in a run's newest ``checkpoint_<date>_<time>`` folder (Ray Train's names sort by time)."""
    from training.loop import CHECKPOINT  # imports torch: only the benchmarks that read runs pay for it

    found = sorted(run_dir.glob(f"checkpoint_*/{CHECKPOINT}"), key=lambda p: p.parent.name)
    if not found:
        raise SystemExit(f"{run_dir}: no checkpoint_*/{CHECKPOINT} (not a run directory of protomask train?)")
    return found[-1]


def tree_bytes(folder: Path) -> int:
    """Bytes of every file under ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())

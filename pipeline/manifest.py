"""The dataset manifest: build it from finished shards, inspect it, verify shards against it."""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.shards import ShardError, TarScan, iter_samples, scan_tar
from schemas.manifest import FLAT_MANIFEST, MANIFEST, DatasetCard, SegmenterInfo, ShardStats
from schemas.shard import MASKS_MEMBER, OBJECT_MEMBER, PARTS_MEMBER, SampleRecord, crop_member
from schemas.storage import Location, put, read_bytes, size
from schemas.version import CODE_VERSION

SCAN_THREADS = 4  # shards hashed at once by shard_problems (on S3 each also reads ahead: storage.open_read)


def read_rows(out: Location | Path, shards: list[ShardStats]) -> pa.Table:
    """All per-shard parquet rows of a shard directory."""
    out = Location.parse(out)
    return pa.concat_tables([pq.read_table((out / s.file("parquet")).fs_path, filesystem=out.fs) for s in shards])


def build_card(
    out: Location | Path, shards: list[ShardStats], classes: list[str], source: str, config_hash: str,
    masks_per_image: int, crop_size: int | None, segmenter: SegmenterInfo, shuffle_seed: int, *,
    max_box_fraction: float = 1.0,
) -> DatasetCard:
    """Aggregate the finished shards into a DatasetCard and write ``_manifest.json`` (``storage.put``: whole or
    not at all)."""
    out = Location.parse(out)
    rows = read_rows(out, shards).to_pylist()
    per_split: dict[str, Counter] = defaultdict(Counter)
    per_class: dict[str, Counter] = {c: Counter() for c in classes}
    hist: Counter = Counter()
    for r in rows:
        per_split[r["split"]][r["status"] if r["status"] == "ok" else "failed"] += 1
        if r["status"] == "ok":
            per_class[r["class_name"]][r["split"]] += 1
            hist[r["n_masks"]] += 1
    ok = sum(s.ok for s in shards)
    card = DatasetCard(
        code_version=CODE_VERSION,
        config_hash=config_hash,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        source=source,
        shuffle_seed=shuffle_seed,
        classes=classes,
        masks_per_image=masks_per_image,
        max_box_fraction=max_box_fraction,
        crop_size=crop_size,
        segmenter=segmenter,
        shards=shards,
        counts={"inputs": len(rows), "ok": ok, "failed": len(rows) - ok},
        per_split={k: {"ok": v["ok"], "failed": v["failed"]} for k, v in sorted(per_split.items())},
        per_class={k: dict(sorted(v.items())) for k, v in per_class.items()},
        masks_hist=dict(sorted(hist.items())),
        total_bytes=sum(s.tar_bytes for s in shards),
    )
    put(out / MANIFEST, card.model_dump_json(indent=1))
    return card


def load_card(out: Location | Path) -> DatasetCard:
    """The ``_manifest.json`` of a shard directory (``manifest.json`` in formats 3-5); ``ShardError`` naming it
    when missing or invalid."""
    out = Location.parse(out)
    path = out / MANIFEST
    try:
        data = read_bytes(path)
    except (FileNotFoundError, IsADirectoryError):
        try:
            path = out / FLAT_MANIFEST
            data = read_bytes(path)
        except (FileNotFoundError, IsADirectoryError):
            raise ShardError(f"{out / MANIFEST}: no manifest (is {out} a finished shard directory?)") from None
    except OSError as exc:
        raise ShardError(f"{path}: cannot read the manifest: {exc}") from exc
    try:
        return DatasetCard.model_validate_json(data)
    except ValueError as exc:
        raise ShardError(f"{path}: invalid manifest: {exc}") from exc


def inspect(out: Location | Path) -> dict:
    """A summary of a shard directory (what ``protomask manifest inspect`` prints)."""
    out = Location.parse(out)
    card = load_card(out)
    failures = Counter(
        r["error_message"] for r in read_rows(out, card.shards).to_pylist() if r["status"] != "ok"
    )
    return {
        "directory": str(out),
        "format_version": card.format_version,
        "code_version": card.code_version,
        "config_hash": card.config_hash,
        "source": card.source,
        "shuffle_seed": card.shuffle_seed,
        "segmenter": card.segmenter.model_dump(),
        "masks_per_image": card.masks_per_image,
        "max_box_fraction": card.max_box_fraction,
        "crop_size": card.crop_size,
        "shards": len(card.shards),
        "samples": card.counts,
        "per_split": card.per_split,
        "per_class": card.per_class,
        "masks_hist": card.masks_hist,
        "bytes": card.total_bytes,
        "errors": dict(failures.most_common(10)),
    }


def format_inspect(summary: dict) -> str:
    s = summary
    crops = f"{s['crop_size']}px crops stored" if s["crop_size"] else "crops cut at read time"
    if s["max_box_fraction"] < 1:
        crops = f"boxes up to {s['max_box_fraction']:.0%} of the image  {crops}"
    lines = [
        f"{s['directory']}  (format {s['format_version']}, protomask {s['code_version']}, config {s['config_hash']})",
        f"source      {s['source']}" + ("" if s["shuffle_seed"] is None else f"   shuffle seed {s['shuffle_seed']}"),
        f"segmenter   {s['segmenter']['name']}  {json.dumps(s['segmenter']['params'], sort_keys=True)}",
        f"checkpoint  sha256 {s['segmenter']['checkpoint_sha256'] or '-'}",
        f"shards      {s['shards']}   bytes {s['bytes']:,}   K={s['masks_per_image']}  {crops}",
        f"samples     {s['samples']['ok']} ok, {s['samples']['failed']} failed, {s['samples']['inputs']} inputs",
        "",
        f"{'split':<10}{'ok':>8}{'failed':>8}",
    ]
    lines += [f"{k:<10}{v['ok']:>8}{v['failed']:>8}" for k, v in s["per_split"].items()]
    splits = sorted(s["per_split"])
    width = max([5] + [len(c) for c in s["per_class"]]) + 2
    lines += ["", f"{'class':<{width}}" + "".join(f"{sp:>8}" for sp in splits)]
    lines += [f"{c:<{width}}" + "".join(f"{v.get(sp, 0):>8}" for sp in splits) for c, v in s["per_class"].items()]
    top = max(s["masks_hist"].values(), default=1)
    lines += ["", "masks per image"]
    lines += [f"{int(n):>4} {'#' * max(1, round(30 * c / top))} {c}" for n, c in s["masks_hist"].items()]
    if s["errors"]:
        lines += ["", "errors (most common)"] + [f"{c:>6}  {m}" for m, c in s["errors"].items()]
    return "\n".join(lines)


def _check_sample(key: str, members: dict[str, bytes]) -> str | None:
    try:
        record = SampleRecord.model_validate_json(members["json"])
    except (KeyError, ValueError) as exc:
        return f"sample {key}: bad json member ({exc})"
    expected = {"jpg", "json", MASKS_MEMBER}
    if record.crop_size is not None:
        expected |= {crop_member(i) for i in range(record.n_masks)}
    if record.part_names is not None:
        expected.add(PARTS_MEMBER)
    if record.has_object:
        expected.add(OBJECT_MEMBER)
    if set(members) != expected:
        return f"sample {key}: members {sorted(members)} differ from {sorted(expected)}"
    return None


def _checksum_differs(stats: ShardStats, tar: Location) -> str:
    return f"shard {stats.name}: {tar} checksum differs from the manifest (corrupt or replaced)"


def _scan(tar: Location) -> TarScan | ShardError:
    try:
        return scan_tar(tar)
    except ShardError as exc:
        return exc


def shard_problems(out: Location | Path, card: DatasetCard) -> list[str]:
    """The quick check before training: one line per shard whose tar differs from the manifest in
    sha256 or in sample and member counts. One read of every tar (``scan_tar``: hashing plus a walk
    over the tar headers), ``SCAN_THREADS`` at a time; ``verify`` is the full check."""
    out = Location.parse(out)
    tars = [out / stats.file("tar") for stats in card.shards]
    with ThreadPoolExecutor(SCAN_THREADS, thread_name_prefix="shard-scan") as pool:
        scans = list(pool.map(_scan, tars))
    problems = []
    for stats, tar, scan in zip(card.shards, tars, scans):
        if isinstance(scan, ShardError):
            problems.append(f"shard {stats.name}: {scan}")
        elif scan.sha256 != stats.tar_sha256:
            problems.append(_checksum_differs(stats, tar))
        elif (scan.samples, scan.members) != (stats.ok, stats.tar_members):
            problems.append(f"shard {stats.name}: {tar} holds {scan.samples} samples / {scan.members} members, "
                            f"the manifest says {stats.ok} / {stats.tar_members}")
    return problems


def _tar_problems(stats: ShardStats, tar: Location) -> list[str]:
    """What is wrong with one shard's tar, from one read of it: checksum, then samples, then counts."""
    digest, problems = hashlib.sha256(), []
    members = samples = 0
    try:
        for key, sample in iter_samples(tar, digest):
            samples += 1
            members += len(sample)
            if (issue := _check_sample(key, sample)) is not None:
                problems.append(f"shard {stats.name}: {issue}")
    except ShardError as exc:  # the checksum is unknown: the tar was not read to its end
        return [*problems, f"shard {stats.name}: {exc}"]
    if digest.hexdigest() != stats.tar_sha256:
        problems.insert(0, _checksum_differs(stats, tar))
    if members != stats.tar_members or samples != stats.ok:
        problems.append(f"shard {stats.name}: {samples} samples / {members} members, manifest says "
                        f"{stats.ok} / {stats.tar_members}")
    return problems


def verify(out: Location | Path) -> list[str]:
    """Check every shard against the manifest; return one problem per line (empty: all good)."""
    out = Location.parse(out)
    try:
        card = load_card(out)
    except ShardError as exc:
        return [str(exc)]
    problems = []
    for stats in card.shards:
        tar, parquet = out / stats.file("tar"), out / stats.file("parquet")
        if size(tar) is None:
            problems.append(f"shard {stats.name}: {tar} is missing")
            continue
        problems += _tar_problems(stats, tar)
        try:
            data = read_bytes(parquet)
        except (FileNotFoundError, IsADirectoryError):
            problems.append(f"shard {stats.name}: {parquet} is missing")
            continue
        if hashlib.sha256(data).hexdigest() != stats.parquet_sha256:
            problems.append(f"shard {stats.name}: {parquet} checksum differs from the manifest")
        elif pq.read_metadata(pa.BufferReader(data)).num_rows != stats.count:
            problems.append(f"shard {stats.name}: {parquet} has a different row count than the manifest")
    return problems

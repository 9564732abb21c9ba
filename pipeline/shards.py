"""Write and read shards. Writes are whole or not at all (``storage.put``: temp name and rename locally, one
request on S3) and byte-reproducible (fixed mtime/owner/mode, sorted members, deterministic encoders); the stats
marker comes last."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.masks import MaskSet, crop_boxes, encode_masks
from schemas.manifest import ROW_SCHEMA, SHARD_DIR, ShardStats, shard_file, shard_stem
from schemas.shard import MASKS_MEMBER, OBJECT_MEMBER, PARTS_MEMBER, SampleRecord, crop_member
from schemas.storage import Location, makedirs, open_read, put, read_bytes, size

TAR_MTIME = 946684800  # 2000-01-01: a constant so reruns give identical bytes


class ShardError(ValueError):
    """A shard that is missing, unreadable or disagrees with its manifest; the message names it."""


@dataclass
class EncodedSample:
    key: str
    members: dict[str, bytes]  # extension -> bytes


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def encode_sample(
    record: SampleRecord,
    image: np.ndarray,
    mask_set: MaskSet,
    parts: np.ndarray | None,
    jpeg_quality: int,
    image_jpeg: bytes | None = None,
    *,
    object_mask: np.ndarray | None = None,
) -> EncodedSample:
    """All members of one sample (format: schemas/shard.py). ``image_jpeg``: the input file's own bytes,
    stored instead of re-encoding ``image`` (see ``LoadedImage.jpeg``). Crop members are written when
    ``record.crop_size`` is set; ``object_mask`` (uint8 HxW, 255 = object) goes with ``record.has_object``."""
    if record.has_object != (object_mask is not None):
        raise ValueError(f"sample {record.key}: has_object is {record.has_object} but the object mask is "
                         f"{'given' if object_mask is not None else 'missing'}")
    members = {
        "jpg": image_jpeg if image_jpeg is not None else _jpeg(Image.fromarray(image), jpeg_quality),
        "json": json.dumps(record.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode(),
        MASKS_MEMBER: encode_masks(mask_set.masks),
    }
    if record.crop_size is not None:
        for i, crop in enumerate(crop_boxes(image, record.boxes, record.crop_size)):
            members[crop_member(i)] = _jpeg(Image.fromarray(crop), jpeg_quality)
    if parts is not None:
        members[PARTS_MEMBER] = _png(parts)
    if object_mask is not None:
        members[OBJECT_MEMBER] = _png(object_mask)
    return EncodedSample(key=record.key, members=members)


@dataclass
class TarScan:
    sha256: str
    members: int
    samples: int


def _plain_member(tar_path: Location, name: str, regular: bool) -> str:
    """The member's name; ``ShardError`` unless it is a plain ``key.ext`` regular file (no traversal)."""
    if not regular or "/" in name or "\\" in name or name.startswith(".") or "." not in name:
        raise ShardError(f"{tar_path}: unexpected member {name!r} (only plain 'key.ext' files allowed)")
    return name


def _members(f: BinaryIO, tar_path: Location, digest: Any = None) -> Iterator[tuple[str, bytes]]:
    """(name, data) of every member of the USTAR tar read forward from ``f`` (what ``_write_tar`` writes; anything
    else is refused), up to the end-of-archive marker, two zero blocks. ``digest`` (a hashlib object) is fed every
    byte of the file, through to its end. Raises ``ShardError`` naming ``tar_path``: a truncated or odd tar, or a
    member that is not a plain ``key.ext`` file."""
    block, offset = tarfile.BLOCKSIZE, 0

    def read(n: int) -> bytes:
        nonlocal offset
        data = f.read(n)
        if digest is not None:
            digest.update(data)
        offset += len(data)
        return data

    while True:
        at = offset
        header = read(block)
        if header == tarfile.NUL * block and read(block) == tarfile.NUL * block:
            break
        if len(header) < block or header == tarfile.NUL * block:  # cut in a header, or after one zero block
            raise ShardError(f"{tar_path}: unreadable tar: no end-of-archive marker at byte {at} (truncated)")
        if header[257:265] != tarfile.POSIX_MAGIC:
            raise ShardError(f"{tar_path}: unreadable tar: not a USTAR header at byte {at}")
        try:
            name = header[:100].split(b"\0", 1)[0].decode()
            if prefix := header[345:500].split(b"\0", 1)[0]:  # USTAR long names: a path, never ours
                name = f"{prefix.decode()}/{name}"
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        except (UnicodeDecodeError, ValueError) as exc:
            raise ShardError(f"{tar_path}: unreadable tar: bad header at byte {at}: {exc}") from exc
        _plain_member(tar_path, name, header[156:157] in (b"0", b"\0"))
        data = read(size)
        if len(data) < size or len(read(-size % block)) < -size % block:
            raise ShardError(f"{tar_path}: unreadable tar: member {name!r} runs past the end")
        yield name, data
    if digest is not None:
        while read(1 << 20):  # the zero padding after the marker
            pass


def scan_tar(tar_path: Location | Path) -> TarScan:
    """One read of a shard: its sha256 and its member and sample counts.

    Walks the USTAR headers as ``iter_samples`` does, refusing what it refuses (``ShardError``), so it costs
    little more than hashing the file."""
    tar_path = Location.parse(tar_path)
    members, keys, digest = 0, set(), hashlib.sha256()
    try:
        with open_read(tar_path) as f:
            for name, _ in _members(f, tar_path, digest):
                members += 1
                keys.add(name.split(".", 1)[0])
    except OSError as exc:
        raise ShardError(f"{tar_path}: unreadable tar: {exc}") from exc
    return TarScan(sha256=digest.hexdigest(), members=members, samples=len(keys))


def _write_tar(f, samples: list[EncodedSample]) -> None:
    with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in sorted(samples, key=lambda s: s.key):
            for ext in sorted(sample.members):
                data = sample.members[ext]
                info = tarfile.TarInfo(f"{sample.key}.{ext}")
                info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o444
                info.uid = info.gid = 0
                info.uname = info.gname = "protomask"
                tar.addfile(info, io.BytesIO(data))


def _in_memory(write: Callable[[BinaryIO], None]) -> bytes:
    """What ``write`` writes to a binary file."""
    buffer = io.BytesIO()
    write(buffer)
    return buffer.getvalue()


def write_shard(
    out: Location | Path, shard: int, samples: list[EncodedSample], rows: list[dict], config_hash: str,
    duration_s: float,
) -> ShardStats:
    """Write ``_webdataset/<split>-<shard>.tar`` and ``<split>-<shard>.parquet``, then the marker
    ``_job/<split>-<shard>_stats.json`` (names: ``schemas.manifest.shard_file``), each whole or not at all
    (``storage.put``: one request on S3). Both files are built in memory first, so their sizes and checksums
    come from the bytes written. The split is the rows' own: a shard never holds two splits."""
    splits = sorted({str(r["split"]) for r in rows})
    if len(splits) != 1:
        raise ValueError(f"shard {shard}: its rows must all have one split, got {splits or 'no rows'}")
    out, split = Location.parse(out), splits[0]
    table = pa.Table.from_pylist(sorted(rows, key=lambda r: r["key"]), schema=ROW_SCHEMA)
    tar_bytes = _in_memory(lambda f: _write_tar(f, samples))
    parquet_bytes = _in_memory(lambda f: pq.write_table(table, f, compression="zstd"))
    for part in ("tar", "stats"):
        makedirs(out / SHARD_DIR[part])
    put(out / shard_file(split, shard, "tar"), tar_bytes)
    put(out / shard_file(split, shard, "parquet"), parquet_bytes)
    ok = sum(r["status"] == "ok" for r in rows)
    stats = ShardStats(
        shard=shard,
        name=shard_stem(split, shard),
        split=split,
        count=len(rows),
        ok=ok,
        failed=len(rows) - ok,
        tar_members=sum(len(s.members) for s in samples),
        tar_bytes=len(tar_bytes),
        tar_sha256=hashlib.sha256(tar_bytes).hexdigest(),
        parquet_sha256=hashlib.sha256(parquet_bytes).hexdigest(),
        duration_s=round(duration_s, 3),
        config_hash=config_hash,
    )
    put(out / stats.file("stats"), json.dumps(stats.model_dump(), indent=1).encode())
    return stats


def read_stats(out: Location | Path, split: str, shard: int) -> ShardStats | None:
    """The completion marker of a shard, or None when the shard is unfinished: no marker, a damaged one, or a tar
    whose size is not the marker's (one GET and one HEAD on S3)."""
    out = Location.parse(out)
    try:
        stats = ShardStats.model_validate_json(read_bytes(out / shard_file(split, shard, "stats")))
    except (FileNotFoundError, IsADirectoryError, ValueError):  # none, or a damaged one: the shard is redone
        return None
    return stats if size(out / stats.file("tar")) == stats.tar_bytes else None


def iter_samples(tar_path: Location | Path, digest: Any = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {extension: bytes}) per sample, reading the tar once, forward (on S3 with read-ahead); refuse
    member names that are not plain ``key.ext`` and a tar cut short (``ShardError`` naming it). ``digest``: a
    hashlib object fed the whole file, complete once the iterator is exhausted."""
    tar_path = Location.parse(tar_path)
    current: str | None = None
    members: dict[str, bytes] = {}
    try:
        with open_read(tar_path) as f:
            for name, data in _members(f, tar_path, digest):
                key, ext = name.split(".", 1)
                if key != current:
                    if current is not None:
                        yield current, members
                    current, members = key, {}
                members[ext] = data
    except OSError as exc:
        raise ShardError(f"{tar_path}: unreadable tar: {exc}") from exc
    if current is not None:
        yield current, members

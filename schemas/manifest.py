"""Manifests of a shard directory.

Files in a shard directory (format 6). Its top level holds only the per-shard parquet files, so the folder
is one parquet dataset with one row per input for ``pyarrow.dataset``, pandas, duckdb and Ray Data; every
other file sits under a ``_``-prefixed name, which those readers skip (the Hadoop convention of
``_metadata``). Every shard holds one split, and its files are named by it, so a glob such as
``_webdataset/train-*.tar`` picks one split::

    train-00000.parquet              one row per input of the shard, failures included (ROW_SCHEMA)
    ...                              shard numbers are global: train shards first, then val, then test
    test-00004.parquet
    _manifest.json                   DatasetCard, written when every shard is finished
    _webdataset/train-00000.tar      WebDataset shard (see schemas.shard); the folder holds tars only
    _job/train-00000_stats.json      ShardStats; written last: its presence marks the shard finished
    _job/segment_config.yaml         the resolved SegmentConfig
    _job/plan.parquet                the work plan (PLAN_SCHEMA): which input goes to which key and shard
    _job/job.json                    the job hash that guards the directory against a different config

``shard_file`` makes these names and ``SHARD_FILE`` / ``SHARD_TMP`` recognise their last part: every reader
and writer goes through them. Earlier formats kept every file at the top (``manifest.json``,
``train-00000.tar``, ...; ``FOLDER_LAYOUT_FROM``) and still read: ``ShardStats.file`` names a shard's files
by the format that wrote it. Format 3 directories named shards ``00000.tar`` (no split); their ShardStats
have no ``split``, and ``shard_file`` gives their names for ``split=None``.
"""

from __future__ import annotations

import re
from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from schemas.version import FORMAT_VERSION

JOB_DIR = "_job"  # "_": skipped by pyarrow.dataset, pandas and Ray Data; a folder: not matched by a *.parquet glob
WEBDATASET_DIR = "_webdataset"
MANIFEST = "_manifest.json"
FLAT_MANIFEST = "manifest.json"  # where formats 3-5 kept the DatasetCard
FLAT_CONFIG_FILE = "segment_config.yaml"  # and the SegmentConfig
FOLDER_LAYOUT_FROM = 6  # the first format with a shard's tar and marker in folders (SHARD_DIR)
CONFIG_FILE = f"{JOB_DIR}/segment_config.yaml"
PLAN_FILE = f"{JOB_DIR}/plan.parquet"
JOB_FILE = f"{JOB_DIR}/job.json"
SPLITS = ("train", "val", "test")  # also the order of the splits' shards in a plan
SHARD_DIGITS = 5  # of the shard number, in file names and at the start of every key
ShardPart = Literal["tar", "parquet", "stats"]
SHARD_SUFFIX: dict[str, str] = {"tar": ".tar", "parquet": ".parquet", "stats": "_stats.json"}
SHARD_DIR: dict[str, str] = {"tar": WEBDATASET_DIR, "parquet": "", "stats": JOB_DIR}  # "": the top level

_SHARD = (rf"(?:(?P<split>{'|'.join(SPLITS)})-)?(?P<shard>\d{{{SHARD_DIGITS}}})"
          rf"(?P<suffix>{'|'.join(re.escape(s) for s in SHARD_SUFFIX.values())})")
SHARD_FILE = re.compile(rf"^{_SHARD}$")  # a shard file's name: train-00000.tar, test-00003_stats.json, 00000.tar
SHARD_TMP = re.compile(rf"^\.{_SHARD}\..+\.tmp$")  # its temp name while written (pipeline.shards), a write cut short


def shard_stem(split: str | None, shard: int) -> str:
    """``'train-00000'``: the shard's name in messages and the stem of its files (``'00000'``: format 3)."""
    number = f"{shard:0{SHARD_DIGITS}d}"
    if split is None:
        return number
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {list(SPLITS)}")
    return f"{split}-{number}"


def shard_file(split: str | None, shard: int, part: ShardPart, *, flat: bool = False) -> str:
    """The path of one part of a shard, relative to the shard directory:
    ``shard_file("train", 0, "tar") == "_webdataset/train-00000.tar"``; ``flat``: at the top, as formats 3-5
    kept it."""
    name = shard_stem(split, shard) + SHARD_SUFFIX[part]
    return name if flat else _in_folder(part, name)


def shard_glob(split: str | None = None, part: ShardPart = "tar") -> str:
    """A glob of one part of every shard of ``split`` (``None``: of every split), relative to the shard
    directory: ``'_webdataset/train-[0-9]...[0-9].tar'``."""
    return _in_folder(part, f"{split or '*'}-{'[0-9]' * SHARD_DIGITS}{SHARD_SUFFIX[part]}")


def _in_folder(part: ShardPart, name: str) -> str:
    """``name`` inside the folder of ``part`` (``SHARD_DIR``), relative to the shard directory."""
    return f"{SHARD_DIR[part]}/{name}" if SHARD_DIR[part] else name


# the fields every input has from the plan on
INPUT_FIELDS = [
    ("key", pa.string()),
    ("shard", pa.int32()),
    ("source_path", pa.string()),
    ("label", pa.int32()),
    ("class_name", pa.string()),
    ("split", pa.string()),
]

ROW_SCHEMA = pa.schema(
    [
        *INPUT_FIELDS,
        ("status", pa.string()),  # "ok" | "error"
        ("error_message", pa.string()),  # null when ok
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("n_masks", pa.int32()),
        ("sample_bytes", pa.int64()),  # bytes of this sample's tar members (0 on error)
    ],
    metadata={"format_version": FORMAT_VERSION},
)

PLAN_SCHEMA = pa.schema(
    [
        *INPUT_FIELDS,
        ("parts_path", pa.string()),  # optional ground-truth part label map (relative to root)
        ("object_path", pa.string()),  # optional ground-truth object mask image (relative to root)
        ("extra", pa.string()),  # JSON of source metadata
    ],
    metadata={"format_version": FORMAT_VERSION},
)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ShardStats(Strict):
    """``_job/<split>-<shard:05d>_stats.json``: the completion marker of one shard."""

    shard: int
    name: str = Field(description="'train-00000': shard_stem(split, shard), the stem of the shard's files")
    split: str | None = Field(None, description="the split of every input of the shard (null in format 3, "
                              "whose shards mixed splits)")
    count: int = Field(description="inputs planned into the shard")
    ok: int
    failed: int
    tar_members: int
    tar_bytes: int
    tar_sha256: str
    parquet_sha256: str
    duration_s: float
    config_hash: str
    format_version: str = FORMAT_VERSION

    def file(self, part: ShardPart) -> str:
        """The path of one part of this shard in its directory (``shard_file``), in the layout of the format
        that wrote it."""
        return shard_file(self.split, self.shard, part, flat=int(self.format_version) < FOLDER_LAYOUT_FROM)


class SegmenterInfo(Strict):
    name: str
    params: dict
    checkpoint_sha256: str | None = None


class DatasetCard(Strict):
    """``_manifest.json``: what a training job needs to know about a shard directory without opening a tar."""

    format_version: str = FORMAT_VERSION
    code_version: str
    config_hash: str
    created: str
    source: str
    shuffle_seed: int | None = Field(None, description="seed of the permutation that assigned inputs to shards "
                                     "(SegmentConfig.shuffle_seed; null in format 3, whose shards follow the listing)")
    classes: list[str]
    masks_per_image: int
    max_box_fraction: float = Field(1.0, description=(
        "masks whose box covers more of the image were dropped (SegmentConfig.max_box_fraction); 1: none"))
    crop_size: int | None = Field(description="size of the stored crop members; null: none stored")
    segmenter: SegmenterInfo
    shards: list[ShardStats]
    counts: dict[str, int] = Field(description="inputs, ok, failed")
    per_split: dict[str, dict[str, int]] = Field(description="split -> {ok, failed}")
    per_class: dict[str, dict[str, int]] = Field(description="class name -> {split: ok samples}")
    masks_hist: dict[int, int] = Field(description="n_masks -> number of ok samples")
    total_bytes: int

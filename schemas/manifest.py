"""Manifests of a shard directory.

Files in a shard directory::

    00000.tar            WebDataset shard (see schemas.shard)
    00000.parquet        one row per input of the shard, failures included (ROW_SCHEMA)
    00000_stats.json     ShardStats; written last: its presence marks the shard finished
    manifest.json        DatasetCard, written when every shard is finished
    segment_config.yaml  the resolved SegmentConfig
    plan.parquet         the work plan (PLAN_SCHEMA): which input goes to which key and shard
"""

from __future__ import annotations

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from schemas.version import FORMAT_VERSION

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
        ("extra", pa.string()),  # JSON of source metadata
    ],
    metadata={"format_version": FORMAT_VERSION},
)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ShardStats(Strict):
    """``{shard:05d}_stats.json``: the completion marker of one shard."""

    shard: int
    name: str = Field(description="'00000'")
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


class SegmenterInfo(Strict):
    name: str
    params: dict
    checkpoint_sha256: str | None = None


class DatasetCard(Strict):
    """``manifest.json``: what a training job needs to know about a shard directory without opening a tar."""

    format_version: str = FORMAT_VERSION
    code_version: str
    config_hash: str
    created: str
    source: str
    classes: list[str]
    masks_per_image: int
    crop_size: int | None = Field(description="size of the stored crop members; null: none stored")
    segmenter: SegmenterInfo
    shards: list[ShardStats]
    counts: dict[str, int] = Field(description="inputs, ok, failed")
    per_split: dict[str, dict[str, int]] = Field(description="split -> {ok, failed}")
    per_class: dict[str, dict[str, int]] = Field(description="class name -> {split: ok samples}")
    masks_hist: dict[int, int] = Field(description="n_masks -> number of ok samples")
    total_bytes: int

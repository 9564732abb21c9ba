"""The work plan: every input gets a key and a shard, positionally, so reruns find the same shards."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.sources import SourceListing
from schemas.config import stable_hash
from schemas.manifest import PLAN_SCHEMA

SHARD_DIGITS = 5


def shard_name(shard: int) -> str:
    return f"{shard:0{SHARD_DIGITS}d}"


def make_plan(listing: SourceListing, shard_size: int) -> pa.Table:
    """Key = 5 shard digits + the index inside the shard (img2dataset style: digits only, sortable)."""
    index_digits = len(str(shard_size - 1))
    rows = []
    for position, item in enumerate(listing.items):
        shard, index = divmod(position, shard_size)
        rows.append(
            {
                "key": f"{shard_name(shard)}{index:0{index_digits}d}",
                "shard": shard,
                "source_path": item.path,
                "label": item.label,
                "class_name": item.class_name,
                "split": item.split,
                "parts_path": item.parts_path,
                "extra": json.dumps(item.extra, sort_keys=True),
            }
        )
    return pa.Table.from_pylist(rows, schema=PLAN_SCHEMA)


def plan_hash(plan: pa.Table, classes: list[str]) -> str:
    return stable_hash({"classes": classes, "rows": plan.to_pydict()})


def write_plan(plan: pa.Table, classes: list[str], path: Path) -> None:
    schema = plan.schema.with_metadata({**plan.schema.metadata, b"classes": json.dumps(classes).encode()})
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(plan.cast(schema), tmp)
    tmp.replace(path)


def read_plan(path: Path) -> tuple[pa.Table, list[str]]:
    table = pq.read_table(path)
    return table, json.loads(table.schema.metadata[b"classes"])

"""The work plan: every input gets a split, a shard and a key, deterministically, so reruns find the
same shards.

Inputs that carry no split (imagefolder without split folders, listing rows without one) get one
first: per class a seeded, stratified share goes to test (``assign_splits``). Then each split's inputs
are put in a seeded random order and cut into that split's own shards, so shards mix classes even when
the listing is sorted by class (real CUB listings are), and no shard holds two splits. Shard numbers
are global and consecutive, train shards first, then val, then test (``schemas.manifest.SPLITS``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.sources import SourceItem, SourceListing
from schemas.config import stable_hash
from schemas.manifest import PLAN_SCHEMA, SHARD_DIGITS, SPLITS
from schemas.storage import Location, put

log = logging.getLogger("protomask.segment")


def assign_splits(items: list[SourceItem], test_fraction: float, seed: int) -> tuple[list[SourceItem], int, int]:
    """Give every item without a split one: per class ``round(n_c * test_fraction)`` of them to "test"
    (at least 1 when the class has >= 2 such items, never its last one), drawn by
    ``numpy.random.default_rng(seed)``, the rest to "train". Items with a split are kept as they are.
    Returns (items, how many had no split, how many of those went to test)."""
    unsplit: dict[int, list[int]] = defaultdict(list)  # label -> positions in items, in listing order
    for position, item in enumerate(items):
        if item.split is None:
            unsplit[item.label].append(position)
    if not unsplit:
        return list(items), 0, 0
    rng = np.random.default_rng(seed)
    to_test: set[int] = set()
    for label in sorted(unsplit):
        positions = unsplit[label]
        n = round(len(positions) * test_fraction)
        if len(positions) >= 2:
            n = max(n, 1)
        n = min(n, len(positions) - 1)
        to_test.update(positions[i] for i in rng.permutation(len(positions))[:n].tolist())
    assigned = [
        dataclasses.replace(item, split="test" if position in to_test else "train") if item.split is None else item
        for position, item in enumerate(items)
    ]
    return assigned, sum(map(len, unsplit.values())), len(to_test)


def make_plan(listing: SourceListing, shard_size: int, seed: int, test_fraction: float) -> pa.Table:
    """One row per input, sorted by key. Key = 5 shard digits + the index inside the shard (img2dataset
    style: digits only, sortable, unique). The same listing, ``shard_size``, ``seed`` and
    ``test_fraction`` give the same plan (``seed``: ``SegmentConfig.shuffle_seed``)."""
    items, unsplit, tested = assign_splits(listing.items, test_fraction, seed)
    if unsplit:
        log.warning("%d of %d inputs carry no split: %d of them went to test (test_fraction %g per class, "
                    "shuffle_seed %d), %d to train", unsplit, len(items), tested, test_fraction, seed,
                    unsplit - tested)
    if stray := sorted({str(item.split) for item in items} - set(SPLITS)):
        raise ValueError(f"splits {stray} are not among {list(SPLITS)}")
    index_digits = len(str(shard_size - 1))
    rng = np.random.default_rng(seed)
    rows, first = [], 0  # first: number of the split's first shard
    for split in SPLITS:
        members = [item for item in items if item.split == split]
        for position, i in enumerate(rng.permutation(len(members)).tolist()):
            item = members[i]
            local, index = divmod(position, shard_size)
            shard = first + local
            rows.append(
                {
                    "key": f"{shard:0{SHARD_DIGITS}d}{index:0{index_digits}d}",
                    "shard": shard,
                    "source_path": item.path,
                    "label": item.label,
                    "class_name": item.class_name,
                    "split": item.split,
                    "parts_path": item.parts_path,
                    "object_path": item.object_path,
                    "extra": json.dumps(item.extra, sort_keys=True),
                }
            )
        first += -(-len(members) // shard_size)
    return pa.Table.from_pylist(rows, schema=PLAN_SCHEMA)


def shard_splits(plan: pa.Table) -> dict[int, str]:
    """The split of every shard of the plan, by shard number."""
    return dict(zip(plan.column("shard").to_pylist(), plan.column("split").to_pylist()))


def plan_hash(plan: pa.Table, classes: list[str]) -> str:
    """Hash of the plan (part of the job hash). A plan without any object mask hashes without its
    ``object_path`` column, as plans did before it existed, so their shard directories stay resumable."""
    if plan.column("object_path").null_count == plan.num_rows:
        plan = plan.drop_columns(["object_path"])
    return stable_hash({"classes": classes, "rows": plan.to_pydict()})


def write_plan(plan: pa.Table, classes: list[str], path: Location | Path) -> None:
    """The plan as Parquet, with the classes in its schema's metadata (``storage.put``: whole or not at all)."""
    schema = plan.schema.with_metadata({**plan.schema.metadata, b"classes": json.dumps(classes).encode()})
    put(Location.parse(path), lambda f: pq.write_table(plan.cast(schema), f))


def read_plan(path: Location | Path) -> tuple[pa.Table, list[str]]:
    """The plan and classes of ``write_plan``; a plan written before ``object_path`` existed gets it as nulls."""
    path = Location.parse(path)
    table = pq.read_table(path.fs_path, filesystem=path.fs)
    if "object_path" not in table.column_names:
        table = table.add_column(table.schema.get_field_index("extra"), "object_path",
                                 pa.nulls(table.num_rows, pa.string()))
    return table, json.loads(table.schema.metadata[b"classes"])

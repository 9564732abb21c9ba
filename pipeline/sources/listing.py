"""A listing file (CSV or Parquet, local or on S3) with columns ``path``, ``label`` and optionally ``split``;
paths are relative to the root and may not leave it. Rows without a split (no column, or an empty value) carry
``None``: the plan draws a test share from them (``SegmentConfig.test_fraction``)."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.sources.base import SourceError, SourceItem, SourceListing, inside_root
from schemas.manifest import SPLITS
from schemas.storage import Location, read_bytes


def list_items(root: Location | Path, listing: Location | Path) -> SourceListing:
    """Labels may be names or integers; classes are their sorted distinct values. The listing and the root may be
    local or on S3 (the listing is read in one request)."""
    root, listing = Location.parse(root), Location.parse(listing)
    parquet = PurePosixPath(listing.name).suffix.lower() == ".parquet"
    try:
        data = pa.BufferReader(read_bytes(listing))
        if parquet:
            table = pq.read_table(data)
        else:
            table = pacsv.read_csv(data, convert_options=pacsv.ConvertOptions(strings_can_be_null=False))
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise SourceError(f"{listing}: cannot read listing: {exc}") from exc
    missing = {"path", "label"} - set(table.column_names)
    if missing:
        raise SourceError(f"{listing}: missing column(s) {sorted(missing)}; found {table.column_names}")
    rows = table.to_pylist()
    labels = {str(r["label"]) for r in rows}
    names = sorted(labels, key=int if all(v.isdigit() for v in labels) else str)
    index = {name: i for i, name in enumerate(names)}
    items = []
    for number, row in enumerate(rows, start=1 if parquet else 2):
        where = f"{listing} row {number}"
        path, split = row["path"], row.get("split")
        split = (str(split).strip() or None) if split is not None else None
        if not isinstance(path, str) or not path:
            raise SourceError(f"{where}: empty path")
        if split is not None and split not in SPLITS:
            raise SourceError(f"{where}: split {split!r} is not one of {sorted(SPLITS)} (or empty)")
        inside_root(root, path, where)
        label = str(row["label"])
        items.append(SourceItem(path=Path(path).as_posix(), label=index[label], class_name=label, split=split))
    if not items:
        raise SourceError(f"{listing}: no rows")
    return SourceListing(classes=names, items=items)

"""The recipes of docs/format.md, run as written against a shard directory of the real job: every reader
sees one row per input, and every member decodes (masks included, the part map and object mask
single-channel)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from pipeline.job import run_segment
from schemas.config import SegmentConfig
from schemas.manifest import JOB_FILE, PLAN_FILE

FORMAT_MD = Path(__file__).resolve().parents[1] / "docs" / "format.md"
RECIPE = re.compile(r"```python\n# recipe: (?P<name>[\w-]+)\n(?P<code>.*?)```", re.S)
RECIPES = {m["name"]: m["code"] for m in RECIPE.finditer(FORMAT_MD.read_text())}
INPUTS = 2 * (4 + 2)  # classes x (train + test per class)


def test_every_reader_has_a_recipe() -> None:
    assert set(RECIPES) == {"pyarrow", "pandas", "duckdb", "ray-data", "webdataset"}


@pytest.fixture(scope="module")
def shards(ray_local, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("recipes")
    config = SegmentConfig(source="synthetic", root=tmp / "synthetic", out=tmp / "shards", masks_per_image=4,
                           shard_size=4, num_workers=2, cpus_per_worker=0.5,
                           synthetic={"num_classes": 2, "train_per_class": 4, "test_per_class": 2, "image_size": 48})
    run_segment(config, progress=False)
    assert (config.out.local / PLAN_FILE).is_file() and (config.out.local / JOB_FILE).is_file()
    return config.out.local


def run(name: str, shards: Path) -> dict:
    scope = {"SHARDS": shards}
    exec(compile(RECIPES[name], f"{FORMAT_MD}:{name}", "exec"), scope)
    return scope


@pytest.mark.ray
def test_parquet_readers_give_one_row_per_input(shards: Path) -> None:
    table = run("pyarrow", shards)["table"]
    assert table.num_rows == INPUTS and len(set(table.column("key").to_pylist())) == INPUTS
    assert sorted(run("pyarrow", shards)["ok_per_split"].to_pylist(), key=lambda r: r["split"]) == [
        {"split": "test", "key_count": 4}, {"split": "train", "key_count": 8}]
    frame = run("pandas", shards)["frame"]
    assert len(frame) == INPUTS and frame.status.notna().all()
    counts = run("duckdb", shards)["counts"]
    assert sorted(counts) == [("test", "ok", 4), ("train", "ok", 8)]


@pytest.mark.ray
def test_the_bare_folder_is_one_parquet_dataset(shards: Path) -> None:
    """The folder as it is, no glob: dataset readers skip the _-prefixed tars, markers, manifest and plan."""
    import pandas as pd
    import pyarrow.dataset as ds

    assert ds.dataset(shards, format="parquet").count_rows() == INPUTS
    assert len(pd.read_parquet(shards)) == INPUTS


@pytest.mark.ray
def test_ray_data_recipe_decodes_every_member(shards: Path) -> None:
    scope = run("ray-data", shards)
    assert scope["rows"].count() == INPUTS
    rows = scope["samples"].take_all()
    assert len(rows) == INPUTS
    for row in rows:
        record = row["json"]
        assert row["jpg"].shape == (record["height"], record["width"], 3)
        assert row["masks"].dtype == bool and row["masks"].shape == (record["n_masks"], record["height"], record["width"])
        assert row["masks"].reshape(record["n_masks"], -1).any(1).all()  # no empty mask
        assert row["parts.png"].shape == (record["height"], record["width"])  # one channel
        assert record["has_object"] and row["object.png"].shape == (record["height"], record["width"])


@pytest.mark.ray
def test_webdataset_recipe_keeps_the_label_maps_single_channel(shards: Path) -> None:
    scope = run("webdataset", shards)
    first, masks = scope["first"], scope["masks"]
    record = first["json"]
    assert first["jpg"].shape == (record["height"], record["width"], 3) and first["jpg"].dtype == np.uint8
    assert first["parts.png"].shape == (record["height"], record["width"]) and first["parts.png"].max() > 0
    assert first["object.png"].shape == (record["height"], record["width"]) and record["has_object"]
    assert np.array_equal(first["object.png"] == 255, first["parts.png"] == 1)  # the discriminative part
    assert masks.shape == (record["n_masks"], record["height"], record["width"])

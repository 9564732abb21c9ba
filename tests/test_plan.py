"""The plan: seeded shard assignment (shards mix classes, never splits), the test share drawn for inputs
without a split, and the job's refusal of a plan without a test split."""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from pipeline.job import JobError, run_segment
from pipeline.plan import assign_splits, make_plan, plan_hash, read_plan, write_plan
from pipeline.sources import SourceItem, SourceListing, list_source
from schemas.config import SegmentConfig
from schemas.manifest import PLAN_SCHEMA, SHARD_DIGITS


def _sorted_listing(classes: int = 10, per_class: int = 50) -> SourceListing:
    """Sorted by class like a real CUB listing; every fifth image of a class is test."""
    items = [SourceItem(path=f"{c:03d}/{i:03d}.jpg", label=c, class_name=f"c{c}",
                        split="test" if i % 5 == 0 else "train") for c in range(classes) for i in range(per_class)]
    return SourceListing(classes=[f"c{c}" for c in range(classes)], items=items)


def test_shards_cut_from_a_sorted_listing_mix_classes_never_splits() -> None:
    listing = _sorted_listing()
    plan = make_plan(listing, 32, seed=0, test_fraction=0.2)
    rows = plan.to_pylist()
    assert len(rows) == 500 and [r["key"] for r in rows] == sorted(r["key"] for r in rows)
    assert len({r["key"] for r in rows}) == 500 and all(r["key"].isdigit() for r in rows)
    assert all(r["key"][:SHARD_DIGITS] == f"{r['shard']:05d}" for r in rows)
    assert all(len(r["key"]) == SHARD_DIGITS + 2 for r in rows)  # index digits of 31
    split_of = {}
    for r in rows:
        assert split_of.setdefault(r["shard"], r["split"]) == r["split"]  # a shard never holds two splits
    # numbers global and consecutive: 400 train inputs -> shards 0..12, then 100 test -> 13..16
    assert split_of == {**{s: "train" for s in range(13)}, **{s: "test" for s in range(13, 17)}}
    assert Counter(r["shard"] for r in rows) == {**{s: 32 for s in range(12)}, 12: 16,
                                                 **{s: 32 for s in range(13, 16)}, 16: 4}
    assert sorted((r["source_path"], r["split"]) for r in rows) == sorted((i.path, i.split) for i in listing.items)
    # cut in listing order a shard of 32 held 1 or 2 classes; shuffled, every full shard holds most of the 10
    classes = [len({r["label"] for r in rows if r["shard"] == s}) for s in range(17) if s not in (12, 16)]
    assert min(classes) >= 7, classes

    assert make_plan(listing, 32, seed=0, test_fraction=0.2).equals(plan)  # deterministic
    other = make_plan(listing, 32, seed=1, test_fraction=0.2)
    assert not other.equals(plan)
    assert sorted(other.column("source_path").to_pylist()) == sorted(plan.column("source_path").to_pylist())
    assert other.column("split").to_pylist() == plan.column("split").to_pylist()  # same shard layout


def _small_listing() -> SourceListing:
    items = [SourceItem(path=f"{c:03d}/{i:03d}.jpg", label=c, class_name=f"c{c}",
                        split="test" if i % 5 == 0 else "train", parts_path=f"p/{c}/{i}.png" if i % 2 else None,
                        extra={"i": i}) for c in range(3) for i in range(10)]
    return SourceListing(classes=["c0", "c1", "c2"], items=items)


def test_a_plan_without_object_masks_hashes_as_before_object_path() -> None:
    """The job hash covers the plan: shard directories made before ``object_path`` existed keep their hash
    (and stay resumable) when their inputs have no object mask; object masks make another job."""
    listing = _small_listing()
    plan = make_plan(listing, 8, seed=3, test_fraction=0.2)
    assert plan.column("object_path").null_count == plan.num_rows
    assert plan_hash(plan, listing.classes) == "a683373e52463311"  # what the code before object_path gave
    with_objects = SourceListing(listing.classes, [dataclasses.replace(i, object_path=f"o/{i.path}.png")
                                                   for i in listing.items])
    plan = make_plan(with_objects, 8, seed=3, test_fraction=0.2)
    assert [r["object_path"] for r in plan.to_pylist()] == [f"o/{r['source_path']}.png" for r in plan.to_pylist()]
    assert plan_hash(plan, listing.classes) != "a683373e52463311"


def test_read_plan_gives_an_older_plan_an_empty_object_path(tmp_path: Path) -> None:
    listing = _small_listing()
    plan = make_plan(listing, 8, seed=3, test_fraction=0.2)
    write_plan(plan.drop_columns(["object_path"]), listing.classes, tmp_path / "plan.parquet")
    table, classes = read_plan(tmp_path / "plan.parquet")
    assert classes == listing.classes and table.column_names == PLAN_SCHEMA.names
    assert table.column("object_path").null_count == table.num_rows
    assert table.drop_columns(["object_path"]).equals(plan.drop_columns(["object_path"]))


def test_shuffle_seed_changes_the_config_hash(tmp_path: Path) -> None:
    base = dict(source="cub", root=tmp_path, out=tmp_path / "o")
    assert SegmentConfig(**base).shuffle_seed == 0 and SegmentConfig(**base).test_fraction == 0.2
    assert SegmentConfig(**base, shuffle_seed=1).output_hash() != SegmentConfig(**base).output_hash()
    for bad in (0, 1, -0.1):
        with pytest.raises(ValueError, match="test_fraction"):
            SegmentConfig(**base, test_fraction=bad)


def test_inputs_without_a_split_get_a_stratified_seeded_test_share(caplog: pytest.LogCaptureFixture) -> None:
    sizes = {0: 10, 1: 5, 2: 2, 3: 1}
    items = [SourceItem(path=f"{c}/{i}.png", label=c, class_name=f"c{c}", split=None)
             for c, n in sizes.items() for i in range(n)]
    items.append(SourceItem(path="kept.png", label=0, class_name="c0", split="val"))  # a split of its own: kept
    listing = SourceListing(classes=[f"c{c}" for c in sizes], items=items)
    assigned, unsplit, tested = assign_splits(items, 0.2, seed=0)
    assert (unsplit, tested) == (18, 4) and assigned[-1].split == "val"
    test = Counter(i.label for i in assigned if i.split == "test")
    # round(n * 0.2), at least 1 from a class of >= 2, never a class's last image
    assert test == {0: 2, 1: 1, 2: 1}
    assert Counter(i.split for i in assigned) == {"train": 14, "test": 4, "val": 1}
    assert [i.split for i in assign_splits(items, 0.2, seed=0)[0]] == [i.split for i in assigned]
    assert any([i.split for i in assign_splits(items, 0.2, seed=s)[0]] != [i.split for i in assigned]
               for s in (1, 2, 3))
    with caplog.at_level(logging.WARNING, logger="protomask.segment"):
        plan = make_plan(listing, 4, seed=0, test_fraction=0.2)
    assert "18 of 19 inputs carry no split: 4 of them went to test" in caplog.text
    assert Counter(plan.column("split").to_pylist()) == {"train": 14, "val": 1, "test": 4}


def _img(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), (200, 30, 30)).save(path)


def test_imagefolder_without_split_folders_gets_a_test_share(tmp_path: Path, caplog) -> None:
    for c, n in (("cat", 10), ("dog", 6)):
        for i in range(n):
            _img(tmp_path / "imgs" / c / f"{i}.png")
    config = SegmentConfig(source="imagefolder", root=tmp_path / "imgs", out=tmp_path / "o", shard_size=4,
                           test_fraction=0.25, shuffle_seed=3)
    with caplog.at_level(logging.WARNING, logger="protomask.segment"):
        rows = make_plan(list_source(config), config.shard_size, config.shuffle_seed, config.test_fraction).to_pylist()
    assert Counter((r["class_name"], r["split"]) for r in rows) == {
        ("cat", "train"): 8, ("cat", "test"): 2, ("dog", "train"): 4, ("dog", "test"): 2}  # round(2.5), round(1.5)
    assert "16 of 16 inputs carry no split: 4 of them went to test" in caplog.text


def test_listing_without_split_column_gets_a_test_share(tmp_path: Path) -> None:
    lines = ["path,label"] + [f"{c}/{i}.png,{c}" for c in ("a", "b", "c") for i in range(5)]
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    config = SegmentConfig(source="listing", root=tmp_path, listing=tmp_path / "list.csv", out=tmp_path / "o")
    rows = make_plan(list_source(config), 8, config.shuffle_seed, config.test_fraction).to_pylist()
    assert Counter(r["class_name"] for r in rows if r["split"] == "test") == {"a": 1, "b": 1, "c": 1}
    assert {r["shard"] for r in rows if r["split"] == "test"} == {2}  # 12 train in shards 0-1, then test


def test_job_refuses_a_plan_without_test_inputs(tmp_path: Path) -> None:
    """Before anything is written, naming the listing file / the root and what to do."""
    (tmp_path / "list.csv").write_text("path,label,split\na.png,x,train\nb.png,y,train\nc.png,y,train\n")
    config = SegmentConfig(source="listing", root=tmp_path, listing=tmp_path / "list.csv", out=tmp_path / "out")
    with pytest.raises(JobError, match=r"list\.csv: no row ends in the test split.*split column.*test_fraction"):
        run_segment(config, progress=False)
    assert not config.out.local.exists()

    _img(tmp_path / "imgs" / "train" / "cat" / "1.png")
    _img(tmp_path / "imgs" / "val" / "cat" / "2.png")
    folder = SegmentConfig(source="imagefolder", root=tmp_path / "imgs", out=tmp_path / "out")
    with pytest.raises(JobError, match=r"imgs: no image is in the test split.*add a test folder"):
        run_segment(folder, progress=False)
    _img(tmp_path / "flat" / "cat" / "1.png")  # no split folders, but a single image per class stays in train
    flat = SegmentConfig(source="imagefolder", root=tmp_path / "flat", out=tmp_path / "out")
    with pytest.raises(JobError, match=r"flat: no image is in the test split"):
        run_segment(flat, progress=False)
    synthetic = SegmentConfig.model_validate(dict(
        source="synthetic", root=tmp_path / "synth", out=tmp_path / "out",
        synthetic={"num_classes": 2, "train_per_class": 1, "test_per_class": 0, "image_size": 32}))
    with pytest.raises(JobError, match="synthetic.test_per_class"):
        run_segment(synthetic, progress=False)
    assert not config.out.local.exists()

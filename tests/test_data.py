"""Training input: dataset checks, splits, sample decoding, augmentation, per-rank streams."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import training.data as data
from pipeline.masks import crop_boxes, grow_box
from pipeline.shards import ShardError, iter_samples
from schemas.config import DataConfig, ModelConfig, SegmentConfig, TrainConfig
from schemas.storage import Location
from conftest import segment_without_ray
from training.data import (ShardDataset, ShardStream, decode_sample, make_augment, make_view_augments, read_options,
                           split_keys)

K, CROP = 4, 32


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """36 synthetic images (3 classes x 9 train + 3 test) in 8 shards of 5 (train 0-5, test 6-7), segmented
    without Ray."""
    tmp = tmp_path_factory.mktemp("data")
    config = SegmentConfig.model_validate(dict(
        source="synthetic", root=tmp / "synth", out=tmp / "shards", shard_size=5,
        masks_per_image=K, segmenter={"name": "grid", "grid": 2},
        synthetic={"num_classes": 3, "train_per_class": 9, "test_per_class": 3, "image_size": 48},
    ))
    return segment_without_ray(config)


@pytest.fixture
def copy(shards: Path, tmp_path: Path) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(shards, out)
    return out


def _shard_of(dataset: ShardDataset) -> dict[str, int]:
    return {r["key"]: r["shard"] for r in dataset.rows}


def _keys(stream: ShardStream) -> list[str]:
    return [k for batch in stream for k in batch["key"]]


def test_open_counts(shards: Path) -> None:
    ds = ShardDataset.open(shards)
    assert ds.root == Location.parse(shards) and ds.num_classes == 3 and len(ds.classes) == 3
    assert ds.masks_per_image == K
    assert len(ds.rows) == 36 and set(ds.rows[0]) == {"key", "shard", "label", "split", "n_masks"}
    assert Counter(r["split"] for r in ds.rows) == {"train": 27, "test": 9}
    assert all(r["n_masks"] == 4 for r in ds.rows)  # grid 2x2
    assert ds.card.shuffle_seed == 0
    assert [(s.name, s.split, s.count) for s in ds.card.shards] == [
        *((f"train-{i:05d}", "train", 5 if i < 5 else 2) for i in range(6)), ("test-00006", "test", 5),
        ("test-00007", "test", 4)]
    assert sorted(p.name for p in shards.glob("_webdataset/train-*.tar")) == [f"train-{i:05d}.tar" for i in range(6)]
    assert ds.tar_path(6) == Location.parse(shards / "_webdataset/test-00006.tar")
    assert all(r["split"] == ds.card.shards[r["shard"]].split for r in ds.rows)  # a shard holds one split


def test_split_keys_stratified_deterministic(shards: Path) -> None:
    ds = ShardDataset.open(shards)
    label = {r["key"]: r["label"] for r in ds.rows}
    test = {r["key"] for r in ds.rows if r["split"] == "test"}
    s = split_keys(ds, 0.25, seed=3)
    assert s == split_keys(ds, 0.25, seed=3) and s != split_keys(ds, 0.25, seed=4)
    assert Counter(label[k] for k in s["val"]) == {0: 2, 1: 2, 2: 2}  # round(9 * 0.25) per class
    assert len(s["train"]) == 21 and set(s["test"]) == test and all(v == sorted(v) for v in s.values())
    assert not set(s["train"]) & set(s["val"]) and not (set(s["train"]) | set(s["val"])) & test
    assert Counter(label[k] for k in split_keys(ds, 0.01, 0)["val"]) == {0: 1, 1: 1, 2: 1}  # at least 1
    assert split_keys(ds, 0.0, 0)["val"] == []


def test_decode_sample_pads_and_resizes(shards: Path) -> None:
    key, members = next(iter_samples(shards / "_webdataset/train-00000.tar"))
    crops, valid, label, out_key = decode_sample(members, K + 2, 24, None)
    assert out_key == key and label == json.loads(members["json"])["label"]
    assert crops.shape == (K + 2, 3, 24, 24) and crops.dtype == torch.float32
    assert valid.tolist() == [True] * K + [False, False] and not crops[K:].any()
    assert -2.2 < float(crops[:K].min()) and float(crops[:K].max()) < 2.7  # ImageNet-normalised
    assert not any(m.startswith("crop_") for m in members)  # the default format stores no crops
    image = np.asarray(Image.open(io.BytesIO(members["jpg"])).convert("RGB"))
    for i, box in enumerate(json.loads(members["json"])["boxes"]):  # cut at read time
        normalised = (crop_boxes(image, [box], 24)[0].transpose(2, 0, 1) - data._MEAN_255) / data._STD_255
        assert np.allclose(crops[i].numpy(), normalised, atol=1e-5)
    wrong = {**members, "json": json.dumps({**json.loads(members["json"]), "width": 7}).encode()}
    with pytest.raises(ShardError, match=rf"sample {key}: image is \d+x\d+, the json says 7x"):
        decode_sample(wrong, K, 24, None)
    del members["jpg"]
    with pytest.raises(ShardError, match=rf"member {key}.jpg is missing"):
        decode_sample(members, K, 24, None)


def test_augmentation_changes_crops_not_shapes(shards: Path) -> None:
    _, members = next(iter_samples(shards / "_webdataset/train-00000.tar"))
    plain, valid, _, _ = decode_sample(members, K + 1, CROP, None)
    a1, valid1, _, _ = decode_sample(members, K + 1, CROP, make_augment(7))
    a2, _, _, _ = decode_sample(members, K + 1, CROP, make_augment(7))
    assert a1.shape == plain.shape and torch.equal(valid1, valid) and not a1[K].any()
    assert torch.equal(a1, a2)  # seeded
    assert all(not torch.equal(a1[i], plain[i]) for i in range(K))
    crop = np.random.default_rng(0).integers(0, 256, (CROP, 2 * CROP, 3), dtype=np.uint8)
    aug = make_augment(0)
    first, second = aug(crop), aug(crop)  # every call draws new parameters
    assert first.dtype == np.uint8 and first.shape == crop.shape and not np.array_equal(first, second)


def test_flip_augmentation_only_flips() -> None:
    """``augment: flip`` mirrors about half the crops and changes no pixel otherwise; booleans still
    mean the reference's augmentation or none."""
    crop = np.random.default_rng(1).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    aug = make_augment(5, "flip")
    outs = [aug(crop) for _ in range(40)]
    flipped = sum(np.array_equal(o, crop[:, ::-1]) for o in outs)
    assert 10 <= flipped <= 30 and flipped + sum(np.array_equal(o, crop) for o in outs) == 40
    assert DataConfig(augment=True).augment == "reference" and DataConfig(augment=False).augment == "none"
    with pytest.raises(ValueError, match="augment"):
        DataConfig(augment="strong")


@pytest.mark.parametrize("kind", ["flip", "reference"])
def test_two_views_share_geometry_not_colour(kind: str) -> None:
    """PIP-Net's views: the same flip / warp, each its own colour; dark left half and bright right half stay on the
    same side in both views (both sides across seeds), while the pixels differ."""
    image = np.random.default_rng(0).integers(0, 60, (32, 32, 3), dtype=np.uint8)
    image[:, 16:] += 150
    sides = []
    for seed in range(12):
        first, second = (augment(image) for augment in make_view_augments([seed, 1], kind))
        side = [int(np.sign(v[:, 20:].mean() - v[:, :12].mean())) for v in (first, second)]
        assert side[0] == side[1] != 0 and not np.array_equal(first, second)
        sides.append(side[0])
    assert set(sides) == {-1, 1}


def test_two_view_stream(shards: Path) -> None:
    dataset = ShardDataset.open(shards)
    keys = split_keys(dataset, 0.0, 0)["train"]
    stream = ShardStream(dataset, keys, DataConfig(batch_size=4, loader_threads=0, augment="flip"), input_size=CROP,
                         batch_size=4, train=True, whole_image=True, views=2)
    batch = next(iter(stream))
    assert batch["crops"].shape == batch["crops2"].shape == (4, 1, 3, CROP, CROP)
    assert not torch.equal(batch["crops"], batch["crops2"])
    with pytest.raises(ValueError, match="an evaluation stream 1"):
        ShardStream(dataset, keys, DataConfig(), input_size=CROP, batch_size=4, train=False, views=2)


def test_crop_dropout_hides_crops_in_training_only(shards: Path) -> None:
    """``data.crop_dropout``: about that share of the valid crops hidden in training (zeros, the rest decoded as
    without it), at least one kept per image, the same on a rerun; evaluation and the whole-image input see every
    crop."""
    dataset = ShardDataset.open(shards)
    keys = split_keys(dataset, 0.0, 0)["train"]

    def batches(p: float, *, train: bool = True, whole_image: bool = False) -> dict[str, torch.Tensor]:
        config = DataConfig(batch_size=4, loader_threads=0, augment="none", crop_dropout=p)
        stream = list(ShardStream(dataset, keys, config, input_size=16, batch_size=4, train=train, seed=3,
                                  whole_image=whole_image))
        return {name: torch.cat([b[name] for b in stream]) for name in ("crops", "valid")}

    every, hidden = batches(0.0), batches(0.5)
    shown = hidden["valid"]
    assert shown.shape == every["valid"].shape and not (shown & ~every["valid"]).any() and shown.any(1).all()
    assert 0.35 < 1 - shown.sum() / every["valid"].sum() < 0.65
    assert torch.equal(hidden["crops"][shown], every["crops"][shown])
    assert not hidden["crops"][~shown].any()
    assert every["crops"][every["valid"] & ~shown].flatten(1).abs().sum(1).gt(0).all()
    assert torch.equal(batches(0.5)["valid"], shown)
    assert torch.equal(batches(0.5, train=False)["valid"], batches(0.0, train=False)["valid"])
    assert batches(0.5, whole_image=True)["valid"].all()
    one_left = np.array([False, True, False])
    assert np.array_equal(data.hide_crops(one_left, 0.99, [0]), one_left)
    with pytest.raises(ValueError, match="crop_dropout"):
        DataConfig(crop_dropout=1.0)
    with pytest.raises(ValueError, match="data.crop_dropout hides mask crops; model.regions patches"):
        TrainConfig(shards="s", run_dir="r", model={"regions": "patches"}, data={"crop_dropout": 0.5})


def test_crop_margin_grows_boxes_with_context(shards: Path) -> None:
    """``model.crop_margin``: each box grown by that share of its size on every side, clipped to the image, before it is
    cut; the stream a model reads (``ShardStream.for_model``) cuts the same crops; 0 reads the box itself."""
    assert grow_box([10, 20, 19, 29], 0.5, (100, 100)) == [5, 15, 24, 34]
    assert grow_box([0, 20, 99, 29], 0.25, (40, 100)) == [0, 18, 99, 31]  # clipped to the image
    assert grow_box([3, 4, 5, 6], 0.0, (10, 10)) == [3, 4, 5, 6]
    _, members = next(iter_samples(shards / "_webdataset/train-00000.tar"))
    record = json.loads(members["json"])
    image = np.asarray(Image.open(io.BytesIO(members["jpg"])).convert("RGB"))
    crops, valid, _, _ = decode_sample(members, K, 24, None, margin=0.5)
    for i, box in enumerate(record["boxes"]):
        grown = grow_box(box, 0.5, image.shape[:2])
        assert grown != box  # the 2 x 2 grid's cells have neighbours on two sides
        expected = (crop_boxes(image, [grown], 24)[0].transpose(2, 0, 1) - data._MEAN_255) / data._STD_255
        assert np.allclose(crops[i].numpy(), expected, atol=1e-5)
    assert not torch.equal(crops, decode_sample(members, K, 24, None)[0])
    dataset = ShardDataset.open(shards)
    keys = [record["key"]]
    model = ModelConfig(input_size=24, crop_margin=0.5)
    batch = next(iter(ShardStream.for_model(dataset, keys, DataConfig(loader_threads=0), model, batch_size=1,
                                            train=False)))
    assert torch.equal(batch["crops"][0], crops) and batch["valid"][0].all()
    assert read_options(model) == {"whole_image": False, "margin": 0.5}
    assert read_options(model, whole_image=True) == {"whole_image": True, "margin": 0.0}  # pre-training on images
    assert read_options(ModelConfig(regions="patches")) == {"whole_image": True, "margin": 0.0}
    with pytest.raises(ValueError, match="model.crop_margin grows mask crops; model.regions patches"):
        ModelConfig(regions="patches", crop_margin=0.5)


def test_augmentation_ranges() -> None:
    """Small warps about the centre (±15° rotation and shear, 5 % perspective), flips half the time, colour
    within the ColorJitter factors; outside the warped crop is black."""
    size = 64
    half = np.zeros((size, size, 3), np.uint8)
    half[:, size // 2 :] = (90, 150, 210)  # right half coloured: a flip moves it to the left
    aug = make_augment(3)
    flipped = 0
    for _ in range(40):
        out = aug(half).astype(float)
        left, right = out[24:40, 4:20].mean(), out[24:40, 44:60].mean()
        assert min(left, right) < 20 < 60 < max(left, right)  # still one dark and one coloured side
        flipped += left > right
        centre = out[28:36, 44:52].mean(axis=(0, 1)) if right > left else out[28:36, 12:20].mean(axis=(0, 1))
        assert np.all(np.abs(centre - (90, 150, 210)) < 0.3 * np.array((90, 150, 210)))
    assert 8 <= flipped <= 32
    corners = [aug(np.full((size, size, 3), 200, np.uint8)) for _ in range(40)]
    assert any(c[0, 0].max() == 0 or c[-1, -1].max() == 0 for c in corners)  # black where the warp leaves the crop


def test_train_stream_two_ranks(shards: Path) -> None:
    ds = ShardDataset.open(shards)
    train = split_keys(ds, 0.25, 0)["train"]  # 21 keys in shards 0..5
    shard_of = _shard_of(ds)
    config = DataConfig(shuffle_buffer=8, loader_threads=2)
    streams = [ShardStream(ds, train, config, input_size=24, batch_size=8, train=True, rank=r, world_size=2, seed=0) for r in range(2)]
    steps = streams[0].steps_per_epoch()
    assert steps == streams[1].steps_per_epoch() == 2  # ceil(21 / 2 / 8)
    orders = []
    for epoch in range(2):
        per_rank = []
        for stream in streams:
            stream.set_epoch(epoch)
            batches = list(stream)
            assert len(batches) == steps
            for b in batches:
                assert b["crops"].shape == (8, K, 3, 24, 24) and b["valid"].shape == (8, K)
                assert b["label"].dtype == torch.int64 and len(b["key"]) == 8
            per_rank.append([k for b in batches for k in b["key"]])
        shards_read = [{shard_of[k] for k in keys} for keys in per_rank]
        assert not shards_read[0] & shards_read[1]
        assert set(per_rank[0]) | set(per_rank[1]) == set(train)
        orders.append(per_rank)
    assert orders[0] != orders[1]
    streams[0].set_epoch(0)
    assert _keys(streams[0]) == orders[0][0]  # (seed, epoch) fixes the order, threads or not


def test_train_stream_splits_a_shard_over_ranks(shards: Path) -> None:
    ds = ShardDataset.open(shards)
    keys = [r["key"] for r in ds.rows if r["shard"] == 2]  # 5 keys, 1 shard, 2 ranks
    config = DataConfig(shuffle_buffer=4, loader_threads=0)
    got = [_keys(ShardStream(ds, keys, config, input_size=16, batch_size=2, train=True, rank=r, world_size=2, seed=1)) for r in range(2)]
    assert [len(g) for g in got] == [4, 4]  # 2 batches of 2 on each rank
    assert set(got[0]) | set(got[1]) == set(keys) and len(set(got[0]) & set(got[1])) == 0


def test_eval_stream_covers_every_key_once(shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = ShardDataset.open(shards)
    test = split_keys(ds, 0.25, 0)["test"]
    read: list[str] = []
    monkeypatch.setattr(data, "iter_samples", lambda tar: (read.append(tar.name), iter_samples(tar))[1])
    config = DataConfig(loader_threads=1)
    streams = [ShardStream(ds, test, config, input_size=CROP, batch_size=4, train=False, rank=r, world_size=2, seed=0) for r in range(2)]
    got = [_keys(s) for s in streams]
    assert sorted(got[0] + got[1]) == sorted(test)
    assert sum(s.steps_per_epoch() for s in streams) == sum(-(-len(g) // 4) for g in got)
    assert sorted(read) == ["test-00006.tar", "test-00007.tar"]  # only the shards holding test keys
    batch = next(iter(streams[0]))
    key = batch["key"][0]
    members = dict(iter_samples(ds.tar_path(_shard_of(ds)[key])))[key]
    assert torch.equal(batch["crops"][0], decode_sample(members, K, CROP, None)[0])  # no augmentation


def test_truncated_tar_refused_at_open(copy: Path) -> None:
    tar = copy / "_webdataset/train-00003.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    with pytest.raises(ShardError, match="train-00003.tar"):
        ShardDataset.open(copy)
    tar.unlink()
    with pytest.raises(ShardError, match="train-00003.tar.*missing"):
        ShardDataset.open(copy)


def test_corrupt_tar_fails_on_iteration(copy: Path) -> None:
    tar = copy / "_webdataset/train-00002.tar"
    raw = bytearray(tar.read_bytes())
    with tarfile.open(tar) as src:
        offset = src.getmembers()[7].offset  # a header in the middle; the size stays right
    raw[offset:offset + 512] = b"\xff" * 512
    tar.write_bytes(bytes(raw))
    ds = ShardDataset.open(copy)
    keys = [r["key"] for r in ds.rows if r["shard"] == 2]
    with pytest.raises(ShardError, match="train-00002.tar"):
        list(ShardStream(ds, keys, DataConfig(loader_threads=2), input_size=CROP, batch_size=2, train=False))


def test_tar_missing_a_key_fails_on_iteration(copy: Path) -> None:
    tar = copy / "_webdataset/train-00004.tar"
    with tarfile.open(tar) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
    dropped = members[0][0].name.split(".")[0]
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as dst:
        for info, payload in members:
            if not info.name.startswith(dropped + "."):
                dst.addfile(info, io.BytesIO(payload))
    card = json.loads((copy / "_manifest.json").read_text())
    for s in card["shards"]:
        if s["name"] == "train-00004":
            s["tar_bytes"] = tar.stat().st_size
    (copy / "_manifest.json").write_text(json.dumps(card))
    ds = ShardDataset.open(copy)
    keys = [r["key"] for r in ds.rows if r["shard"] == 4]
    stream = ShardStream(ds, keys, DataConfig(loader_threads=0), input_size=CROP, batch_size=2, train=False)
    with pytest.raises(ShardError, match=f"train-00004.tar.*{dropped}"):
        list(stream)
    with pytest.raises(ValueError, match="not ok samples"):
        ShardStream(ds, ["999999"], DataConfig(), input_size=CROP, batch_size=16, train=False)


def test_rank_checks(shards: Path) -> None:
    ds = ShardDataset.open(shards)
    with pytest.raises(ValueError, match="rank 2"):
        ShardStream(ds, [], DataConfig(), input_size=CROP, batch_size=16, train=True, rank=2, world_size=2, seed=0)
    empty = ShardStream(ds, [], DataConfig(), input_size=CROP, batch_size=16, train=True, rank=0, world_size=2, seed=0)
    assert empty.steps_per_epoch() == 0 and list(empty) == []


def test_batch_buffers_reused_only_when_nothing_holds_them() -> None:
    pool = data.BatchBuffers((4, 2), keep=2)
    first = torch.from_numpy(pool.get(4))
    first.fill_(1.0)
    row = first[1]  # a slice of the tensor is enough to keep the buffer
    del first
    second = pool.get(3)
    assert second.shape == (3, 2) and not np.shares_memory(second, row.numpy())
    assert float(row.sum()) == 2.0
    ptr = row.data_ptr() - row.element_size() * 2
    del row  # nothing refers to the first buffer any more: it is handed out again
    third = pool.get(4)
    assert third.ctypes.data == ptr and not np.shares_memory(third, second)


def test_interleave_round_robin_replaces_exhausted() -> None:
    its = [iter("ab"), iter("cdef"), iter("g"), iter("hi")]
    assert "".join(data._interleave(its, 2)) == "acbdgehfi"  # "g" takes the place of "ab", then "hi" that of "g"
    assert "".join(data._interleave([iter("ab"), iter("c")], 4)) == "acb"
    assert list(data._interleave([], 4)) == []


def _one_class_per_shard(tmp: Path, classes: int, per_class: int) -> Path:
    """A shard directory as another tool would write it from a class-sorted listing: shards cut in listing
    order, so shard s holds class s only (the plan is written here directly, not by make_plan)."""
    from pipeline.manifest import build_card
    from pipeline.sources import list_source
    from pipeline.worker import ShardProcessor
    from schemas.manifest import SegmenterInfo

    config = SegmentConfig.model_validate(dict(
        source="synthetic", root=tmp / "synth", out=tmp / "sorted", shard_size=per_class, masks_per_image=1,
        segmenter={"name": "grid", "grid": 1},
        synthetic={"num_classes": classes, "train_per_class": per_class, "test_per_class": 0, "image_size": 32},
    ))
    config.out.local.mkdir()
    listing = list_source(config)
    items = listing.items  # sorted by (split, class, index)
    rows = [{"key": f"{position // per_class:05d}{position % per_class:02d}", "shard": position // per_class,
             "source_path": item.path, "label": item.label, "class_name": item.class_name, "split": item.split,
             "parts_path": None, "object_path": None, "extra": "{}"} for position, item in enumerate(items)]
    processor = ShardProcessor(config, "another tool")
    stats = [processor.process(s, [r for r in rows if r["shard"] == s]) for s in range(classes)]
    build_card(config.out, stats, listing.classes, "synthetic", "another tool", 1, None,
               SegmenterInfo(name="grid", params={}), 0)
    return config.out.local


def test_interleaving_mixes_shards_of_one_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shards of one class each still give mixed training batches: a rank reads INTERLEAVE shards at once.
    The shuffle buffer is off (1), so the mixing seen here is the interleaving's alone."""
    ds = ShardDataset.open(_one_class_per_shard(tmp_path, classes=4, per_class=8))
    assert [{r["label"] for r in ds.rows if r["shard"] == s} for s in range(4)] == [{0}, {1}, {2}, {3}]
    keys = [r["key"] for r in ds.rows]
    config = DataConfig(shuffle_buffer=1, augment=False, loader_threads=0)

    def classes_per_batch() -> list[int]:
        stream = ShardStream(ds, keys, config, input_size=8, batch_size=4, train=True)
        return [len(set(b["label"].tolist())) for b in stream]

    assert data.INTERLEAVE == 4 and classes_per_batch() == [4] * 8  # every batch holds all four classes
    monkeypatch.setattr(data, "INTERLEAVE", 1)  # one shard after another: every batch is one class
    assert classes_per_batch() == [1] * 8


def test_training_batches_of_real_photos_mix_classes(cub_dev: Path, tmp_path: Path) -> None:
    """cub_dev's listing is sorted by class (30 species, 30 train photos each). Its shards, segmented with the
    cheap grid segmenter, hold nearly every class, and 16-image training batches hold about as many distinct
    classes as 16 i.i.d. draws (30 * (1 - (29/30)^16) = 12.5; cut in listing order, a shard held ~9 classes)."""
    config = SegmentConfig(source="cub", root=cub_dev, out=tmp_path / "shards", shard_size=256, masks_per_image=1,
                           segmenter={"name": "grid", "grid": 1})
    ds = ShardDataset.open(segment_without_ray(config))
    for stats in ds.card.shards:
        rows = [r for r in ds.rows if r["shard"] == stats.shard]
        assert {r["split"] for r in rows} == {stats.split}  # one split per shard
        assert len({r["label"] for r in rows}) >= 25, stats.name  # of 30 classes
    train = [r["key"] for r in ds.rows if r["split"] == "train"]
    assert len(train) == 900
    stream = ShardStream(ds, train, DataConfig(augment=False, loader_threads=2), input_size=8, batch_size=16, train=True)
    distinct = [len(set(b["label"].tolist())) for b in stream]
    assert len(distinct) == stream.steps_per_epoch() == 57
    assert np.mean(distinct) >= 11, np.mean(distinct)


@pytest.mark.parametrize("version", ["3", "5"])
def test_flat_directory_still_reads(copy: Path, version: str) -> None:
    """Formats 3-5 kept every file at the top (manifest.json, train-00000.tar, train-00000_stats.json), and format
    3 named shards 00000.tar (no split) and had no shuffle_seed: such directories still read."""
    from pipeline.manifest import verify
    from schemas.manifest import FLAT_MANIFEST, MANIFEST, shard_file

    card = json.loads((copy / MANIFEST).read_text())
    (copy / MANIFEST).unlink()
    for s in card["shards"]:
        split = None if version == "3" else s["split"]
        for part in ("tar", "parquet", "stats"):
            flat = copy / shard_file(split, s["shard"], part, flat=True)
            (copy / shard_file(s["split"], s["shard"], part)).rename(flat)
        s["format_version"] = version
        if version == "3":
            s.pop("split")
            s["name"] = f"{s['shard']:05d}"
    if version == "3":
        card.pop("shuffle_seed")
    (copy / FLAT_MANIFEST).write_text(json.dumps({**card, "format_version": version}))
    ds = ShardDataset.open(copy)
    assert ds.card.format_version == version
    assert ds.tar_path(6) == Location.parse(copy / ("00006.tar" if version == "3" else "test-00006.tar"))
    assert (ds.card.shuffle_seed is None) == (version == "3")
    assert verify(copy) == []
    test = split_keys(ds, 0.0, 0)["test"]
    assert sorted(_keys(ShardStream(ds, test, DataConfig(loader_threads=0), input_size=8, batch_size=4, train=False))) == test


def test_crop_coverage_counts_crops_as_read(shards: Path) -> None:
    """bench/crop_coverage.py: a grid cell of the 2 x 2 masks covers a quarter of its image, grown by 0.5 about half
    (clipped at the two image borders it touches)."""
    from bench.crop_coverage import boxes_by_key, coverage_row

    boxes = boxes_by_key(shards)
    assert len(boxes) == 36 and all(len(masks) == K for masks, _ in boxes.values())
    crops = [(box, shape) for masks, shape in boxes.values() for box in masks]
    bare, grown = coverage_row("every mask", 0.0, crops), coverage_row("every mask", 0.5, crops)
    assert bare["n"] == grown["n"] == 36 * K
    assert bare["mean share of the image"] == "25%" and grown["mean share of the image"] == "56%"
    assert bare["covering >= 90%"] == "0 (0%)"
    some = sorted(boxes)[::7]
    assert boxes_by_key(shards, set(some)) == {key: boxes[key] for key in some}

"""Training end to end on local Ray Train (2 CPU workers): phases, checkpoints, resume, export, evaluate."""

from __future__ import annotations

import csv
import json
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from pipeline.job import run_segment
from schemas.config import ModelConfig, SegmentConfig, TrainConfig
from training.loop import (CHECKPOINT, checkpoint_state, freeze_batchnorm_statistics, make_optimizers, make_schedulers,
                           phase_of, set_trainable)
from training.averaging import WeightAverage, decay_per_step
from training.model import LinearHead, ProtoMask
from training.data import ShardDataset, ShardStream, split_keys
from training.evaluate import classification
from training.explain import run_explain
from training.export import load_model
from training.train import TrainError, run_evaluate, run_train

pytestmark = pytest.mark.ray

TINY = {"backbone": "convnet", "width": 8, "prototypes_per_class": 2, "prototype_dim": 16, "input_size": 32}


@pytest.fixture(scope="module")
def shards(ray_local, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("train")
    config = SegmentConfig(
        source="synthetic", root=tmp / "syn", out=tmp / "shards", masks_per_image=4, crop_size=32, shard_size=16,
        num_workers=2, cpus_per_worker=0.5,
        synthetic={"num_classes": 3, "train_per_class": 12, "test_per_class": 4, "image_size": 64},
    )
    run_segment(config, progress=False)
    return config.out.local


def _config(shards: Path, run_dir: Path, **schedule) -> TrainConfig:
    return TrainConfig.model_validate({
        "shards": shards, "run_dir": run_dir, "model": TINY, "num_workers": 2, "cpus_per_worker": 0.5,
        "schedule": {"warmup_epochs": 1, "joint_epochs": 2, "last_layer_epochs": 1, "lr_backbone": 1e-3, **schedule},
        "data": {"batch_size": 8, "loader_threads": 0}, "seed": 0,
    })


def test_phase_schedule_and_freezing() -> None:
    config = _config(Path("s"), Path("r"))
    assert [phase_of(e, config) for e in range(4)] == ["warmup", "joint", "joint", "last_layer"]
    pretrained = _config(Path("s"), Path("r"), pretrain_epochs=2)
    assert [phase_of(e, pretrained) for e in range(6)] == ["pretrain"] * 2 + ["warmup", "joint", "joint", "last_layer"]
    model = ProtoMask(ModelConfig(**TINY), 3)
    expect = {"warmup": {"add_on", "prototypes"}, "joint": {"backbone", "add_on", "prototypes"},
              "last_layer": {"last_layer"}}
    for phase, groups in expect.items():
        set_trainable(model, phase, config)
        trainable = {n for n, ps in model.parameter_groups().items() if all(p.requires_grad for p in ps)}
        frozen = {n for n, ps in model.parameter_groups().items() if not any(p.requires_grad for p in ps)}
        assert trainable == groups and frozen == set(model.parameter_groups()) - groups
    parity = config.model_copy(update={"parity": config.parity.model_copy(update={"frozen_addon": True})})
    set_trainable(model, "joint", parity)
    assert not any(p.requires_grad for p in model.add_on.parameters())
    assert len(make_optimizers(model, parity)["joint"].param_groups) == 2  # no add-on group in parity mode


def _rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {g["name"]: g["lr"] for g in optimizer.param_groups}


def test_step_decay_runs_from_pretraining_when_asked() -> None:
    """lr_decay_from joint (the paper): pre-training at constant rates, every joint rate starts in full;
    pretrain: the decay counts pre-training epochs too and the backbone's joint rate goes on from there."""
    model = ProtoMask(ModelConfig(**TINY), 3)
    for decay_from, pretrain_end, joint_start in (("joint", 1.0, 1.0), ("pretrain", 0.25, 0.25)):
        config = _config(Path("s"), Path("r"), pretrain_epochs=4, prototype_init="uniform", step_size=2, gamma=0.5,
                         lr_decay_from=decay_from)
        pretrainer = LinearHead(model.config, 3, trunk=(model.backbone, model.channels))
        opts = make_optimizers(model, config, pretrainer=pretrainer)
        schedulers = make_schedulers(opts, config)
        for _ in range(4):
            opts["pretrain"].step()
            if "pretrain" in schedulers:
                schedulers["pretrain"].step()
        s = config.schedule
        assert _rates(opts["pretrain"]) == {"backbone": s.lr_backbone * pretrain_end,
                                            "classifier": s.lr_addon * pretrain_end}
        assert _rates(opts["joint"]) == {"backbone": s.lr_backbone * joint_start, "add_on": s.lr_addon,
                                         "prototypes": s.lr_prototypes}
        for _ in range(2):
            opts["joint"].step()
            schedulers["joint"].step()
        assert _rates(opts["joint"]) == {"backbone": s.lr_backbone * joint_start / 2, "add_on": s.lr_addon / 2,
                                         "prototypes": s.lr_prototypes / 2}


def test_checkpoint_is_plain_and_roundtrips(tmp_path: Path) -> None:
    config = _config(Path("s"), tmp_path)
    model = ProtoMask(ModelConfig(**TINY), 3)
    opts = make_optimizers(model, config)
    schedulers = make_schedulers(opts, config)
    model(torch.rand(2, 2, 3, 32, 32), torch.ones(2, 2, dtype=torch.bool)).logits.sum().backward()
    opts["joint"].step()
    schedulers["joint"].step()
    torch.save(checkpoint_state(model, opts, schedulers, 3, config, pushed=True), tmp_path / CHECKPOINT)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert state["epoch"] == 3 and state["pushed"] and TrainConfig.model_validate_json(state["config"]) == config
    fresh = ProtoMask(ModelConfig(**TINY), 3)
    fresh.load_state_dict(state["model"])
    fresh_opts = make_optimizers(fresh, config)
    fresh_opts["joint"].load_state_dict(state["optimizers"]["joint"])
    fresh_schedulers = make_schedulers(fresh_opts, config)
    fresh_schedulers["joint"].load_state_dict(state["schedulers"]["joint"])
    assert fresh_schedulers["joint"].last_epoch == 1
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    assert fresh_opts["joint"].state_dict()["state"].keys() == opts["joint"].state_dict()["state"].keys()


def _tensorboard_steps(folder: Path, tag: str) -> list[int]:
    """Steps of ``tag`` in TensorBoard event files (TFRecord framing: length, crc, Event proto, crc)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    steps = []
    for path in sorted(folder.iterdir()):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return sorted(steps)


def test_train_two_workers_export_evaluate_and_rerun_resumes(shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_train(_config(shards, run_dir, push_every=1))
    assert result["test"]["n"] == 12 and 0.0 <= result["test"]["accuracy"] <= 1.0
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,phase") and len(rows) == 1 + 4
    assert {"val_accuracy", "train_cluster", "images_per_s", "val_macro_f1"} <= set(rows[0].split(","))
    push_log = json.loads((run_dir / "push_log.json").read_text())["push"]
    assert len(push_log) == 6 and all(e["key"] is not None for e in push_log)
    # push_every 1: one more push, before the second joint epoch (epoch 2, after 1 warm-up and 1 joint epoch)
    assert sorted(p.name for p in run_dir.glob("push_log*.json")) == ["push_log.json", "push_log_epoch_2.json"]
    assert len(json.loads((run_dir / "push_log_epoch_2.json").read_text())["push"]) == 6
    assert (run_dir / "train_config.yaml").is_file() and list((run_dir / "tensorboard").iterdir())

    state = torch.load(run_dir / "model.pt", weights_only=True)
    assert state["prototypes"].shape == (6, 16)
    model, classes = load_model(run_dir)
    assert classes == ["red_circle", "green_square", "blue_triangle"]
    # pushed prototypes sit on real crop embeddings (of their own class), so their push distance is ~0 now
    # one test result per model: evaluate recomputes the training run's numbers into the same file
    assert result["test"]["global_size"] >= 1 and "part_hit_rate" in result["test"]
    evaluated = run_evaluate(run_dir, shards, "test")
    # the 2 workers each took half of the saliency metrics' samples; one process gives the same numbers
    assert {"vlc", "object_overlap", "consistency", "part_stability", "part_hit_n"} <= set(evaluated)
    assert set(evaluated) == set(result["test"]) and evaluated["confusion"] == result["test"]["confusion"]
    for key in set(evaluated) - {"head", "regions", "relevance", "confusion"}:
        assert evaluated[key] == pytest.approx(result["test"][key], abs=1e-6), key
    saved = json.loads((run_dir / "metrics_test.json").read_text())
    assert saved["test"] == evaluated and saved["epochs"] == 4 and len(saved["peak_memory_mib"]) == 2
    assert not (run_dir / "eval_test.json").exists()
    assert _tensorboard_steps(run_dir / "tensorboard", "val_accuracy") == [0, 1, 2, 3]  # the last epoch too

    again = run_train(_config(shards, run_dir, push_every=1))  # same run dir: resumes after the last epoch, trains nothing
    assert again["test"] == result["test"]
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "resume" and events[-1]["epoch"] == 4
    assert len((run_dir / "metrics.csv").read_text().splitlines()) == 1 + 4
    # a rerun that would resume this run under other training settings is refused before anything is written
    recorded = (run_dir / "train_config.yaml").read_bytes()
    other = _config(shards, run_dir, push_every=1, lr_backbone=5e-4)
    other = other.model_copy(update={"data": other.data.model_copy(update={"augment": "none"})})
    with pytest.raises(TrainError, match=r"holds a run of another configuration \(schedule.lr_backbone: 0.001 there, "
                                         r"0.0005 now; data.augment: 'reference' there, 'none' now\); .*another "
                                         r"--run-dir"):
        run_train(other)
    assert (run_dir / "train_config.yaml").read_bytes() == recorded
    (run_dir / "train_config.yaml").write_text("model: {head: mlp}\n")
    with pytest.raises(TrainError, match="train_config.yaml: the run's config no longer reads"):
        run_train(_config(shards, run_dir, push_every=1))


def test_linear_head_and_pretrained_backbone_train_on_the_same_shards(shards: Path, tmp_path: Path) -> None:
    linear = _config(shards, tmp_path / "linear").model_copy(
        update={"model": ModelConfig(**TINY, head="linear", regions="patches")})
    result = run_train(linear)
    assert result["test"]["n"] == 12 and "global_size" not in result["test"]
    assert not (tmp_path / "linear" / "push_log.json").exists()
    phases = [row.split(",")[1] for row in (tmp_path / "linear" / "metrics.csv").read_text().splitlines()[1:]]
    assert phases == ["joint"] * 4  # every epoch of the schedule trains everything
    evaluated = run_evaluate(tmp_path / "linear", shards, "test")
    assert evaluated["head"] == "linear" and evaluated["accuracy"] == pytest.approx(result["test"]["accuracy"])

    pretrained = _config(shards, tmp_path / "pre", pretrain_epochs=1, prototype_init="crops")
    first = run_train(pretrained)
    phases = [row.split(",")[1] for row in (tmp_path / "pre" / "metrics.csv").read_text().splitlines()[1:]]
    assert phases == ["pretrain", "warmup", "joint", "joint", "last_layer"]
    placed = json.loads((tmp_path / "pre" / "prototype_init.json").read_text())["prototypes"]
    label_of = {r["key"]: r["label"] for r in ShardDataset.open(shards).rows}
    assert [e["prototype"] for e in placed] == list(range(6))
    assert all(label_of[e["key"]] == e["class"] == e["prototype"] // 2 for e in placed)
    assert len({e["key"] for e in placed}) == 6  # distinct images: every class has more than 2
    assert all(placed[j]["score"] >= placed[j + 1]["score"] for j in range(0, 6, 2))  # the class's best first
    state = torch.load(tmp_path / "pre" / "model.pt", weights_only=True)
    assert not any(k.startswith("classifier") for k in state)  # the pre-training classifier is not exported
    assert run_train(pretrained)["test"] == first["test"]  # resumes from its checkpoint


def test_pretraining_on_whole_images(shards: Path, tmp_path: Path) -> None:
    """schedule.pretrain_on: image: the pre-training epoch shows the backbone whole images, so its validation
    metrics are the pre-trained classifier's on the whole validation images (checked from the checkpoint)."""
    with pytest.raises(ValueError, match="schedule.pretrain_on: image says what pre-training reads"):
        _config(shards, tmp_path / "none", pretrain_on="image")
    config = _config(shards, tmp_path / "image", pretrain_epochs=3, pretrain_on="image", warmup_epochs=0,
                     joint_epochs=0, last_layer_epochs=0, lr_backbone=0.01, lr_addon=0.01)
    config = config.model_copy(update={"data": config.data.model_copy(update={"val_fraction": 0.5})})
    run_train(config)
    rows = list(csv.DictReader((tmp_path / "image" / "metrics.csv").open()))
    assert [r["phase"] for r in rows] == ["pretrain"] * 3
    row = rows[-1]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.common import newest_checkpoint

    state = torch.load(newest_checkpoint(tmp_path / "image"), map_location="cpu", weights_only=True)
    model = ProtoMask(config.model, 3)
    model.load_state_dict(state["model"])
    linear = LinearHead(config.model, 3, trunk=(model.backbone, model.channels))
    linear.classifier.load_state_dict(state["pretrain_classifier"])
    dataset = ShardDataset.open(shards)
    val = split_keys(dataset, 0.5, config.seed)["val"]
    stream = ShardStream(dataset, val, config.data, input_size=32, batch_size=8, train=False, whole_image=True)
    metrics = classification(linear.eval(), stream, torch.device("cpu"))
    assert metrics["n"] == len(val) >= 15
    for name in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert metrics[name] == pytest.approx(float(row[f"val_{name}"]))


def test_auxiliary_head_trains_in_the_joint_phase_only_and_is_not_exported(shards: Path, tmp_path: Path) -> None:
    """loss.auxiliary: the pre-trained classifier's cross-entropy joins the loss in joint epochs only, from the
    backbone pass the prototypes use; model.pt and evaluation know nothing of it, and a rerun resumes; its
    accuracy on the test split beside the prototype head's (bench/head_cost.py) comes from the newest checkpoint."""
    config = _config(shards, tmp_path / "aux", pretrain_epochs=1, prototype_init="crops")
    config = config.model_copy(update={"loss": config.loss.model_copy(update={"auxiliary": 1.0})})
    first = run_train(config)
    rows = list(csv.DictReader((tmp_path / "aux" / "metrics.csv").open()))
    assert [r["phase"] for r in rows] == ["pretrain", "warmup", "joint", "joint", "last_layer"]
    assert [bool(r.get("train_auxiliary")) for r in rows] == [False, False, True, True, False]
    assert all(float(r["train_auxiliary"]) > 0 for r in rows if r["phase"] == "joint")
    state = torch.load(tmp_path / "aux" / "model.pt", weights_only=True)
    assert not any(k.startswith(("auxiliary", "classifier")) for k in state)
    evaluated = run_evaluate(tmp_path / "aux", shards, "test")
    assert evaluated["accuracy"] == pytest.approx(first["test"]["accuracy"])
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.head_cost import head_accuracies

    heads = head_accuracies(tmp_path / "aux")  # bench/head_cost.py: both heads from the newest checkpoint
    assert heads["epoch"] == 5 and heads["n_test"] == first["test"]["n"]
    assert heads["prototypes"] == pytest.approx(first["test"]["balanced_accuracy"]) and 0 <= heads["linear"] <= 1
    assert 1 <= heads["own_regions"] <= config.model.prototypes_per_class and 0 < heads["own_top_share"] <= 1
    from bench.head_cost import evidence_spread

    nearest = torch.tensor([[0, 0, 1, 2], [3, 1, 3, 3]])  # two images, two classes of two prototypes
    assert evidence_spread(nearest, torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1])) == ([1, 1], [1.0, 1.0])
    assert evidence_spread(nearest, torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1])) == ([2, 2], [0.5, 0.5])
    from bench.crop_evidence import evidence_table

    rows = evidence_table(tmp_path / "aux", seeds=[0], epochs=1, crop_dropout=0.5)  # bench/crop_evidence.py
    assert [r["head"].split(",")[0] for r in rows] == ["linear", "linear per crop", "linear per crop", "prototypes",
                                                       "prototypes"]
    assert "sigmoid (the run's)" in rows[3]["head"] and "normalized" in rows[4]["head"]
    assert all(r["n_test"] == first["test"]["n"] and 0 <= r["mean_test"] <= 1 for r in rows)
    assert run_train(config)["test"] == first["test"]  # resumes from its checkpoint, the classifier included

    model = ProtoMask(ModelConfig(**TINY), 3)
    crops, valid = torch.rand(2, 4, 3, 32, 32), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    model.eval()
    z, pooled = model.embed_and_pool(crops, valid)
    assert torch.equal(z, model.embed(crops, valid)) and pooled.shape == (2, model.channels)
    model.auxiliary = torch.nn.Linear(model.channels, 3)
    model.train()
    assert model(crops, valid).auxiliary_logits.shape == (2, 3)
    set_trainable(model, "last_layer", config)  # the head frozen: its logits are not computed at all
    assert model(crops, valid).auxiliary_logits is None
    with pytest.raises(ValueError, match="loss.auxiliary"):
        TrainConfig.model_validate({**config.model_dump(), "schedule": {**config.schedule.model_dump(),
                                                                       "pretrain_epochs": 0,
                                                                       "prototype_init": "uniform"}})
    black_box = TrainConfig.model_validate({**config.model_dump(), "model": {**config.model.model_dump(),
                                                                            "head": "linear"}})
    assert black_box.loss.auxiliary == 1.0  # ignored by the linear head: small-cpu + model.head=linear is the black-box


def test_weight_average(shards: Path, tmp_path: Path) -> None:
    """schedule.ema_half_life: validation and the ends of the joint and last-layer phases read the average of the
    phase's steps' weights, which a checkpoint within the phase holds beside the live weights; an average over the
    last step alone is the last step's weights, so the run is the plain one."""
    plain = run_train(_config(shards, tmp_path / "plain"))
    assert run_train(_config(shards, tmp_path / "instant", ema_half_life=1e-9))["test"] == plain["test"]
    run_train(_config(shards, tmp_path / "slow", last_layer_epochs=0, ema_half_life=1000))
    checkpoints = sorted((tmp_path / "slow").glob(f"checkpoint_*/{CHECKPOINT}"), key=lambda p: p.parent.name)
    mid, end = (torch.load(p, map_location="cpu", weights_only=True) for p in checkpoints)
    assert (mid["epoch"], end["epoch"]) == (2, 3) and "weight_average" in mid and "weight_average" not in end
    average = mid["weight_average"]
    backbone = [k for k in average if k.startswith("backbone.") and k in dict(ProtoMask(ModelConfig(**TINY), 3)
                                                                              .named_parameters())]
    moved = sum(float((mid["model"][k] - average[k]).norm()) for k in backbone)  # one joint epoch of steps
    drift = sum(float((end["model"][k] - average[k]).norm()) for k in backbone)  # a half-life of 1000 epochs
    assert moved > 0 and drift < 0.01 * moved
    assert "num_batches_tracked" not in " ".join(average) and any(k.endswith("running_var") for k in average)

    run_train(_config(shards, tmp_path / "slow-last", last_layer_epochs=2, ema_half_life=1000))
    checkpoints = sorted((tmp_path / "slow-last").glob(f"checkpoint_*/{CHECKPOINT}"), key=lambda p: p.parent.name)
    mid, end = (torch.load(p, map_location="cpu", weights_only=True) for p in checkpoints)
    assert (mid["epoch"], mid["pushed"], end["epoch"]) == (4, True, 5) and "weight_average" not in end
    average = mid["weight_average"]  # started from the pushed model
    assert torch.equal(average["prototypes"], mid["model"]["prototypes"])
    moved = float((mid["model"]["last_layer.weight"] - average["last_layer.weight"]).norm())
    drift = float((end["model"]["last_layer.weight"] - average["last_layer.weight"]).norm())
    assert moved > 0 and drift < 0.01 * moved


def test_weight_average_update_and_swap() -> None:
    model = ProtoMask(ModelConfig(**TINY), 3)
    average = WeightAverage(model, decay_per_step(2.0, 5))
    assert decay_per_step(2.0, 5) ** 10 == pytest.approx(0.5)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    average.update(model)
    share = 1 - decay_per_step(2.0, 5)
    assert torch.allclose(average.average["prototypes"], start["prototypes"] + share)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    with average.applied(model):
        assert torch.allclose(model.prototypes, start["prototypes"] + share)
    assert all(torch.equal(live[k], v) for k, v in model.state_dict().items())
    restored = WeightAverage(model, 0.5, average={k: v.clone() for k, v in average.average.items()})
    assert all(torch.equal(restored.average[k], v) for k, v in average.average.items())


def test_corrupt_shard_refused_before_training(shards: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    data = (copy / "_webdataset/train-00001.tar").read_bytes()
    (copy / "_webdataset/train-00001.tar").write_bytes(data[:1000])
    with pytest.raises(Exception, match="train-00001.tar"):
        run_train(_config(copy, tmp_path / "run"))
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_load_model_rejects_pickle_and_nan(tmp_path: Path, shards: Path) -> None:
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    model = ProtoMask(ModelConfig(**TINY), 3)
    (run_dir / "model_config.json").write_text(json.dumps(
        {"model": TINY, "classes": ["a", "b", "c"], "num_prototypes": 6, "format_version": "1"}))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, run_dir / "model.pt")
    with pytest.raises(TrainError, match="cannot load as a plain state dict"):
        load_model(run_dir)
    state = model.state_dict()
    state["prototypes"][0, 0] = float("nan")
    torch.save(state, run_dir / "model.pt")
    with pytest.raises(TrainError, match="non-finite values in \\['prototypes'\\]"):
        load_model(run_dir)


def registered_epoch(run_dir: Path) -> int:
    """Highest epoch among the checkpoints Ray Train has registered (-1 when none yet)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return -1
    return max((c["metrics"]["epoch"] for c in snapshot.get("checkpoint_results", [])), default=-1)


def test_train_and_evaluate_on_cub_mini_shards(ray_local, cub_mini: Path, tmp_path: Path) -> None:
    shards = tmp_path / "cub"
    run_segment(SegmentConfig(source="cub", root=cub_mini, out=shards, masks_per_image=4, crop_size=32,
                              shard_size=32, num_workers=2, cpus_per_worker=0.5), progress=False)
    config = _config(shards, tmp_path / "run", warmup_epochs=0, joint_epochs=1, last_layer_epochs=1)
    config = config.model_copy(update={"num_workers": 1})
    run_train(config)
    result = run_evaluate(tmp_path / "run", shards, "test")
    assert result["n"] == 24 and 0.0 <= result["balanced_accuracy"] <= 1.0 and result["global_size"] >= 1
    assert json.loads((tmp_path / "run" / "metrics_test.json").read_text())["test"] == result


@pytest.mark.slow
@pytest.mark.parametrize(("schedule", "kill_after"), [
    ({"joint_epochs": 8}, 1),  # mid-joint
    # within the last-layer phase, whose weight average (started from the pushed model) the checkpoint must carry
    ({"joint_epochs": 2, "last_layer_epochs": 5, "ema_half_life": 1.0}, 4),
], ids=["joint", "last-layer-averaged"])
def test_killed_worker_resumes_from_checkpoint(shards: Path, tmp_path: Path, schedule: dict, kill_after: int) -> None:
    import contextlib
    import os
    import signal

    import psutil

    run_dir = tmp_path / "run"
    config = _config(shards, run_dir, **schedule)
    epochs = config.schedule.warmup_epochs + config.schedule.joint_epochs + config.schedule.last_layer_epochs
    killed: list[int] = []

    def kill_a_worker() -> None:
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            if registered_epoch(run_dir) >= kill_after:  # Ray Train's controller has taken that epoch's checkpoint
                for proc in psutil.Process().children(recursive=True):  # this test's Ray only, not another job's
                    cmdline: list[str] = []
                    with contextlib.suppress(psutil.NoSuchProcess):
                        cmdline = proc.cmdline()
                    if any("RayTrainWorker" in part for part in cmdline):
                        os.kill(proc.pid, signal.SIGKILL)
                        killed.append(proc.pid)
                        return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_a_worker, daemon=True)
    killer.start()
    result = run_train(config)
    killer.join()
    assert killed, "no Ray Train worker process was found to kill"
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    # epochs completed at the resume: past the checkpoint registered after epoch kill_after, short of the last
    assert any(e["event"] == "resume" and kill_after < e["epoch"] < epochs for e in events)
    assert [int(line.split(",")[0]) for line in (run_dir / "metrics.csv").read_text().splitlines()[1:]] == list(
        range(epochs))
    assert result["test"]["n"] == 12
    # the same run without the kill: data order and augmentation are seeded by (seed, epoch, rank) and
    # the checkpoint holds model, optimisers, scheduler and weight average, so the resumed run ends where it would have
    straight = run_train(_config(shards, tmp_path / "straight", **schedule))
    for metric, value in straight["test"].items():
        if isinstance(value, float):
            assert result["test"][metric] == pytest.approx(value, abs=1e-6), metric
        else:  # counts, the confusion matrix, the head's name
            assert result["test"][metric] == value, metric
    exported, expected = (torch.load(d / "model.pt", weights_only=True) for d in (run_dir, tmp_path / "straight"))
    for name, value in expected.items():
        assert torch.allclose(exported[name], value, atol=1e-6), name


def test_addon_from_classifier_standardises_the_leading_directions(shards: Path) -> None:
    """schedule.addon_init classifier: the add-on's first min(D, C, channels) channels project region
    features onto the classifier's leading singular directions, mean 0 and std 1 over the regions used;
    the other channels stay as they were."""
    from schemas.config import DataConfig
    from training.data import ShardStream
    from training.model import LinearHead
    from training.push import addon_from_classifier

    dataset = ShardDataset.open(shards)
    torch.manual_seed(0)
    model = ProtoMask(ModelConfig(**TINY), dataset.num_classes)
    scorer = LinearHead(model.config, dataset.num_classes, trunk=(model.backbone, model.channels))
    before = model.add_on[0].weight.detach().clone()
    keys = [r["key"] for r in dataset.rows if r["split"] == "train"]
    done = addon_from_classifier(model, scorer, dataset, keys, torch.device("cpu"), batch_size=8)
    r = min(16, dataset.num_classes, model.channels)
    assert done["channels"] == r == 3 and done["images"] == len(keys)
    conv = model.add_on[0]
    assert torch.equal(conv.weight[r:], before[r:])
    stream = ShardStream(dataset, keys, DataConfig(loader_threads=0), input_size=32, batch_size=8, train=False)
    scorer.eval()
    with torch.no_grad():
        pre = torch.cat([(scorer.region_features(b["crops"], b["valid"], 1)[b["valid"]] @ conv.weight[:r, :, 0, 0].T
                          + conv.bias[:r]) for b in stream])
    assert pre.shape[0] == done["regions"]
    assert torch.allclose(pre.mean(0), torch.zeros(r), atol=1e-4) and torch.allclose(pre.std(0), torch.ones(r), atol=1e-4)
    directions = torch.nn.functional.normalize(conv.weight[:r, :, 0, 0].detach(), dim=1)  # singular directions
    assert torch.allclose(directions @ directions.T, torch.eye(r), atol=1e-4)


@pytest.fixture(scope="module")
def one_shape_shards(ray_local, tmp_path_factory) -> Path:
    """One shape per image, no distractors: 3 classes whose whole-image models learn in a few epochs."""
    tmp = tmp_path_factory.mktemp("one_shape")
    segment = SegmentConfig(
        source="synthetic", root=tmp / "syn", out=tmp / "shards", masks_per_image=4, shard_size=16,
        num_workers=1, synthetic={"num_classes": 3, "train_per_class": 24, "test_per_class": 4, "image_size": 64,
                                  "distractors": 0},
    )
    run_segment(segment, progress=False)
    return segment.out.local


RECIPES = {  # the kinds' own terms and phases, at the scale of a test
    "protopnet": ({"separation": 0.08, "diversity": 0.0}, {"prototype_init": "crops", "last_layer_epochs": 2}),
    "protopool": ({"separation": 0.08}, {"last_layer_epochs": 2, "gumbel_epochs": 4}),
    "pipnet": ({"cross_entropy": 2.0}, {"warmup_epochs": 2, "last_layer_epochs": 0, "lr_last_layer": 0.05}),
}


@pytest.mark.parametrize("kind", list(RECIPES))
def test_baselines_learn_and_get_the_papers_metrics(one_shape_shards: Path, tmp_path: Path, kind: str) -> None:
    """ProtoPNet, ProtoPool and PIP-Net through the same loop, push (ProtoPNet only) and metrics (chance: 33 %)."""
    loss, schedule = RECIPES[kind]
    config = TrainConfig.model_validate({
        "shards": one_shape_shards, "run_dir": tmp_path / "run", "num_workers": 1,
        "model": {"kind": kind, "backbone": "convnet", "width": 8, "prototypes_per_class": 2, "prototype_dim": 16,
                  "input_size": 64},
        "loss": loss,
        "schedule": {"pretrain_epochs": 4, "joint_epochs": 6, "lr_backbone": 2e-3, "lr_last_layer": 5e-3,
                     **schedule},
        "data": {"batch_size": 8, "loader_threads": 0, "augment": "flip"}, "seed": 0,
    })
    test = run_train(config, progress=False)["test"]
    assert test["n"] == 12 and test["balanced_accuracy"] >= 0.75
    assert test["relevance"] == "prp"
    for key in ("vlc", "object_overlap", "background_overlap", "consistency", "part_consistency"):
        assert 0.0 <= test[key] <= 1.0, key
    model, _ = load_model(tmp_path / "run")
    if kind == "protopnet":
        push = json.loads((tmp_path / "run" / "push_log.json").read_text())["push"]
        assert len(push) == 6 and all(0 <= e["mask_index"] < 16 for e in push)  # a cell of the 4x4 map (64 px)
    else:
        assert not (tmp_path / "run" / "push_log.json").exists()
    if kind == "protopool":
        assert float(model.gumbel_scale) == 1000.0  # annealed to one-hot within gumbel_epochs
        assert test["global_size"] <= model.num_prototypes
    if kind == "pipnet":
        assert model.last_layer.weight.min().item() >= 0 and model.multiplier.item() >= 1  # after_step clamps
        assert "intra_pd" not in test  # its prototypes are channels: no prototype vectors
    summary = run_explain(tmp_path / "run", None, tmp_path / "explain", limit=2, relevance="prp")
    assert len(summary["explanations"]) == 2 and summary["gallery"]
    assert all(len(e["evidence"]) == 3 for e in summary["explanations"])


def test_frozen_batchnorm_keeps_its_running_statistics() -> None:
    """Warm-up and last-layer epochs: the frozen backbone's BatchNorm normalises with its running statistics,
    unchanged by the epoch; joint epochs train it; parity.train_mode_frozen_batchnorm keeps the reference's."""
    config = _config(Path("s"), Path("r"))
    model = ProtoMask(ModelConfig(**TINY), 3)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    x = torch.rand(2, 4, 3, 32, 32)
    for phase, frozen in (("last_layer", True), ("warmup", True), ("joint", False)):
        set_trainable(model, phase, config)
        model.train()
        freeze_batchnorm_statistics(model)
        before = norms[0].running_mean.clone()
        model(x, torch.ones(2, 4, dtype=torch.bool))
        assert all(not m.training for m in norms) == frozen, phase
        assert torch.equal(norms[0].running_mean, before) == frozen, phase

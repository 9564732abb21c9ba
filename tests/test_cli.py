"""The console script: config precedence, early validation, inspect and verify exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from protomask.cli import main
from schemas.config import ConfigError, SegmentConfig, load_config


def test_flags_override_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("root: /data\nout: /o\nmasks_per_image: 5\nsegmenter: {name: grid, grid: 4}\n")
    config = load_config(SegmentConfig, cfg, {"masks_per_image": 7, "segmenter.name": None, "shard_size": None})
    assert config.masks_per_image == 7 and config.segmenter.name == "grid" and config.segmenter.grid == 4


def test_flags_are_the_shortest_unique_tail_of_the_field() -> None:
    from protomask.flags import _shortest_unique_suffixes

    names = ["masks_per_image", "segmenter.sam.points_per_side", "segmenter.sam2.points_per_side", "seed",
             "synthetic.seed", "a.b.c", "d.b.c"]
    assert _shortest_unique_suffixes(names) == {
        "masks_per_image": "masks_per_image", "segmenter.sam.points_per_side": "sam-points_per_side",
        "segmenter.sam2.points_per_side": "sam2-points_per_side", "seed": "seed", "synthetic.seed": "synthetic-seed",
        "a.b.c": "a-b-c", "d.b.c": "d-b-c"}


def test_preset_file_gives_each_command_its_section(tmp_path: Path) -> None:
    from schemas.config import TrainConfig

    preset = tmp_path / "p.yaml"
    preset.write_text("segment: {source: cub, masks_per_image: 11}\ntrain: {schedule: {step_size: 35}}\n")
    segment = load_config(SegmentConfig, preset, {"root": "/d", "out": "/o"}, section="segment")
    train = load_config(TrainConfig, preset, {"shards": "s", "run_dir": "r"}, section="train")
    assert segment.masks_per_image == 11 and segment.source == "cub" and train.schedule.step_size == 35
    with pytest.raises(ConfigError, match="train"):  # read without a section, the sections are unknown fields
        load_config(SegmentConfig, preset, {"root": "/d", "out": "/o"})


@pytest.mark.parametrize(
    "text,field",
    [
        ("root: /d\nout: /o\nmasks_per_imag: 3\n", "masks_per_imag"),
        ("root: /d\nout: /o\nsegmenter: {name: sam}\n", "checkpoint"),
        ("root: /d\nout: /o\ncrop_size: -1\n", "crop_size"),
        ("root: /d\nout: /o\nsource: listing\n", "listing"),
        ("- a list\n", "mapping"),
    ],
)
def test_invalid_config_names_field_and_writes_nothing(tmp_path: Path, capsys, text: str, field: str) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text.replace("/o", str(tmp_path / "out")))
    with pytest.raises(ConfigError, match=field):
        load_config(SegmentConfig, cfg, {})
    assert main(["segment", "--config", str(cfg), "--no-progress"]) == 2
    assert field in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.ray
def test_segment_inspect_verify_cli(ray_local, tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("synthetic: {num_classes: 2, train_per_class: 4, test_per_class: 2, image_size: 48}\n")
    out = tmp_path / "shards"
    code = main(["segment", "--config", str(cfg), "--root", str(tmp_path / "syn"), "--out", str(out),
                 "--shard-size", "5", "--crop-size", "24", "--num-workers", "2", "--cpus-per-worker", "0.5",
                 "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "12 ok, 0 failed, 12 inputs" in printed and "red_circle" in printed
    assert "masks_per_image: 8" in (out / "_job/segment_config.yaml").read_text()

    assert main(["manifest", "inspect", "--shards", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["shards"] == 3 and summary["per_split"]["train"]["ok"] == 8

    assert main(["manifest", "verify", "--shards", str(out)]) == 0
    assert capsys.readouterr().out.strip().endswith("OK")
    # a reader that stops early (`| head`): the pipe is closed before anything is written; no traceback
    exe = Path(sys.executable).with_name("protomask")
    proc = subprocess.Popen([str(exe), "manifest", "inspect", "--shards", str(out), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    assert proc.wait(timeout=120) == 0 and proc.stderr.read() == ""

    # corrupt one shard (bit flip), truncate another, delete the third: verify names each, exits 1
    data = bytearray((out / "_webdataset/train-00000.tar").read_bytes())
    data[700] ^= 0x01
    (out / "_webdataset/train-00000.tar").write_bytes(bytes(data))
    t = (out / "_webdataset/train-00001.tar").read_bytes()
    (out / "_webdataset/train-00001.tar").write_bytes(t[: len(t) // 2])
    (out / "_webdataset/test-00002.tar").unlink()
    assert main(["manifest", "verify", "--shards", str(out)]) == 1
    report = capsys.readouterr().out
    assert "shard train-00000: " in report and "checksum differs" in report
    assert "shard train-00001: " in report and "shard test-00002: " in report and "missing" in report
    assert "FAILED, " in report


def test_console_script_installed() -> None:
    exe = Path(sys.executable).with_name("protomask")
    result = subprocess.run([str(exe), "segment", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--masks-per-image" in result.stdout


@pytest.mark.parametrize("name", ["small-cpu", "demo", "cub-sam2", "protopnet", "protopool", "pipnet"])
def test_named_configs_validate(name: str) -> None:
    from protomask.cli import config_file
    from schemas.config import TrainConfig

    config = load_config(TrainConfig, config_file(name), {"shards": "s", "run_dir": "r"}, section="train")
    assert config.data.batch_size % 2 == 0  # splits over 1 and 2 workers
    if name in ("protopnet", "protopool", "pipnet"):  # the kind's architecture defaults, the reference's recipe
        assert (config.model.kind, config.model.regions, config.model.prototype_dim) == (name, "patches", 128)
    if name == "small-cpu":  # make bench-real's four rows: ProtoMask, the patch baseline and the two black-boxes
        for head in ("prototypes", "linear"):
            for regions in ("masks", "patches"):
                whole = {"model.crop_margin": 0} if regions == "patches" else {}  # no mask boxes to grow
                load_config(TrainConfig, config_file(name), {"shards": "s", "run_dir": "r", "model.head": head,
                                                             "model.regions": regions, **whole}, section="train")


# spec §2.4: (K, backbone rate, prototype rate, StepLR step) per dataset and segmenter
PAPER = {"cub-sam2": (11, 6e-5, 3e-3, 35), "cub-slit": (8, 9.4e-5, 2.7e-3, 35), "dogs-sam2": (13, 1e-5, 3e-3, 30),
         "dogs-slit": (10, 2.9e-5, 3e-3, 30), "cars-sam2": (16, 6e-5, 2e-3, 35), "cars-slit": (11, 7.3e-5, 3.5e-3, 35)}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_presets_give_the_papers_runs(name: str) -> None:
    """One preset per (dataset, segmenter): the segment section has the segmenter and K, the train section the
    rates and step; a checkpoint flag completes the segment config."""
    from protomask.cli import config_file
    from schemas.config import TrainConfig

    segment = load_config(SegmentConfig, config_file(name), {"root": "/d", "out": "/o", "segmenter.checkpoint": "/m"},
                          section="segment")
    train = load_config(TrainConfig, config_file(name), {"shards": "s", "run_dir": "r"}, section="train")
    k, lr_backbone, lr_prototypes, step = PAPER[name]
    assert segment.segmenter.name == name.split("-")[1] and segment.masks_per_image == k
    assert segment.source == ("cub" if name.startswith("cub") else "imagefolder")
    s = train.schedule
    assert (s.lr_backbone, s.lr_prototypes, s.step_size, s.joint_epochs, s.last_layer_epochs) == (
        lr_backbone, lr_prototypes, step, 100, 10)
    assert train.model.backbone == "resnet50" and train.model.prototype_dim == 1280 and train.data.batch_size == 64


def test_set_flags_and_unknown_config_name(tmp_path: Path, capsys) -> None:
    from protomask.cli import config_file, settings

    assert settings(["model.head=linear", "schedule.lr_backbone=3.0e-4", "use_gpu=true"]) == {
        "model.head": "linear", "schedule.lr_backbone": 3e-4, "use_gpu": True}
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        settings(["model.head"])
    with pytest.raises(ConfigError, match="small-cpu"):  # lists the named configs
        config_file("smal-cpu")
    argv = ["train", "--config", "small-cpu", "--shards", str(tmp_path), "--run-dir", str(tmp_path / "run"),
            "--set", "model.head=nope"]
    assert main(argv) == 2
    assert "model.head" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_flags_follow_the_config_fields() -> None:
    """Every leaf field is a flag; type, choices, help and shown default come from the field; a field name
    two sections share gets its dotted name; only given flags override."""
    import argparse
    from typing import Literal

    from pydantic import Field

    from protomask.flags import add_flags, overrides
    from schemas.config import Strict

    class Inner(Strict):
        mode: Literal["a", "b"] = Field("a", description="which mode")
        rate: float = 1.0

    class Toy(Strict):
        root: Path
        size: int | None = Field(None, description="pixels")
        rate: float = 0.5
        names: list[str] | None = None
        fast: bool = False
        inner: Inner = Inner()

    parser = argparse.ArgumentParser()
    dests = add_flags(parser, Toy, rename={"size": "pixels"})
    text = parser.format_help()
    assert "{a,b}" in text and "which mode; default: a" in text and "--pixels N" in text and "--no-fast" in text
    assert "--rate X" in text and "--inner-rate X" in text and "inner (--set inner.FIELD=...)" in text
    args = parser.parse_args(["--root", "/r", "--mode", "b", "--names", "x", "y", "--fast", "--inner-rate", "2"])
    assert overrides(args, dests) == {"root": Path("/r"), "inner.mode": "b", "names": ["x", "y"], "fast": True,
                                      "inner.rate": 2.0}
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "c"])


def test_every_command_takes_config_and_set_and_prints_a_version(capsys) -> None:
    from protomask.cli import COMMANDS, build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("protomask ")
    for name in COMMANDS:
        with pytest.raises(SystemExit):
            build_parser().parse_args([name, "--help"])
        text = capsys.readouterr().out
        assert "--config" in text and "--set KEY=VALUE" in text, name
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    assert "--augment {reference,flip,none}" in text and "--input-size N" in text and "--joint-epochs N" in text
    assert "--cluster X" in text and "--frozen-addon" in text  # every field, without a list to keep in step


def test_errors_are_one_line_and_write_nothing(tmp_path: Path, capsys) -> None:
    """A failed command prints one line and exits 1 (2 for usage or config); -v raises with the traceback."""
    from training import TrainError

    missing = tmp_path / "missing"
    assert main(["report", "--run-dir", str(missing)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("protomask report: error: ") and "model_config.json" in err
    assert not missing.exists()
    assert main(["evaluate", "--run-dir", str(missing), "--split", "val"]) == 1
    assert "not a finished training run" in capsys.readouterr().err
    assert main(["report", "--run-dir", str(missing), "--names", "a", "b"]) == 2
    assert "names: 2 names for 1 run directories" in capsys.readouterr().err
    with pytest.raises(TrainError):
        main(["-v", "report", "--run-dir", str(missing)])
    with pytest.raises(TrainError):
        main(["report", "-v", "--run-dir", str(missing)])


def test_epoch_line_shows_each_loss_term_of_the_phase() -> None:
    from training.progress import format_epoch

    row = {"epoch": 20, "phase": "joint", "train_loss": 2.5, "train_cross_entropy": 1.4, "train_auxiliary": 1.2,
           "train_cluster": 0.6, "train_separation": 0.5, "train_accuracy": 0.6, "val_balanced_accuracy": 0.5,
           "images_per_s": 180.0}
    assert format_epoch(row, 40) == ("epoch 21/40 joint       loss 2.500  ce 1.400  aux 1.200  clst 0.600  sep 0.500  "
                                     "train 60.0%  val 50.0% balanced  180 img/s")
    pretrain = {"epoch": 0, "phase": "pretrain", "train_loss": 3.4, "train_cross_entropy": 3.4,
                "train_accuracy": 0.07, "images_per_s": 41.0}
    assert format_epoch(pretrain, 40) == "epoch  1/40 pretrain    loss 3.400  train 7.0%  41 img/s"



def test_reporter_tracks_any_pass_with_its_total_and_unit() -> None:
    """Rank 0's progress events for a pass that is not a stream's batches (the test's saliency metrics)."""
    from types import SimpleNamespace

    from training.progress import Reporter

    events: list[dict] = []
    reporter = Reporter(SimpleNamespace(put=SimpleNamespace(remote=events.append)))
    assert list(reporter.track(iter("abc"), "test: saliency metrics", total=3, unit="image")) == ["a", "b", "c"]
    assert events[0] == {"kind": "start", "name": "test: saliency metrics", "total": 3, "unit": "image"}
    assert events[-1] == {"kind": "end", "done": 3}
    assert list(Reporter(None).track(iter("ab"), "elsewhere", total=2)) == ["a", "b"]  # other ranks send nothing

@pytest.mark.slow
def test_train_console_is_one_line_per_epoch(tmp_path: Path) -> None:
    """`protomask train` as a user runs it (its own local Ray): one line per epoch and a summary on stdout,
    none of Ray's or Ray Train's own lines, and nothing on stderr but the notes."""
    from conftest import segment_without_ray

    shards = segment_without_ray(SegmentConfig.model_validate(dict(
        source="synthetic", root=tmp_path / "synthetic", out=tmp_path / "shards", shard_size=8, masks_per_image=4,
        synthetic={"num_classes": 2, "train_per_class": 8, "test_per_class": 3, "image_size": 48})))
    exe = Path(sys.executable).with_name("protomask")
    run = subprocess.run([str(exe), "train", "--config", "demo", "--shards", str(shards), "--run-dir",
                          str(tmp_path / "run"), "--num-workers", "2", "--cpus-per-worker", "0.5", "--warmup-epochs",
                          "1", "--joint-epochs", "2", "--last-layer-epochs", "1", "--batch-size", "8"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [e.split()[1] for e in epochs] == ["1/4", "2/4", "3/4", "4/4"]  # each once
    assert lines[-1].startswith("trained in ") and "metrics_test.json" in lines[-1]
    assert len(lines) <= 8, run.stdout
    noise = ("TrainingReport", "PlacementGroupCleaner", "Checkpoint successfully", "RayTrainWorker", "Traceback",
             "Token authentication")
    assert not any(word in run.stdout + run.stderr for word in noise), run.stderr[-3000:]


@pytest.mark.slow
def test_demo_runs_end_to_end_and_overwrite_replaces_an_older_demo(tmp_path: Path) -> None:
    """`make demo` over a demo folder of another version: refused with the way out named, then replaced with
    --overwrite, end to end (shards verified, both models trained, the report written)."""
    out = tmp_path / "demo"
    (out / "shards" / "_job").mkdir(parents=True)
    (out / "shards" / "_job" / "job.json").write_text(json.dumps({"job_hash": "of-an-older-version"}))
    (out / "run_masks").mkdir()
    (out / "run_masks" / "checkpoint_2026-01-01_00-00-00.000000").mkdir()
    exe = Path(sys.executable).with_name("protomask")
    refused = subprocess.run([str(exe), "demo", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0
    assert "holds shards of a different configuration" in refused.stderr and "--overwrite" in refused.stderr
    assert (out / "run_masks" / "checkpoint_2026-01-01_00-00-00.000000").is_dir()  # nothing removed
    run = subprocess.run([str(exe), "demo", "--out", str(out), "--overwrite"], capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "verify: OK" in run.stdout and "ProtoMask test balanced accuracy" in run.stdout.splitlines()[-1]
    assert not (out / "run_masks" / "checkpoint_2026-01-01_00-00-00.000000").exists()
    assert (out / "report" / "index.html").is_file() and (out / "run_patches" / "model.pt").is_file()

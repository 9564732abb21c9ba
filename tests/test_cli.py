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
    assert "masks_per_image: 8" in (out / "segment_config.yaml").read_text()

    assert main(["manifest", "inspect", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["shards"] == 3 and summary["per_split"]["train"]["ok"] == 8

    assert main(["manifest", "verify", str(out)]) == 0
    assert capsys.readouterr().out.strip().endswith("OK")

    # corrupt one shard (bit flip), truncate another, delete the third: verify names each, exits 1
    data = bytearray((out / "train-00000.tar").read_bytes())
    data[700] ^= 0x01
    (out / "train-00000.tar").write_bytes(bytes(data))
    t = (out / "train-00001.tar").read_bytes()
    (out / "train-00001.tar").write_bytes(t[: len(t) // 2])
    (out / "test-00002.tar").unlink()
    assert main(["manifest", "verify", str(out)]) == 1
    report = capsys.readouterr().out
    assert "shard train-00000: " in report and "checksum differs" in report
    assert "shard train-00001: " in report and "shard test-00002: " in report and "missing" in report
    assert "FAILED, " in report


def test_console_script_installed() -> None:
    exe = Path(sys.executable).with_name("protomask")
    result = subprocess.run([str(exe), "segment", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--masks-per-image" in result.stdout


@pytest.mark.parametrize("name", ["small-cpu", "cub-gpu", "demo"])
def test_named_configs_validate(name: str) -> None:
    from protomask.cli import config_file
    from schemas.config import TrainConfig

    config = load_config(TrainConfig, config_file(name), {"shards": "s", "run_dir": "r"})
    assert config.data.batch_size % 2 == 0  # splits over 1 and 2 workers


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

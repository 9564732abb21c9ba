"""``protomask train``, ``evaluate``, ``explain`` and ``report`` with shards and run directory on S3 (moto's server in
this process, see conftest), all through the command line: the run's files and Ray Train's checkpoints are objects in
the bucket, and a rerun resumes from them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from schemas.storage import Location, list_files, read_text

pytestmark = pytest.mark.ray

TINY = {"backbone": "convnet", "width": 8, "prototypes_per_class": 2, "prototype_dim": 16, "input_size": 32}
PRESET = {  # one file, a section per command
    "segment": {"source": "synthetic", "masks_per_image": 4, "crop_size": 32, "shard_size": 16, "num_workers": 2,
                "cpus_per_worker": 0.5,
                "synthetic": {"num_classes": 2, "train_per_class": 10, "test_per_class": 4, "image_size": 48}},
    "train": {"model": TINY, "num_workers": 2, "cpus_per_worker": 0.5, "seed": 0,
              "schedule": {"warmup_epochs": 1, "joint_epochs": 1, "last_layer_epochs": 1, "lr_backbone": 1e-3},
              "data": {"batch_size": 8, "loader_threads": 0}},
}
COMPARED = ("n", "accuracy", "balanced_accuracy", "top3", "macro_f1", "global_size", "sparsity")


def test_train_evaluate_explain_report_on_s3_and_a_rerun_resumes_from_the_bucket(
        ray_local, bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from protomask.cli import main

    base = Location.parse(bucket)
    shards, run = base / "shards", base / "runs/r1"
    preset = tmp_path / "preset.yaml"
    preset.write_text(json.dumps(PRESET))
    common = ["--config", str(preset)]
    train = ["train", *common, "--shards", str(shards), "--run-dir", str(run), "--no-progress"]
    assert main(["segment", *common, "--root", str(base / "synthetic"), "--out", str(shards), "--no-progress"]) == 0
    assert main(["manifest", "verify", "--shards", str(shards)]) == 0
    capsys.readouterr()

    assert main(["train", *common, "--shards", str(shards), "--run-dir", bucket]) == 1
    assert f"--run-dir {bucket}: name a folder for the run" in capsys.readouterr().err

    assert main(train) == 0
    assert f"model {run / 'model.pt'}" in capsys.readouterr().out
    files = list_files(run)
    assert {"model.pt", "model_config.json", "metrics.csv", "metrics_test.json", "push_log.json", "train_config.yaml",
            "checkpoint_manager_snapshot.json"} <= set(files)
    assert any(name.endswith("/checkpoint.pt") for name in files)  # Ray Train's, in the bucket
    assert any(name.startswith("tensorboard/") and size for name, size in files.items())
    history = read_text(run / "metrics.csv")
    assert len(history.splitlines()) == 1 + 3
    trained = json.loads(read_text(run / "metrics_test.json"))
    assert trained["epochs"] == 3 and trained["test"]["n"] == 8
    assert not Path("s3:").exists() and not (tmp_path / "s3:").exists()  # no URL taken for a local path

    assert main(["evaluate", "--run-dir", str(run)]) == 0  # default shards: the ones it was trained on
    assert f"written to {run / 'metrics_test.json'}" in capsys.readouterr().out
    evaluated = json.loads(read_text(run / "metrics_test.json"))
    for key in COMPARED:
        assert evaluated["test"][key] == pytest.approx(trained["test"][key], abs=1e-6), key
    assert evaluated["epochs"] == 3  # the training run's facts are kept

    explained = base / "explain"
    assert main(["explain", "--run-dir", str(run), "--out", str(explained), "--limit", "2", "--top-k", "1"]) == 0
    summary = json.loads(read_text(explained / "explanations.json"))
    assert set(list_files(explained)) == {"explanations.json", *summary["gallery"],
                                          *(r["png"] for r in summary["explanations"])}
    assert main(["report", "--run-dir", str(run)]) == 2  # the page is local: --out is needed
    assert "--out: the report is written to a local folder" in capsys.readouterr().err
    assert main(["report", "--run-dir", str(run), "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "index.html").read_text()
    assert str(run) in page and str(shards) in page

    assert main(train) == 0  # the same run dir: resumes from the bucket's checkpoint after the last epoch
    events = [json.loads(line) for line in read_text(run / "events.jsonl").splitlines()]
    assert events[-1]["event"] == "resume" and events[-1]["epoch"] == 3
    assert read_text(run / "metrics.csv") == history  # trained nothing
    assert json.loads(read_text(run / "metrics_test.json"))["test"] == trained["test"]

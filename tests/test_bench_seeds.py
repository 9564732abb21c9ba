"""bench/seeds.py and bench/real_photos.py: the statistics over seeds, a wrong setting or a --work that holds
other shards named in one line before anything runs, and segment settings that make other shards."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench.real_photos import segment_config
from bench.seeds import summarise

REPO = Path(__file__).resolve().parents[1]


def test_summary_pairs_protomask_with_each_model_on_shared_seeds() -> None:
    rows = summarise({"ProtoMask": {1: 0.68, 2: 0.70, 3: 0.66, 4: 0.71},
                      "patch baseline": {1: 0.69, 2: 0.69, 3: 0.68},  # seed 4 not run: left out of the pairs
                      "black-box, crops": {1: 0.60}})
    by_row = {r["row"]: r for r in rows}
    assert by_row["ProtoMask"]["seeds"] == 4 and by_row["ProtoMask"]["mean"] == pytest.approx(68.75)
    assert by_row["ProtoMask"]["sd"] == pytest.approx(2.2174, abs=1e-4)
    paired = by_row["ProtoMask − patch baseline"]
    assert paired["seeds"] == 3 and paired["mean"] == pytest.approx(-2 / 3)  # -1, +1, -2 points
    assert paired["sd"] == pytest.approx(1.5275, abs=1e-4)
    assert paired["se"] == pytest.approx(1.5275 / math.sqrt(3), abs=1e-4)
    assert paired["not_lower"] == 1
    one = by_row["ProtoMask − black-box, crops"]
    assert one["seeds"] == 1 and one["mean"] == pytest.approx(8.0) and math.isnan(one["se"])
    assert math.isnan(by_row["black-box, crops"]["sd"])


@pytest.mark.parametrize("script, args, message", [
    ("seeds.py", ["--set", "model.widht=8"], "model.widht: Extra inputs are not permitted"),
    ("seeds.py", ["--segment-set", "segmenter.n_segmnts=24"], "segmenter.n_segmnts: Extra inputs are not permitted"),
    ("seeds.py", ["--segment-set", "masks_per_image=0"], "masks_per_image: Input should be greater than or equal to 1"),
    ("seeds.py", ["--segment-set", "segmenter.n_segments"],
     "--segment-set segmenter.n_segments: expected KEY=VALUE, e.g. segmenter.n_segments=24"),
    ("real_photos.py", ["--config", "smal-cpu"], "--config smal-cpu: no such file, nor a named config"),
    ("real_photos.py", ["--masks-per-image", "0"], "masks_per_image: Input should be greater than or equal to 1"),
])
def test_wrong_setting_is_refused_before_segmenting(tmp_path: Path, script: str, args: list[str], message: str
                                                    ) -> None:
    done = run_bench(script, tmp_path, *args)
    assert message in done.stderr
    assert not (tmp_path / "work" / "shards").exists()


@pytest.mark.parametrize("script", ["seeds.py", "real_photos.py"])
def test_refused_segmentation_is_named(tmp_path: Path, script: str) -> None:
    done = run_bench(script, tmp_path)  # images.txt alone: not a whole CUB layout
    assert f"segmenting {tmp_path / 'cub'} into {tmp_path / 'work' / 'shards'}: " in done.stderr
    assert "image_class_labels.txt: missing (required by the CUB-200-2011 layout)" in done.stderr
    layout = {"images.txt": "1 a/1.jpg\n2 a/2.jpg", "image_class_labels.txt": "1 1\n2 1",
              "train_test_split.txt": "1 1\n2 0", "classes.txt": "1 a"}
    for name, text in layout.items():
        (tmp_path / "cub" / name).write_text(text)
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "shards").write_text("not shards")
    done = run_bench(script, tmp_path)
    assert "shards: exists and is not a directory" in done.stderr
    assert (tmp_path / "work" / "shards").read_text() == "not shards"


def run_bench(script: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Run a bench script on ``tmp_path/cub`` (made with an empty images.txt if missing); it must fail with a
    message, not a traceback."""
    root = tmp_path / "cub"
    if not root.exists():
        root.mkdir()
        (root / "images.txt").write_text("")
    seeds = ["--seeds", "1"] if script == "seeds.py" else []
    done = subprocess.run([sys.executable, str(REPO / "bench" / script), *seeds, "--root", str(root),
                           "--work", str(tmp_path / "work"), *args], capture_output=True, text=True)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    return done


def test_segment_settings_change_the_shards_identity(tmp_path: Path) -> None:
    default = segment_config(tmp_path, tmp_path / "shards", 2)
    coarser = segment_config(tmp_path, tmp_path / "shards", 2, overrides={"segmenter.n_segments": 24})
    assert (default.masks_per_image, default.shard_size, default.cpus_per_worker) == (8, 128, 1.0)
    assert coarser.segmenter.n_segments == 24 and default.segmenter.n_segments != 24
    assert coarser.output_hash() != default.output_hash()  # a sweep's finished runs on other masks are not reused

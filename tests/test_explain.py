"""Explanations: mask-restricted saliency, part hit rate, gallery and explain CLI outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import segment_without_ray

from protomask.cli import main
from schemas.config import ModelConfig, SegmentConfig, TrainConfig
from schemas.shard import SampleRecord
from training.data import ShardDataset, split_keys
from training.explain import explain_sample, overlaps, part_metrics, perturb, read_samples
from training.export import export_model
from training.model import ProtoMask

TINY = ModelConfig(backbone="convnet", width=4, prototype_dim=8, input_size=32, prototypes_per_class=2)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("explain")
    return segment_without_ray(SegmentConfig.model_validate(dict(
        source="synthetic", root=tmp / "synth", out=tmp / "shards", shard_size=8, crop_size=32,
        masks_per_image=4, synthetic={"num_classes": 2, "train_per_class": 4, "test_per_class": 3, "image_size": 64},
    )))


def test_saliency_is_the_matched_mask_only(shards: Path) -> None:
    dataset = ShardDataset.open(shards)
    torch.manual_seed(0)
    model = ProtoMask(TINY, dataset.num_classes).eval()
    (key, members), = read_samples(dataset, [dataset.rows[0]["key"]])
    record = SampleRecord.model_validate_json(members["json"])
    e = explain_sample(model, members, k=3)
    assert e.key == key and len(e.evidence) == 3 and e.saliency.shape == (3, record.height, record.width)
    contributions = [ev.contribution for ev in e.evidence]
    assert contributions == sorted(contributions, reverse=True)
    from training.explain import region_masks

    masks = region_masks(model, members, record)
    for ev, sal in zip(e.evidence, e.saliency):
        assert 0 <= ev.mask_index < record.n_masks
        assert np.array_equal(sal > 0, masks[ev.mask_index])  # zero exactly outside the mask's pixels
        assert sal[~masks[ev.mask_index]].max(initial=0) == 0


@pytest.mark.parametrize("regions", ["masks", "patches"])
def test_relevance_stays_inside_the_matched_region(shards: Path, regions: str) -> None:
    dataset = ShardDataset.open(shards)
    torch.manual_seed(0)
    model = ProtoMask(TINY.model_copy(update={"regions": regions, "patch_grid": 4}), dataset.num_classes).eval()
    (_, members), = read_samples(dataset, [dataset.rows[1]["key"]])
    binary = explain_sample(model, members, k=2)
    rel = explain_sample(model, members, k=2, relevance=True)
    assert [e.prototype for e in rel.evidence] == [e.prototype for e in binary.evidence]
    for r, b in zip(rel.saliency, binary.saliency):
        assert r.min() >= 0 and r[b == 0].max(initial=0) == 0 and r.max() > 0
        assert not np.array_equal(r > 0, b > 0) or len(np.unique(r)) > 2  # graded, not the binary mask


def test_overlap_rule() -> None:
    part = np.zeros((10, 10), bool)
    part[0:4, 0:4] = True  # 16 px
    mask = np.zeros((10, 10), bool)
    mask[0:2, 0:4] = True  # 8 px, all on the part: covers all of the smaller one
    assert overlaps(mask, part)
    mask[:] = False
    mask[3:10, 3:10] = True  # 49 px, 1 px on the part
    assert not overlaps(mask, part)
    assert not overlaps(np.zeros_like(part), part)


def _fake_run(shards: Path, run_dir: Path) -> ProtoMask:
    """An exported untrained model with a push log pointing at real training crops."""
    dataset = ShardDataset.open(shards)
    torch.manual_seed(0)
    model = ProtoMask(TINY, dataset.num_classes)
    run_dir.mkdir()
    config = TrainConfig(shards=shards, run_dir=run_dir, model=TINY)
    export_model(model, config.model, dataset.classes, run_dir, shards=config.shards)
    (run_dir / "train_config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    train = [r for r in dataset.rows if r["split"] == "train"]
    push = [{"prototype": p, "class": int(c), "key": next(r["key"] for r in train if r["label"] == c),
             "mask_index": 0, "distance": 0.0} for p, c in enumerate(model.prototype_class.tolist())]
    (run_dir / "push_log.json").write_text(json.dumps({"push": push}))
    return model


def test_explain_cli_writes_gallery_and_explanations(shards: Path, tmp_path: Path, capsys) -> None:
    _fake_run(shards, tmp_path / "run")
    out = tmp_path / "explain"
    assert main(["explain", "--run-dir", str(tmp_path / "run"), "--shards", str(shards), "--out", str(out),
                 "--limit", "4", "--top-k", "2"]) == 0
    summary = json.loads((out / "explanations.json").read_text())
    assert summary["gallery"] == ["gallery_000_red_circle.png", "gallery_001_green_square.png"]
    assert len(summary["explanations"]) == 4
    assert {r["label"] for r in summary["explanations"]} == {"red_circle", "green_square"}  # classes alternate
    from PIL import Image

    for record in summary["explanations"]:
        assert len(record["evidence"]) == 2
        with Image.open(out / record["png"]) as im:
            assert im.size[0] >= 320 and im.size[1] > 3 * 160
    with Image.open(out / "gallery_000_red_circle.png") as im:
        assert im.size == (256, 2 * 128)
    assert "gallery:" in capsys.readouterr().out


def test_part_metrics(shards: Path, tmp_path: Path) -> None:
    model = _fake_run(shards, tmp_path / "run").eval()
    dataset = ShardDataset.open(shards)
    test = split_keys(dataset, 0.0, 0)["test"]
    result = part_metrics(model, dataset, test, k=2)
    correct = sum(explain_sample(model, m, 1).predicted == explain_sample(model, m, 1).label
                  for _, m in read_samples(dataset, test))
    assert result["part_hit_n"] == correct and 0.0 <= result["part_hit_rate"] <= 1.0
    assert 0.0 < result["part_consistency"] <= 100.0 and 0.0 < result["part_stability"] <= 100.0


def test_perturbed_view_is_fixed_and_different() -> None:
    crops = torch.rand(3, 3, 16, 16)
    a, b = perturb(crops, 7), perturb(crops, 7)
    assert torch.equal(a, b) and not torch.allclose(a, crops) and a.shape == crops.shape


def test_patch_baseline_explanations_use_grid_cells(shards: Path) -> None:
    dataset = ShardDataset.open(shards)
    model = ProtoMask(TINY.model_copy(update={"regions": "patches", "patch_grid": 4}), dataset.num_classes).eval()
    (_, members), = read_samples(dataset, [dataset.rows[0]["key"]])
    e = explain_sample(model, members, k=2)
    assert e.saliency.shape == (2, 64, 64)
    for ev, sal in zip(e.evidence, e.saliency):
        i, j = divmod(ev.mask_index, 4)
        assert sal.sum() == 16 * 16 and sal[i * 16:(i + 1) * 16, j * 16:(j + 1) * 16].all()


def _chromium() -> str | None:
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_renders_in_headless_chromium(shards: Path, tmp_path: Path) -> None:
    """Both runs side by side; every image loads and every link resolves in a real browser."""
    import re
    import subprocess

    from training.report import write_report

    _fake_run(shards, tmp_path / "masks")
    patches = tmp_path / "patches"
    _fake_run(shards, patches)
    meta = json.loads((patches / "model_config.json").read_text())
    meta["model"]["regions"] = "patches"
    (patches / "model_config.json").write_text(json.dumps(meta))
    (patches / "metrics.csv").write_text("epoch,phase,train_loss,val_accuracy\n0,joint,2.0,0.5\n1,joint,1.0,0.75\n")
    page = write_report({"protomask": tmp_path / "masks", "patch baseline": patches}, tmp_path / "report")
    text = page.read_text()
    assert "<th>protomask</th><th>patch baseline</th>" in text and "part_hit_rate" in text
    targets = re.findall(r'(?:src|href)="([^"#][^"]*)"', text)
    assert targets and all((page.parent / t).is_file() for t in targets)  # no broken relative link
    assert "<polyline" in text

    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (make test installs Debian's chromium package)")
    # a copy of the page that records, after load, how many images failed to decode
    probe = page.with_name("probe.html")
    probe.write_text(text.replace("</body>", "<script>window.addEventListener('load',()=>{const i=[...document"
                                  ".images];document.body.dataset.images=i.length;document.body.dataset.broken=i"
                                  ".filter(x=>!x.complete||x.naturalWidth===0).length;});</script></body>"))
    dom = subprocess.run(
        [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
         "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout
    images = int(re.search(r'data-images="(\d+)"', dom).group(1))
    assert images == len(re.findall(r"<img ", text)) and images >= 8
    assert 'data-broken="0"' in dom
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,1600",
                    f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120)
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1200, 1600) and len(set(im.convert("L").getdata())) > 16  # not a blank page

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
from training.data import ShardDataset, decode_sample, split_keys
from training.explain import (FLAG, TILE, explain_sample, ground_truth_object, overlaps, read_samples,
                              region_masks)
from training.export import export_model
from training.interpretability import interpretability_metrics, perturb
from training.metrics import object_overlap
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


@pytest.mark.parametrize(("regions", "crop_margin"), [("masks", 0.0), ("patches", 0.0), ("masks", 0.5)])
def test_relevance_stays_inside_the_matched_region(shards: Path, regions: str, crop_margin: float) -> None:
    """Also with ``model.crop_margin``: the relevance of the grown crop goes back onto the grown box, then the mask."""
    dataset = ShardDataset.open(shards)
    torch.manual_seed(0)
    config = TINY.model_copy(update={"regions": regions, "patch_grid": 4, "crop_margin": crop_margin})
    model = ProtoMask(config, dataset.num_classes).eval()
    (_, members), = read_samples(dataset, [dataset.rows[1]["key"]])
    binary = explain_sample(model, members, k=2)
    rel = explain_sample(model, members, k=2, relevance="gradient")
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
        with Image.open(out / record["png"]) as im:  # the image, then per prototype 3 tiles of TILE px
            assert im.size[0] >= 3 * TILE and im.size[1] >= 3 * TILE
    with Image.open(out / "gallery_000_red_circle.png") as im:  # 2 prototypes: image and crop per row
        assert im.size[0] >= 2 * TILE and im.size[1] >= 2 * TILE
    assert [p["prototype"] for p in summary["prototypes"]] == [0, 1, 2, 3]
    assert "gallery:" in capsys.readouterr().out


def test_push_log_is_renumbered_after_pruning() -> None:
    from training.explain import _after_pruning

    log = {"push": [{"prototype": p, "class": p // 2, "key": str(p), "mask_index": 0, "distance": 0.0}
                    for p in range(4)], "prune": {"pruned": [1], "kept": 3}}
    assert [(e["prototype"], e["key"]) for e in _after_pruning(log)] == [(0, "0"), (1, "2"), (2, "3")]
    assert [e["prototype"] for e in _after_pruning({"push": log["push"]})] == [0, 1, 2, 3]


def test_interpretability_metrics(shards: Path, tmp_path: Path) -> None:
    model = _fake_run(shards, tmp_path / "run").eval()
    dataset = ShardDataset.open(shards)
    test = split_keys(dataset, 0.0, 0)["test"]
    result = interpretability_metrics(model, dataset, test, k=2)
    assert result["relevance"] == "prp"  # the paper's saliency, for a backbone with LRP canonizers
    correct = sum(explain_sample(model, m, 1).predicted == explain_sample(model, m, 1).label
                  for _, m in read_samples(dataset, test))
    assert result["part_hit_n"] == correct and 0.0 <= result["part_hit_rate"] <= 1.0
    for key in ("vlc", "object_overlap", "background_overlap", "consistency", "part_consistency"):
        assert 0.0 <= result[key] <= 1.0, key
    assert 0.0 < result["part_stability"] <= 1.0 and -1.0 <= result["ior"] <= 1.0
    # with the matched region as saliency, Ŝ is the region: object overlap by hand over the top-2 by similarity
    by_region = interpretability_metrics(model, dataset, test, k=2, relevance="mask")
    shares = []
    for _, members in read_samples(dataset, test):
        record = SampleRecord.model_validate_json(members["json"])
        crops, valid, _, _ = decode_sample(members, record.masks_per_image, TINY.input_size, None)
        with torch.no_grad():
            out = model(crops[None], valid[None])
        regions, obj = region_masks(model, members, record), ground_truth_object(members)
        shares += [object_overlap(regions[int(out.nearest_mask[0, p])], obj) for p in out.similarities[0].topk(2).indices]
    assert by_region["object_overlap"] == pytest.approx(sum(shares) / len(shares))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("relevance", ["prp", "gradient"])
def test_saliency_metrics_on_the_gpu_match_the_cpu(shards: Path, tmp_path: Path, relevance: str) -> None:
    model = _fake_run(shards, tmp_path / "run").eval()
    dataset = ShardDataset.open(shards)
    test = split_keys(dataset, 0.0, 0)["test"]
    on_cpu = interpretability_metrics(model, dataset, test, k=2, relevance=relevance)
    on_gpu = interpretability_metrics(model.to("cuda"), dataset, test, k=2, relevance=relevance)
    assert on_gpu.keys() == on_cpu.keys() and on_gpu["part_hit_n"] == on_cpu["part_hit_n"]
    for key in on_cpu.keys() - {"relevance"}:  # float rounding may move a pixel across the 95th percentile
        assert on_gpu[key] == pytest.approx(on_cpu[key], abs=0.02), key
    (_, members), = read_samples(dataset, test[:1])
    assert explain_sample(model, members, 2, relevance=relevance).saliency.shape[0] == 2


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


METRICS = """\
epoch,phase,train_loss,train_cross_entropy,train_cluster,train_accuracy,val_accuracy,val_balanced_accuracy,train_l1
0,warmup,4.0,1.4,2.0,0.25,0.25,0.25,
1,joint,3.0,1.2,1.0,0.5,0.5,0.4,
2,joint,2.0,1.0,0.5,0.75,0.5,0.5,
3,joint,1.5,0.8,0.4,0.875,0.75,0.7,
4,last_layer,1.2,0.7,,0.9,0.75,0.75,0.3
5,last_layer,1.0,0.6,,1.0,1.0,1.0,0.2
"""


@pytest.fixture(scope="module")
def report(shards: Path, tmp_path_factory) -> Path:
    """Two fake runs side by side: "protomask" (three phases in metrics.csv, a run time of 125 s by file times,
    prototype 0 pushed onto a crop of another class) and a "patch baseline" (one phase)."""
    import os

    from training.report import write_report

    tmp = tmp_path_factory.mktemp("report")
    masks, patches = tmp / "masks", tmp / "patches"
    _fake_run(shards, masks)
    log = json.loads((masks / "push_log.json").read_text())
    other = next(r["key"] for r in ShardDataset.open(shards).rows
                 if r["split"] == "train" and r["label"] != log["push"][0]["class"])
    log["push"][0]["key"] = other
    for entry in log["push"]:  # mask 0 of a synthetic image is its background (box: the image), mask 1 a shape
        entry["mask_index"] = 0 if entry["prototype"] == 1 else 1
    (masks / "push_log.json").write_text(json.dumps(log))
    (masks / "metrics.csv").write_text(METRICS)
    start = (masks / "model.pt").stat().st_mtime - 125
    os.utime(masks / "train_config.yaml", (start, start))
    _fake_run(shards, patches)
    meta = json.loads((patches / "model_config.json").read_text())
    meta["model"]["regions"] = "patches"
    (patches / "model_config.json").write_text(json.dumps(meta))
    (patches / "metrics.csv").write_text("epoch,phase,train_loss,val_accuracy\n0,joint,2.0,0.5\n1,joint,1.0,0.75\n")
    return write_report([("protomask", masks), ("patch baseline", patches)], tmp / "out")


def _section(page: Path, run: int) -> str:
    text = page.read_text()
    return text[text.index(f'<section id="run{run}">'):].split("</section>")[0]


def test_report_curves_have_axes_legends_and_phase_bands(report: Path) -> None:
    import re

    charts = re.findall(r"<svg [^>]*class=\"chart\".*?</svg>", _section(report, 0))
    titles = [re.search(r'aria-label="([^"]+)"', c).group(1) for c in charts]
    assert titles == ["accuracy", "train_loss", "train_cross_entropy", "train_cluster", "train_l1"]
    for chart in charts:
        assert re.findall(r'data-phase="(\w+)"', chart) == ["warmup", "joint", "last_layer"]  # one band per phase
        assert re.findall(r'class="xtick"[^>]*>(\d+)<', chart) == ["0", "1", "2", "3", "4", "5"]
        assert ">epoch</text>" in chart and 'class="legend"' in chart and "last_layer</text>" in chart
    accuracy = charts[0]
    assert re.findall(r'class="ytick"[^>]*>([^<]+)<', accuracy) == ["0 %", "20 %", "40 %", "60 %", "80 %", "100 %"]
    assert all(f">{name}</text>" in accuracy for name in ("train_accuracy", "val_accuracy", "val_balanced_accuracy"))
    assert re.findall(r'class="ytick"[^>]*>([^<]+)<', charts[1]) == ["0", "1", "2", "3", "4"]  # train_loss 1.0 … 4.0
    assert charts[3].count("<polyline") == 1  # train_cluster: no value in the last-layer phase
    baseline = re.findall(r'data-phase="(\w+)"', _section(report, 1))
    assert set(baseline) == {"joint"} and len(baseline) == 2  # accuracy and train_loss


def test_report_confusion_matrix_counts_the_test_split(report: Path, shards: Path) -> None:
    import re

    dataset = ShardDataset.open(shards)
    test = split_keys(dataset, 0.1, TrainConfig(shards=shards, run_dir=shards).seed)["test"]
    results = json.loads((report.parent / "results.json").read_text())
    for run, name in enumerate(["protomask", "patch baseline"]):
        section = _section(report, run)
        table = section[section.index('<table class="confusion">'):].split("</table>")[0]
        counts = [[int(c) for c in re.findall(r'data-count="(\d+)"', row)] for row in table.split("</tr>")[1:-1]]
        assert np.array(counts).shape == (2, 2) and np.sum(counts) == len(test) == 6
        assert np.trace(counts) / len(test) == pytest.approx(results[name]["mean"]["accuracy"])  # same predictions
        run_dir = report.parents[1] / ("masks" if run == 0 else "patches")
        assert json.loads((run_dir / "metrics_test.json").read_text())["test"]["confusion"] == counts
        per_class = section[section.index('<table class="per-class">'):].split("</table>")[0]
        shown = [float(v) for v in re.findall(r"<td>([\d.]+)%</td>", per_class)]
        assert len(shown) == 2 and shown == sorted(shown)  # worst first


def test_confusion_of_many_classes_lists_the_most_confused_pairs() -> None:
    from training.report import _confusion_html

    rng = np.random.default_rng(0)
    matrix = np.diag(rng.integers(5, 10, 40)) + (rng.random((40, 40)) < 0.05)
    matrix[3, 7] = 4  # the most confused pair
    classes = [f"class_{i}" for i in range(40)]
    text = _confusion_html(matrix, classes)
    assert 'class="confusion"' not in text and 'class="pairs"' in text
    pairs = text[text.index('class="pairs"'):].split("</table>")[0]
    assert pairs.count("<tr>") == 1 + 10 and "<tr><td>class_3</td><td>class_7</td><td>4</td>" in pairs
    per_class = text[text.index('class="per-class"'):]
    assert per_class.count("<tr>") == 1 + 40
    recall = np.diag(matrix) / matrix.sum(1)
    assert f"<tr><td>{recall.argmin()} class_{recall.argmin()}</td>" in per_class.split("</tr>")[1]


def test_report_lineage_names_the_shards_model_and_code(report: Path, shards: Path) -> None:
    import hashlib

    from schemas.version import CODE_VERSION

    section = _section(report, 0)
    table = section[section.index('<table class="lineage">'):].split("</table>")[0]
    card = json.loads((shards / "_manifest.json").read_text())
    segmenter = card["segmenter"]
    digest = hashlib.sha256((report.parent.parent / "masks" / "model.pt").read_bytes()).hexdigest()
    for field, value in [("shards config_hash", card["config_hash"]), ("model.pt sha256", digest),
                         ("code version (this report)", CODE_VERSION), ("masks per image", "4"),
                         ("segmenter", f'{segmenter["name"]} {json.dumps(segmenter["params"], sort_keys=True)}'),
                         ("run time", "0:02:05 (file times: train_config.yaml written → model.pt written)"),
                         ("epochs per phase", "pretrain 0 · warmup 0 · joint 100 · last_layer 10")]:
        assert f"<tr><th>{field}</th><td><code>{value}</code></td></tr>" in table.replace("&quot;", '"')


def test_report_gallery_flags_a_prototype_pushed_onto_another_class(report: Path) -> None:
    from PIL import Image

    summary = json.loads((report.parent / "run0" / "explanations.json").read_text())
    first, *rest = summary["prototypes"]
    assert first["class"] == "red_circle" and first["source_class"] == "green_square"
    assert "other class" in first["flags"] and not any("other class" in p["flags"] for p in rest)
    whole = [p for p in summary["prototypes"] if p["box_fraction"] >= 0.9]
    assert [p["prototype"] for p in whole] == [1] and all("whole image" in p["flags"] for p in whole)
    assert all(0 < p["box_fraction"] < 0.9 and "whole image" not in p["flags"] for p in summary["prototypes"]
               if p not in whole)
    section = _section(report, 0)
    assert "other class" in section[section.index('<ul class="flagged">'):].split("</ul>")[0].split("</li>")[0]
    assert "p0 (red_circle) pushed onto" in section
    with Image.open(report.parent / "run0" / summary["gallery"][0]) as im:  # the red marker on p0's row
        assert im.convert("RGB").getpixel((24, 60)) == FLAG
    for record in summary["explanations"]:  # the image, then per top prototype (3) a row of 3 tiles of TILE px
        with Image.open(report.parent / "run0" / record["png"]) as im:
            assert im.size[0] >= 3 * TILE and im.size[1] >= 4 * TILE


def test_fonts_fall_back_to_pillows_own(monkeypatch) -> None:
    from PIL import ImageFont

    from training import explain

    bundled = ImageFont.truetype

    def missing(font, *args, **kwargs):  # no font file on the machine; Pillow's own (in memory) still loads
        if isinstance(font, (str, Path)):
            raise OSError("cannot open resource")
        return bundled(font, *args, **kwargs)

    explain._font.cache_clear()
    monkeypatch.setattr(ImageFont, "truetype", missing)
    try:
        assert explain._font(20).getlength("prototype") > explain._font(10).getlength("prototype") > 0
    finally:
        explain._font.cache_clear()


def test_report_renders_in_headless_chromium(report: Path) -> None:
    """Both runs side by side; every image and chart shows and every link resolves in a real browser."""
    import re
    import subprocess

    page = report
    text = page.read_text()
    assert "<th>protomask</th><th>patch baseline</th>" in text and "part_hit_rate" in text
    targets = re.findall(r'(?:src|href)="([^"#][^"]*)"', text)
    assert targets and all((page.parent / t).is_file() for t in targets)  # no broken relative link
    assert "<polyline" in text

    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (make test installs Debian's chromium package)")
    # a copy of the page that records, after load, how many images failed to decode and how many charts show
    probe = page.with_name("probe.html")
    probe.write_text(text.replace("</body>", "<script>window.addEventListener('load',()=>{const i=[...document"
                                  ".images];document.body.dataset.images=i.length;document.body.dataset.broken=i"
                                  ".filter(x=>!x.complete||x.naturalWidth===0).length;document.body.dataset.charts="
                                  "[...document.querySelectorAll('svg.chart')].filter(s=>s.getBBox().width>200)"
                                  ".length;});</script></body>"))
    dom = subprocess.run(
        [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
         "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout
    images = int(re.search(r'data-images="(\d+)"', dom).group(1))
    assert images == len(re.findall(r"<img ", text)) and images >= 8
    assert 'data-broken="0"' in dom
    assert int(re.search(r'data-charts="(\d+)"', dom).group(1)) == text.count('class="chart"') == 5 + 2
    shot = page.with_name("report.png")
    subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,1600",
                    f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120)
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1200, 1600) and len(set(im.convert("L").getdata())) > 16  # not a blank page


def test_report_aggregates_seeds_in_the_papers_layout() -> None:
    from training.report import _metrics_tables, aggregate

    seeds = [{"balanced_accuracy": 0.80, "vlc": 0.5, "global_size": 10, "part_hit_rate": 0.5, "relevance": "prp"},
             {"balanced_accuracy": 0.84, "vlc": 0.7, "global_size": 12, "part_hit_rate": 0.7, "relevance": "prp"}]
    summary = aggregate({"ProtoMask": seeds, "ProtoPNet": seeds[:1]})
    assert summary["ProtoMask"]["mean"]["balanced_accuracy"] == pytest.approx(0.82)
    assert summary["ProtoMask"]["std"]["balanced_accuracy"] == pytest.approx(np.std([0.80, 0.84], ddof=1))
    assert "std" not in summary["ProtoPNet"] and "relevance" not in summary["ProtoMask"]["mean"]
    page = _metrics_tables(summary)
    paper = page[: page.index("</table>")]
    assert '<th colspan="1">general</th><th colspan="1">compactness</th><th colspan="1">contrastivity</th>' in paper
    assert "<th>Accuracy (×100)</th><th>Global Size</th><th>VLC (×100)</th>" in paper
    assert "<td>ProtoMask (2 runs)</td><td>82.0 ± 2.8</td><td>11 ± 1.41</td><td>60.0 ± 14.1</td>" in paper
    assert "<td>ProtoPNet (1 run)</td><td>80.0</td><td>10</td><td>50.0</td>" in paper
    assert "<th>part hit rate (×100)</th>" in paper and "<td>60.0 ± 14.1</td></tr>" in paper  # ours, last
    assert "<tr><td>part_hit_rate</td>" not in page  # not twice


def test_report_of_a_black_box_has_no_gallery(shards: Path, tmp_path: Path) -> None:
    from training.explain import run_explain
    from training.model import LinearHead
    from training.report import write_report

    dataset = ShardDataset.open(shards)
    config = TrainConfig(shards=shards, run_dir=tmp_path / "bb", model=TINY.model_copy(update={"head": "linear"}))
    config.run_dir.local.mkdir()
    export_model(LinearHead(config.model, dataset.num_classes), config.model, dataset.classes, config.run_dir,
                 shards=shards)
    (config.run_dir.local / "train_config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    page = write_report([("black-box", config.run_dir)], tmp_path / "out").read_text()
    section = page[page.index('<section id="run0">'):]
    assert "Test confusion" in section and "Prototype gallery" not in section
    with pytest.raises(ValueError, match="a linear head has no prototypes to explain"):
        run_explain(config.run_dir, shards, tmp_path / "explain")

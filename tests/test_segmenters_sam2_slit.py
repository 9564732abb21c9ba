"""The paper's segmenters: SAM 2 through Meta's sam2 package on a tiny random model, SLIT's boundary → masks
step on hand-made maps and end to end on a tiny random Segformer, and bad checkpoints failing before Ray."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pipeline.segmenters import create_segmenter
from schemas.config import Sam2Params, SegmentConfig, SegmenterConfig, SlitParams

REPO = Path(__file__).resolve().parents[1]
TINY = "pipeline.segmenters.sam2:build_tiny_sam2"
ALL_MASKS = Sam2Params(  # random weights pass no real threshold: keep every candidate
    points_per_side=4, points_per_batch=16, pred_iou_thresh=-1e9, stability_score_thresh=-1e9, box_nms_thresh=1.0,
    crop_n_layers=0, min_mask_region_area=0,
)


@pytest.fixture(scope="module")
def sam2_module() -> types.ModuleType:
    """pipeline.segmenters.sam2 (skips where Meta's sam2 package is not installed)."""
    pytest.importorskip("sam2", reason="sam2 is not installed (README: Install)")
    import pipeline.segmenters.sam2 as module

    return module


@pytest.fixture(scope="module")
def slit_module() -> types.ModuleType:
    """pipeline.segmenters.slit (skips where transformers is not installed)."""
    pytest.importorskip("transformers", reason="transformers is not installed (README: Install)")
    import pipeline.segmenters.slit as module

    return module


@pytest.fixture(scope="module")
def tiny_slit(slit_module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return slit_module.build_tiny_slit(tmp_path_factory.mktemp("slit") / "model")


def _natural(h: int, w: int) -> np.ndarray:
    """Smooth colour gradients plus noise."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], axis=-1)
    return np.clip(base + np.random.default_rng(0).normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def tiny_sam2_256() -> torch.nn.Module:
    """The tiny SAM 2 built at 256 px (a ``segmenter.builder``)."""
    from pipeline.segmenters.sam2 import build_tiny_sam2

    return build_tiny_sam2(256)


# sam2


@pytest.mark.parametrize("builder", [TINY, "test_segmenters_sam2_slit:tiny_sam2_256"])  # built at 128 and 256 px
def test_sam2_tiny_model_all_candidates(sam2_module, builder: str) -> None:
    seg = create_segmenter(SegmenterConfig(name="sam2", builder=builder, device="cpu", sam2=ALL_MASKS))
    proposal = seg(_natural(80, 120))
    assert proposal.masks.shape == (4 * 4 * 3, 80, 120) and proposal.masks.dtype == bool
    assert proposal.scores.shape == (48,) and proposal.scores.dtype == np.float32
    assert seg.name == "sam2" and seg.checkpoint_sha256() is None
    assert seg.params() == {"builder": builder, **ALL_MASKS.model_dump()}


def test_sam2_no_masks_has_image_shape(sam2_module) -> None:
    params = ALL_MASKS.model_copy(update={"pred_iou_thresh": 1e9})
    proposal = create_segmenter(SegmenterConfig(name="sam2", builder=TINY, device="cpu", sam2=params))(_natural(40, 50))
    assert proposal.masks.shape == (0, 40, 50) and proposal.scores.shape == (0,)


def test_sam2_receives_rgb(sam2_module, monkeypatch: pytest.MonkeyPatch) -> None:
    seg = create_segmenter(SegmenterConfig(name="sam2", builder=TINY, device="cpu", sam2=ALL_MASKS))
    predictor = seg.generator.predictor
    seen: list[np.ndarray] = []
    set_image = predictor.set_image

    def spy(image: np.ndarray) -> None:
        seen.append(image.copy())
        set_image(image)

    monkeypatch.setattr(predictor, "set_image", spy)
    image = _natural(64, 64)
    seg(image)
    assert len(seen) == 1 and np.array_equal(seen[0], image)


def test_sam2_batched_encoder_gives_the_library_loops_masks(sam2_module) -> None:
    """Three images with their 1 + 4 crops, encoded 3 inputs per forward (chunks that straddle images), give the
    masks of SAM2AutomaticMaskGenerator.generate one image at a time; bf16 autocast runs on the same path."""
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    params = ALL_MASKS.model_copy(update={"crop_n_layers": 1, "crop_nms_thresh": 1.0})
    config = SegmenterConfig(name="sam2", builder=TINY, device="cpu", sam2=params, batch_size=3, encoder_batch=3)
    images = [_natural(80, 120), _natural(64, 48), _natural(50, 50)]
    seg = create_segmenter(config)
    proposals = seg.propose_batch(images)
    loop = SAM2AutomaticMaskGenerator(seg.generator.predictor.model, output_mode="binary_mask", **params.model_dump())
    loop.predictor._bb_feat_sizes = seg.generator.predictor._bb_feat_sizes  # the tiny model is not 1024 px
    with torch.inference_mode():
        expected = [loop.generate(image) for image in images]
    for proposal, records, image in zip(proposals, expected, images):
        assert proposal.masks.shape == (len(records), *image.shape[:2]) and len(records) >= 16 * 3
        assert all(np.array_equal(m, r["segmentation"]) for m, r in zip(proposal.masks, records))
    bf16 = create_segmenter(config.model_copy(update={"precision": "bf16"}))
    assert [p.masks.shape for p in bf16.propose_batch(images)] == [p.masks.shape for p in proposals]
    assert bf16.params()["precision"] == "bf16" and "precision" not in seg.params()


def test_sam2_defaults_are_the_papers() -> None:
    config = SegmenterConfig(name="sam2", checkpoint=Path("sam2.1_hiera_base_plus.pt"))
    assert config.sam2_model == "sam2.1_hiera_b+"
    assert config.sam2.model_dump() == {
        "points_per_side": 32, "points_per_batch": 512, "pred_iou_thresh": 0.8, "stability_score_thresh": 0.9,
        "stability_score_offset": 0.5, "mask_threshold": 0.0, "box_nms_thresh": 0.7, "crop_n_layers": 2,
        "crop_nms_thresh": 0.7, "crop_overlap_ratio": 512 / 1500, "crop_n_points_downscale_factor": 1,
        "min_mask_region_area": 10, "use_m2m": False, "multimask_output": True}


def test_sam2_params_cover_the_generator(sam2_module) -> None:
    import inspect

    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    ours = set(Sam2Params.model_fields)
    theirs = set(inspect.signature(SAM2AutomaticMaskGenerator.__init__).parameters) - {"self", "kwargs"}
    # model: the segmenter's; point_grids: exclusive with points_per_side; output_mode: binary masks
    assert theirs - ours == {"model", "point_grids", "output_mode"} and ours <= theirs


def test_sam2_checkpoint_is_loaded_and_hashed(sam2_module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = tmp_path / "tiny.pt"
    torch.save({"model": sam2_module.build_tiny_sam2().state_dict()}, ckpt)

    def zeroed_tiny(config_file: str, **_) -> torch.nn.Module:  # the named model; only the file's weights work
        assert config_file == "configs/sam2.1/sam2.1_hiera_t.yaml"
        model = sam2_module.build_tiny_sam2()
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        return model

    monkeypatch.setattr(sam2_module, "build_sam2", zeroed_tiny)
    image = _natural(64, 64)
    loaded = create_segmenter(SegmenterConfig(name="sam2", sam2_model="sam2.1_hiera_t", checkpoint=ckpt, device="cpu",
                                              sam2=ALL_MASKS))
    built = create_segmenter(SegmenterConfig(name="sam2", builder=TINY, device="cpu", sam2=ALL_MASKS))
    a, b = loaded(image), built(image)
    assert np.array_equal(a.masks, b.masks) and np.array_equal(a.scores, b.scores)
    assert loaded.checkpoint_sha256() == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert loaded.params() == {"sam2_model": "sam2.1_hiera_t", **ALL_MASKS.model_dump()}


def test_sam2_bad_checkpoints_name_the_file_and_what_was_expected(sam2_module, tmp_path: Path) -> None:
    def config(ckpt: Path) -> SegmenterConfig:
        return SegmenterConfig(name="sam2", sam2_model="sam2.1_hiera_t", checkpoint=ckpt)

    missing = tmp_path / "nowhere" / "sam2.1_hiera_tiny.pt"
    with pytest.raises(ValueError, match=rf"{missing}: no such file; download the official checkpoint of "
                                         r"sam2.1_hiera_t from https://github.com/facebookresearch/sam2"):
        create_segmenter(config(missing))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"junk\.pt: not a readable checkpoint"):
        create_segmenter(config(tmp_path / "junk.pt"))
    flat = tmp_path / "flat.pt"  # a bare state dict, as torch.save(model.state_dict()) writes
    torch.save(sam2_module.build_tiny_sam2().state_dict(), flat)
    with pytest.raises(ValueError, match=r"flat\.pt: no state dict under 'model'"):
        create_segmenter(config(flat))
    tiny = tmp_path / "tiny.pt"  # keys and shapes of another model
    torch.save({"model": sam2_module.build_tiny_sam2().state_dict()}, tiny)
    with pytest.raises(ValueError, match=r"tiny\.pt is not a sam2.1_hiera_t checkpoint: \d+ of \d+ weights differ, "
                                         r"e\.g\. .*expected \(\d+,.*does segmenter.sam2_model match"):
        create_segmenter(config(tiny))


def test_sam2_requires_checkpoint_or_builder_and_a_known_model() -> None:
    with pytest.raises(ValidationError, match="checkpoint is required for the sam2 segmenter"):
        SegmenterConfig(name="sam2")
    with pytest.raises(ValidationError, match="sam2_model"):
        SegmenterConfig(name="sam2", checkpoint=Path("x.pt"), sam2_model="sam2.1_hiera_xl")


@pytest.mark.parametrize("spec", ["no_colon", "pipeline.segmenters.sam2:nope", "no_such_module_xyz:f"])
def test_sam2_bad_builder(sam2_module, spec: str) -> None:
    with pytest.raises(ValueError, match="segmenter.builder"):
        create_segmenter(SegmenterConfig(name="sam2", builder=spec))


def test_tiny_sam2_is_deterministic_and_leaves_rng_alone(sam2_module) -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = sam2_module.build_tiny_sam2(), sam2_module.build_tiny_sam2()
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# slit: boundary probabilities -> masks


def _masks(boundary: np.ndarray, **kw) -> np.ndarray:
    from pipeline.segmenters.slit import boundary_masks

    return boundary_masks(boundary, **{**SlitParams().model_dump(), **kw})


def test_boundary_line_splits_two_regions_largest_first(slit_module) -> None:
    boundary = np.zeros((7, 9), dtype=np.float32)
    boundary[:, 3] = 0.9  # a vertical boundary: 3 columns left of it, 5 right
    left, right = np.zeros((7, 9), dtype=bool), np.zeros((7, 9), dtype=bool)
    left[:, :3], right[:, 4:] = True, True
    assert np.array_equal(_masks(boundary, boundary_dilation=1), [right, left])
    # the 3x3 ellipse (a cross) widens the line by a pixel on each side
    left[:, 2], right[:, 4] = False, False
    masks = _masks(boundary)
    assert masks.dtype == bool and np.array_equal(masks, [right, left])


def test_boundary_threshold_connectivity_ties_and_cap(slit_module) -> None:
    boundary = np.eye(5, dtype=np.float32) * 0.5  # a diagonal line
    upper, lower = np.triu(np.ones((5, 5), dtype=bool), 1), np.tril(np.ones((5, 5), dtype=bool), -1)
    # 4-neighbours cannot cross the diagonal: two triangles of 10 pixels, the one with the first pixel first
    assert np.array_equal(_masks(boundary, boundary_dilation=1, connectivity=4), [upper, lower])
    assert np.array_equal(_masks(boundary, boundary_dilation=1, connectivity=4, max_masks=1), [upper])
    # 8-neighbours cross it diagonally: one region
    assert np.array_equal(_masks(boundary, boundary_dilation=1, connectivity=8), [upper | lower])
    # a pixel is boundary only above the threshold: at 0.5 the line is not, and the whole map is one mask
    assert np.array_equal(_masks(boundary, boundary_threshold=0.5, boundary_dilation=1), [np.ones((5, 5), bool)])
    assert _masks(np.ones((4, 6), dtype=np.float32)).shape == (0, 4, 6)  # all boundary: no mask


# slit: the model


def test_slit_tiny_model_end_to_end(slit_module, tiny_slit: Path) -> None:
    params = SlitParams(boundary_threshold=0.5)  # random weights predict about 0.5 everywhere
    seg = create_segmenter(SegmenterConfig(name="slit", checkpoint=tiny_slit, device="cpu", slit=params))
    image = _natural(60, 90)
    boundary = seg.boundary(image)
    assert boundary.shape == (60, 90) and boundary.dtype == np.float32 and (boundary > 0).all() and (boundary < 1).all()
    params = params.model_copy(update={"boundary_threshold": float(np.median(boundary))})
    seg = create_segmenter(SegmenterConfig(name="slit", checkpoint=tiny_slit, device="cpu", slit=params))
    proposal = seg(image)
    assert np.array_equal(proposal.masks, slit_module.boundary_masks(boundary, **params.model_dump()))
    areas = proposal.masks.sum(axis=(1, 2))
    assert len(areas) >= 2 and (np.diff(areas) <= 0).all() and (proposal.masks.sum(axis=0) <= 1).all()
    assert proposal.scores.dtype == np.float32 and (proposal.scores == 1.0).all()
    assert seg.name == "slit" and seg.params() == {"input_size": {"height": 64, "width": 64}, **params.model_dump()}
    assert seg.checkpoint_sha256() == hashlib.sha256((tiny_slit / "model.safetensors").read_bytes()).hexdigest()


def _break(folder: Path, problem: str) -> None:
    """Spoil a copy of the tiny model folder."""
    config = json.loads((folder / "config.json").read_text())
    if problem == "no config.json":
        (folder / "config.json").unlink()
    elif problem == "no weights":
        (folder / "model.safetensors").unlink()
    elif problem == "garbage weights":
        (folder / "model.safetensors").write_bytes(b"garbage")
    elif problem == "other shapes":
        (folder / "config.json").write_text(json.dumps({**config, "hidden_sizes": [8, 32]}))
    elif problem == "not a boundary model":
        labels = {"num_labels": 3, "id2label": {str(i): str(i) for i in range(3)},
                  "label2id": {str(i): i for i in range(3)}}
        (folder / "config.json").write_text(json.dumps({**config, **labels}))
    elif problem == "unreadable config":
        (folder / "config.json").write_text("{not json")


@pytest.mark.parametrize(("problem", "expected"), [
    ("missing folder", "no such folder"),
    ("no config.json", "no config.json"),
    ("no weights", "no model.safetensors or pytorch_model.bin"),
    ("garbage weights", "not loadable"),
    ("other shapes", r"model.safetensors does not hold the weights of the segformer model config.json describes: "
                     r"0 missing, \d+ of another shape, e.g. .*: shape \(16, 16\), expected \(16, 32\)"),
    ("not a boundary model", "a boundary model has one output channel, this segformer model has 3"),
    ("unreadable config", "not loadable"),
])
def test_slit_bad_folders_name_the_path_and_what_was_expected(slit_module, tiny_slit: Path, tmp_path: Path,
                                                               problem: str, expected: str) -> None:
    import shutil

    folder = tmp_path / "model"
    if problem != "missing folder":
        shutil.copytree(tiny_slit, folder)
        _break(folder, problem)
    with pytest.raises(ValueError, match=rf"SLIT model folder {folder}: {expected}.*expected a folder with "
                                         "config.json, preprocessor_config.json and model.safetensors"):
        create_segmenter(SegmenterConfig(name="slit", checkpoint=folder))


def test_slit_requires_a_folder() -> None:
    with pytest.raises(ValidationError, match="checkpoint is required for the slit segmenter"):
        SegmenterConfig(name="slit", builder=TINY)  # a builder is sam's and sam2's


# the job


def test_sam2_and_slit_settings_change_only_their_own_shards(tmp_path: Path) -> None:
    """They are in the config hash of sam2 and slit jobs only, so shards written before they existed resume."""
    def job_hash(**segmenter) -> str:
        return SegmentConfig(root=tmp_path, out=tmp_path / "out", segmenter=segmenter).output_hash()

    assert job_hash(sam2_model="sam2_hiera_t", sam2={"crop_n_layers": 0}, slit={"max_masks": 9}) == job_hash()
    sam2, slit = {"name": "sam2", "checkpoint": "m.pt"}, {"name": "slit", "checkpoint": "m"}
    hashes = {job_hash(**sam2), job_hash(**sam2, sam2_model="sam2_hiera_t"), job_hash(**sam2, sam2={"use_m2m": True})}
    assert len(hashes) == 3
    assert job_hash(**slit) != job_hash(**slit, slit={"boundary_threshold": 0.01})


def _segment_config(tmp_path: Path, segmenter: dict) -> SegmentConfig:
    return SegmentConfig.model_validate(dict(
        source="synthetic", root=tmp_path / "syn", out=tmp_path / "out", shard_size=8, masks_per_image=4,
        synthetic={"num_classes": 2, "train_per_class": 2, "test_per_class": 1, "image_size": 48},
        segmenter=segmenter))


@pytest.mark.parametrize(("name", "problem"), [("sam2", "missing"), ("sam2", "other model"), ("slit", "missing"),
                                               ("slit", "other model")])
def test_bad_checkpoint_fails_before_ray_and_writes_nothing(request: pytest.FixtureRequest, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch, name: str,
                                                            problem: str) -> None:
    """A missing or mismatched checkpoint is found on the driver: one error naming it and what was expected, Ray
    never started, nothing in --out."""
    import pipeline.job
    from pipeline.job import JobError, run_segment

    def no_ray(address: str | None) -> None:
        raise AssertionError("Ray was started")

    monkeypatch.setattr(pipeline.job, "init_ray", no_ray)
    module = request.getfixturevalue(f"{name}_module")
    if name == "sam2":
        ckpt = tmp_path / "sam2.1_hiera_base_plus.pt"
        if problem == "other model":
            torch.save({"model": module.build_tiny_sam2().state_dict()}, ckpt)
        expected = "no such file" if problem == "missing" else "is not a sam2.1_hiera_b\\+ checkpoint"
    else:
        ckpt = tmp_path / "DirectSAM"
        if problem == "other model":
            module.build_tiny_slit(ckpt)
            _break(ckpt, "not a boundary model")
        expected = "no such folder" if problem == "missing" else "a boundary model has one output channel"
    config = _segment_config(tmp_path, {"name": name, "checkpoint": ckpt})
    with pytest.raises(JobError, match=f"segmenter {name}: .*{ckpt}.*{expected}"):
        run_segment(config, progress=False)
    assert not config.out.local.exists()


def test_slit_shards_without_ray(slit_module, tiny_slit: Path, tmp_path: Path) -> None:
    """The worker's path (decode, segment, select, write) and the manifest with the tiny SLIT model."""
    from conftest import segment_without_ray

    from pipeline.manifest import inspect, verify

    # on these flat-coloured images the random model's boundary map varies little: its median splits them
    segmenter = {"name": "slit", "checkpoint": tiny_slit, "device": "cpu", "slit": {"boundary_threshold": 0.49997}}
    out = segment_without_ray(_segment_config(tmp_path, segmenter))
    assert verify(out) == []
    summary = inspect(out)
    assert summary["samples"] == {"inputs": 6, "ok": 6, "failed": 0}
    assert summary["segmenter"]["name"] == "slit" and summary["segmenter"]["params"]["boundary_threshold"] == 0.49997


@pytest.mark.ray
def test_sam2_segment_cli_end_to_end(sam2_module, ray_local, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`protomask segment --segmenter sam2` with the tiny builder, through Ray, into shards that verify accepts,
    with the segmenter's name and settings in the manifest."""
    from pipeline.manifest import inspect
    from protomask.cli import main

    out = tmp_path / "out"
    thresholds = ["segmenter.sam2.pred_iou_thresh=-1e9", "segmenter.sam2.stability_score_thresh=-1e9",
                  "segmenter.sam2.box_nms_thresh=1.0"]
    code = main(["segment", "--source", "synthetic", "--root", str(tmp_path / "syn"), "--out", str(out),
                 "--num-classes", "2", "--train-per-class", "2", "--test-per-class", "1", "--image-size", "48",
                 "--segmenter", "sam2", "--builder", TINY, "--device", "cpu", "--sam2-points-per-side", "2",
                 "--sam2-crop-n-layers", "0", "--masks-per-image", "4", "--num-workers", "1",
                 "--no-progress", *[x for t in thresholds for x in ("--set", t)]])
    assert code == 0, capsys.readouterr().err
    assert "6 ok, 0 failed, 6 inputs" in capsys.readouterr().out
    assert main(["manifest", "verify", "--shards", str(out)]) == 0
    segmenter = inspect(out)["segmenter"]
    assert segmenter["name"] == "sam2" and segmenter["checkpoint_sha256"] is None
    assert segmenter["params"]["builder"] == TINY and segmenter["params"]["points_per_side"] == 2
    assert segmenter["params"]["pred_iou_thresh"] == -1e9 and segmenter["params"]["crop_n_layers"] == 0


@pytest.mark.ray
def test_slit_segment_cli_end_to_end(slit_module, tiny_slit: Path, ray_local, tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    """`protomask segment --segmenter slit --checkpoint FOLDER`, through Ray, into shards that verify accepts, with
    the weight file's sha256 in the manifest."""
    from pipeline.manifest import inspect
    from protomask.cli import main

    out = tmp_path / "out"
    code = main(["segment", "--source", "synthetic", "--root", str(tmp_path / "syn"), "--out", str(out),
                 "--num-classes", "2", "--train-per-class", "2", "--test-per-class", "1", "--image-size", "48",
                 "--segmenter", "slit", "--checkpoint", str(tiny_slit), "--device", "cpu",
                 "--boundary-threshold", "0.49997", "--masks-per-image", "4", "--num-workers", "1", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert "6 ok, 0 failed, 6 inputs" in capsys.readouterr().out
    assert main(["manifest", "verify", "--shards", str(out)]) == 0
    segmenter = inspect(out)["segmenter"]
    weights = hashlib.sha256((tiny_slit / "model.safetensors").read_bytes()).hexdigest()
    assert segmenter["name"] == "slit" and segmenter["checkpoint_sha256"] == weights


def test_segment_help_lists_the_new_segmenters_and_settings(capsys: pytest.CaptureFixture) -> None:
    from protomask.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["segment", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--segmenter {superpixel,sam,sam2,slit,grid}" in text
    assert "--sam2-model {sam2.1_hiera_t,sam2.1_hiera_s,sam2.1_hiera_b+,sam2.1_hiera_l," in text
    assert "segmenter.sam2 (--set segmenter.sam2.FIELD=...)" in text
    assert "--sam2-crop-n-layers N default: 2" in text
    assert "segmenter.slit (--set segmenter.slit.FIELD=...)" in text
    assert "--boundary-threshold X boundary probability above which a pixel is boundary; default: 0.001" in text


@pytest.mark.parametrize(("name", "package", "expected"), [("sam2", "sam2", "make install"),
                                                          ("slit", "transformers", "pip install 'transformers")])
def test_missing_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str,
                                              package: str, expected: str) -> None:
    for module in [m for m in sys.modules if m.partition(".")[0] == package] or [package]:
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    monkeypatch.delitem(sys.modules, f"pipeline.segmenters.{name}", raising=False)
    with pytest.raises(ImportError, match=f"the {name} segmenter needs .*{expected}"):
        create_segmenter(SegmenterConfig(name=name, checkpoint=tmp_path))


def test_our_training_package_is_not_shadowed(tmp_path: Path) -> None:
    """sam2 1.1.0 also installs SAM 2's training code as a top-level ``training`` package (make deletes it):
    outside the repository, ``training`` must still be protomask's."""
    code = "import training; print(training.__file__)"
    found = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert Path(found.stdout.strip()) == REPO / "training" / "__init__.py"


def test_sam2_and_slit_are_imported_only_when_used() -> None:
    code = ("import sys, pipeline.segmenters; "
            "assert not {'sam2', 'transformers', 'hydra'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)

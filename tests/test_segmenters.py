"""Segmenters: superpixel finds flat-coloured regions, grid tiles, SAM runs the real generator on a tiny model."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pipeline.segmenters import Proposal, create_segmenter
from schemas.config import SamParams, SegmenterConfig

REPO = Path(__file__).resolve().parents[1]
TINY = "pipeline.segmenters.sam:build_tiny_sam"
ALL_MASKS = SamParams(  # random weights pass no real threshold: keep every candidate (docs/stack.md §2)
    points_per_side=4, pred_iou_thresh=-1e9, stability_score_thresh=-1e9, box_nms_thresh=1.0, crop_n_layers=0
)


def _square(h: int, w: int, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A red rectangle (y0, y1, x0, x1) on a blue background, and its mask."""
    image = np.zeros((h, w, 3), dtype=np.uint8)
    image[..., 2] = 200
    y0, y1, x0, x1 = box
    image[y0:y1, x0:x1] = (220, 20, 20)
    truth = np.zeros((h, w), dtype=bool)
    truth[y0:y1, x0:x1] = True
    return image, truth


def _best_iou(masks: np.ndarray, truth: np.ndarray) -> float:
    inter = (masks & truth).sum(axis=(1, 2))
    union = (masks | truth).sum(axis=(1, 2))
    return float((inter / union).max())


def _assert_partition(proposal: Proposal, shape: tuple[int, int]) -> None:
    masks = proposal.masks
    assert masks.dtype == bool and masks.shape[1:] == shape
    assert proposal.scores.shape == (len(masks),) and proposal.scores.dtype == np.float32
    assert (masks.sum(axis=0) == 1).all()


def _natural(h: int = 96, w: int = 128) -> np.ndarray:
    """Smooth colour gradients plus noise: many regions, nothing degenerate."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], axis=-1)
    noise = np.random.default_rng(0).normal(0, 12, (h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


# superpixel


@pytest.mark.parametrize("shape", [(128, 128), (300, 500)])  # the second is downscaled to work_side and back
def test_superpixel_finds_red_square(shape: tuple[int, int]) -> None:
    h, w = shape
    image, truth = _square(h, w, (h // 3, 2 * h // 3, w // 3, 2 * w // 3))
    proposal = create_segmenter(SegmenterConfig())(image)
    _assert_partition(proposal, shape)
    assert _best_iou(proposal.masks, truth) > 0.9
    assert (proposal.scores == 1.0).all()


@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (3, 7), (7, 3), (1, 40)])
def test_superpixel_tiny_images(shape: tuple[int, int]) -> None:
    image = np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)
    proposal = create_segmenter(SegmenterConfig())(image)
    assert len(proposal.masks) >= 1
    _assert_partition(proposal, shape)


def test_superpixel_grayscale_and_flat() -> None:
    gray = _natural()[..., :1].repeat(3, axis=-1)
    _assert_partition(create_segmenter(SegmenterConfig())(gray), gray.shape[:2])
    flat = np.full((50, 60, 3), 128, dtype=np.uint8)
    proposal = create_segmenter(SegmenterConfig())(flat)
    assert len(proposal.masks) == 1 and proposal.masks.all()


def test_superpixel_deterministic() -> None:
    image = _natural()
    a = create_segmenter(SegmenterConfig())(image)
    b = create_segmenter(SegmenterConfig())(image)
    assert len(a.masks) > 1 and np.array_equal(a.masks, b.masks)


def test_superpixel_merge_levels_propose_wholes_besides_parts() -> None:
    image, body = _square(96, 128, (20, 76, 20, 108))  # red body on blue
    image[20:76, 20:50] = (220, 80, 20)  # an orange head: 60 from the body, far from the background
    head = np.zeros_like(body)
    head[20:76, 20:50] = True
    flat = create_segmenter(SegmenterConfig())(image)
    _assert_partition(flat, body.shape)
    assert _best_iou(flat.masks, body) < 0.7  # at merge_threshold 28 the bird comes in two parts only
    segmenter = create_segmenter(SegmenterConfig(merge_levels=[70.0, 80.0]))
    nested = segmenter(image)
    assert np.array_equal(nested.masks[: len(flat.masks)], flat.masks)  # the finest level first, unchanged
    assert _best_iou(nested.masks, body) > 0.95 and _best_iou(nested.masks, head) > 0.95
    assert len(nested.masks) == len(flat.masks) + 1  # only the merged bird is new; level 80 adds nothing
    assert segmenter.params()["merge_levels"] == [70.0, 80.0]
    assert "merge_levels" not in create_segmenter(SegmenterConfig()).params()  # older shard folders still resume


def test_superpixel_rag_matches_skimage() -> None:
    from skimage import graph
    from skimage.segmentation import slic

    from pipeline.segmenters.superpixel import mean_color_rag

    image = _natural()
    labels = slic(image, n_segments=48, compactness=10.0, start_label=0, channel_axis=-1)
    ours, ref = mean_color_rag(image, labels), graph.rag_mean_color(image, labels)
    weights = {frozenset((u, v)): d["weight"] for u, v, d in ref.edges(data=True)}
    assert {frozenset((u, v)): pytest.approx(d["weight"]) for u, v, d in ours.edges(data=True)} == weights


# grid


@pytest.mark.parametrize(("shape", "grid"), [((10, 7), 3), ((128, 128), 4), ((5, 9), 1)])
def test_grid_partitions(shape: tuple[int, int], grid: int) -> None:
    seg = create_segmenter(SegmenterConfig(name="grid", grid=grid))
    proposal = seg(np.zeros((*shape, 3), dtype=np.uint8))
    assert len(proposal.masks) == grid * grid
    _assert_partition(proposal, shape)
    assert seg.params() == {"grid": grid} and seg.checkpoint_sha256() is None


def test_grid_tiny_image_skips_empty_patches() -> None:
    proposal = create_segmenter(SegmenterConfig(name="grid", grid=3))(np.zeros((2, 2, 3), dtype=np.uint8))
    assert 1 <= len(proposal.masks) < 9 and proposal.masks.any(axis=(1, 2)).all()
    _assert_partition(proposal, (2, 2))


# sam


def test_sam_tiny_model_all_candidates() -> None:
    seg = create_segmenter(SegmenterConfig(name="sam", builder=TINY, device="cpu", sam=ALL_MASKS))
    image = _natural(80, 120)
    proposal = seg(image)
    assert proposal.masks.shape == (4 * 4 * 3, 80, 120) and proposal.masks.dtype == bool
    assert proposal.scores.shape == (48,) and proposal.scores.dtype == np.float32
    assert seg.name == "sam" and seg.checkpoint_sha256() is None
    assert seg.params() == {"builder": TINY, **ALL_MASKS.model_dump()}


def test_sam_batched_encoder_gives_the_library_loops_masks() -> None:
    """Three images of different sizes, each with its 1 + 4 crops, in encoder forwards of 3 inputs (chunks that
    straddle images): the masks of SamAutomaticMaskGenerator.generate, one image at a time."""
    from segment_anything import SamAutomaticMaskGenerator

    params = ALL_MASKS.model_copy(update={"crop_n_layers": 1, "crop_nms_thresh": 1.0})
    seg = create_segmenter(SegmenterConfig(name="sam", builder=TINY, device="cpu", sam=params, batch_size=3,
                                           encoder_batch=3))
    images = [_natural(80, 120), _natural(64, 48), _natural(50, 50)]
    proposals = seg.propose_batch(images)
    loop = SamAutomaticMaskGenerator(seg.generator.predictor.model, output_mode="binary_mask", **params.model_dump())
    with torch.inference_mode():
        expected = [loop.generate(image) for image in images]
    for proposal, records, image in zip(proposals, expected, images):
        assert proposal.masks.shape == (len(records), *image.shape[:2]) and len(records) >= 16 * 3
        assert all(np.array_equal(m, r["segmentation"]) for m, r in zip(proposal.masks, records))
        assert np.allclose(proposal.scores, [r["predicted_iou"] for r in records], atol=1e-5)
    # mask generation on a second thread while the next inputs are encoded (what a GPU worker does)
    from pipeline.segmenters.batched import generate_batch

    with torch.inference_mode():
        overlapped = generate_batch(seg.generator, images, encoder_batch=3, overlap=True)
    for got, records in zip(overlapped, expected):
        assert len(got) == len(records)
        assert all(np.array_equal(a["segmentation"], r["segmentation"]) for a, r in zip(got, records))


def test_sam_no_masks_has_image_shape() -> None:
    params = ALL_MASKS.model_copy(update={"pred_iou_thresh": 1e9})
    proposal = create_segmenter(SegmenterConfig(name="sam", builder=TINY, device="cpu", sam=params))(_natural(40, 50))
    assert proposal.masks.shape == (0, 40, 50) and proposal.scores.shape == (0,)


def test_sam_receives_rgb(monkeypatch: pytest.MonkeyPatch) -> None:
    seg = create_segmenter(SegmenterConfig(name="sam", builder=TINY, device="cpu", sam=ALL_MASKS))
    predictor = seg.generator.predictor
    seen: list[tuple[np.ndarray, str]] = []
    set_image = predictor.set_image

    def spy(image: np.ndarray, image_format: str = "RGB") -> None:
        seen.append((image.copy(), image_format))
        set_image(image, image_format)

    monkeypatch.setattr(predictor, "set_image", spy)
    image = _natural(64, 64)
    seg(image)
    assert len(seen) == 1
    fed, fmt = seen[0]
    assert fmt == predictor.model.image_format == "RGB"
    assert np.array_equal(fed, image) and not np.array_equal(fed, image[..., ::-1])


def test_sam_checkpoint_is_loaded_and_hashed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.segmenters.sam as sam_module

    ckpt = tmp_path / "tiny.pth"
    torch.save(sam_module.build_tiny_sam().state_dict(), ckpt)

    def zeroed_tiny(checkpoint: None = None) -> torch.nn.Module:  # stands in for vit_b; only the file's weights work
        model = sam_module.build_tiny_sam()
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        return model

    monkeypatch.setitem(sam_module.sam_model_registry, "vit_b", zeroed_tiny)
    image = _natural(64, 64)
    loaded = create_segmenter(SegmenterConfig(name="sam", model_type="vit_b", checkpoint=ckpt, device="cpu", sam=ALL_MASKS))
    built = create_segmenter(SegmenterConfig(name="sam", builder=TINY, device="cpu", sam=ALL_MASKS))
    a, b = loaded(image), built(image)
    assert np.array_equal(a.masks, b.masks) and np.array_equal(a.scores, b.scores)
    assert loaded.checkpoint_sha256() == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert loaded.params()["model_type"] == "vit_b" and "builder" not in loaded.params()


def test_sam_wrong_checkpoint_names_file(tmp_path: Path) -> None:
    from pipeline.segmenters.sam import build_tiny_sam

    ckpt = tmp_path / "tiny.pth"
    torch.save(build_tiny_sam().state_dict(), ckpt)
    with pytest.raises(ValueError, match=r"tiny\.pth is not a SAM vit_b checkpoint: 305 of 314 weights differ, .*expected \(768,\)"):
        create_segmenter(SegmenterConfig(name="sam", model_type="vit_b", checkpoint=ckpt, device="cpu"))
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"junk\.pth: not a readable checkpoint"):
        create_segmenter(SegmenterConfig(name="sam", checkpoint=tmp_path / "junk.pth"))


def test_checkpoint_weights_compared_both_ways() -> None:
    from pipeline.segmenters.batched import check_weights

    expected = {"a": torch.Size([2]), "b": torch.Size([3])}
    check_weights({"a": torch.zeros(2), "b": torch.zeros(3), "step": 5}, expected, "x.pt is not a M checkpoint",
                  "segmenter.f")  # entries that are not tensors are not weights
    with pytest.raises(ValueError, match=r"^x\.pt is not a M checkpoint: 1 of 3 weights differ, e\.g\. "
                                         r"c: shape \(1,\), not in the model "
                                         r"\(does segmenter\.f match the file\?\)$"):
        check_weights({"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(1)}, expected,
                      "x.pt is not a M checkpoint", "segmenter.f")
    with pytest.raises(ValueError, match=r": 2 of 2 weights differ, e\.g\. a: missing, expected \(2,\)"):
        check_weights({"b": torch.zeros(4)}, expected, "x.pt is not a M checkpoint", "segmenter.f")


def test_sam_missing_checkpoint_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "sam_vit_h.pth"
    with pytest.raises(ValueError, match="segment-anything") as err:
        create_segmenter(SegmenterConfig(name="sam", checkpoint=missing))
    assert str(missing) in str(err.value)


def test_sam_requires_checkpoint_or_builder() -> None:
    with pytest.raises(ValidationError, match="checkpoint"):
        SegmenterConfig(name="sam")


@pytest.mark.parametrize("spec", ["no_colon", "pipeline.segmenters.sam:nope", "no_such_module_xyz:f"])
def test_sam_bad_builder(spec: str) -> None:
    with pytest.raises(ValueError, match="segmenter.builder"):
        create_segmenter(SegmenterConfig(name="sam", builder=spec))


def test_tiny_sam_is_deterministic_and_leaves_rng_alone() -> None:
    from pipeline.segmenters.sam import build_tiny_sam

    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = build_tiny_sam(), build_tiny_sam()
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# factory


def test_factory_names_and_lazy_sam_import() -> None:
    for name in ("superpixel", "grid"):
        seg = create_segmenter(SegmenterConfig(name=name))
        assert seg.name == name and seg.checkpoint_sha256() is None and seg.params()
    code = "import sys, pipeline.segmenters; assert 'segment_anything' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)

"""Segment Anything (v1) automatic mask generation as a segmenter.

The model is built on the first call, not in the constructor, so that reading ``params()`` and
``checkpoint_sha256()`` (the driver does this for the manifest) loads no weights.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import cached_property, partial
from pathlib import Path

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator, sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from pipeline.segmenters.base import Proposal
from schemas.config import SegmenterConfig
from schemas.files import sha256_file

CHECKPOINTS_URL = "https://github.com/facebookresearch/segment-anything#model-checkpoints"


class SamSegmenter:
    """``SamAutomaticMaskGenerator`` with the config's ``SamParams``; scores are the predicted IoU."""

    name = "sam"

    def __init__(self, config: SegmenterConfig) -> None:
        self.config = config
        self._builder = _resolve_builder(config.builder) if config.builder else None
        self._checkpoint = None if self._builder else config.checkpoint
        if self._checkpoint is not None:
            check_checkpoint(Path(self._checkpoint), config.model_type)
        if config.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            self.device = config.device

    @cached_property
    def generator(self) -> SamAutomaticMaskGenerator:
        """The mask generator around the model (built and moved to the device on first use)."""
        if self._builder is not None:
            model = self._builder()
        else:
            model = sam_model_registry[self.config.model_type](checkpoint=None)
            state = torch.load(self._checkpoint, map_location="cpu", weights_only=True)
            try:
                model.load_state_dict(state)
            except RuntimeError as exc:
                raise ValueError(
                    f"{self._checkpoint} is not a SAM {self.config.model_type} checkpoint "
                    f"(does segmenter.model_type match the file?): {exc}"
                ) from exc
        model.to(self.device).eval()
        return SamAutomaticMaskGenerator(model, output_mode="binary_mask", **self.config.sam.model_dump())

    def __call__(self, image: np.ndarray) -> Proposal:
        # The image is RGB and SAM expects RGB (predictor.set_image's default image_format). The reference
        # implementation passed cv2's BGR array here, a channel-order bug that this pipeline does not reproduce.
        with torch.inference_mode():
            records = self.generator.generate(image)
        h, w = image.shape[:2]
        if not records:
            return Proposal(masks=np.zeros((0, h, w), dtype=bool), scores=np.zeros(0, dtype=np.float32))
        masks = np.stack([r["segmentation"] for r in records]).astype(bool, copy=False)
        scores = np.array([r["predicted_iou"] for r in records], dtype=np.float32)
        return Proposal(masks=masks, scores=scores)

    def params(self) -> dict:
        model = {"builder": self.config.builder} if self._builder else {"model_type": self.config.model_type}
        return {**model, **self.config.sam.model_dump()}

    def checkpoint_sha256(self) -> str | None:
        return self._sha256

    @cached_property
    def _sha256(self) -> str | None:
        return None if self._checkpoint is None else sha256_file(Path(self._checkpoint))


def check_checkpoint(path: Path, model_type: str) -> None:
    """A readable state dict whose every key and shape is the ``model_type`` model's, else a ``ValueError``
    naming the file and what was expected. The file is memory-mapped and the model built on the meta device,
    so no weights are read: the driver checks a 2.5 GB file in well under a second, before any worker starts."""
    fix = (f"download the official {model_type} checkpoint from {CHECKPOINTS_URL} and set segmenter.checkpoint "
           "to its path")
    if not path.is_file():
        raise ValueError(f"SAM checkpoint {path}: no such file; {fix}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # not a torch file, truncated, pickled objects refused
        raise ValueError(f"SAM checkpoint {path}: not a readable state dict ({exc}); {fix}") from None
    with torch.device("meta"):
        expected = {k: v.shape for k, v in sam_model_registry[model_type](checkpoint=None).state_dict().items()}
    found = {k: v.shape for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, dict) else {}
    wrong = sorted(k for k in expected if found.get(k) != expected[k])
    if wrong:
        k = wrong[0]
        got = "missing" if k not in found else f"shape {tuple(found[k])}"
        raise ValueError(f"SAM checkpoint {path} is not a SAM {model_type} checkpoint: {len(wrong)} of {len(expected)} "
                         f"weights differ, e.g. {k}: {got}, expected {tuple(expected[k])} (does segmenter.model_type "
                         "match the file?)")


def _resolve_builder(spec: str) -> Callable[[], Sam]:
    """Import ``module:function``."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"segmenter.builder must be 'module:function', got {spec!r}")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"segmenter.builder {spec!r} cannot be imported: {exc}") from exc


def build_tiny_sam(img_size: int = 256) -> Sam:
    """A 0.56 M-parameter SAM with random (seed 0) weights, for tests and benchmarks (docs/stack.md §2).

    Use it with ``builder: "pipeline.segmenters.sam:build_tiny_sam"`` and the thresholds disabled
    (``pred_iou_thresh``/``stability_score_thresh`` -1e9, ``box_nms_thresh`` 1.0): random weights pass no real threshold.
    """
    embed_dim, depth, heads, prompt_dim, patch = 96, 2, 4, 64, 16
    emb = img_size // patch
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Sam(
            image_encoder=ImageEncoderViT(
                depth=depth, embed_dim=embed_dim, img_size=img_size, mlp_ratio=4,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=heads, patch_size=patch, qkv_bias=True,
                use_rel_pos=True, global_attn_indexes=[depth - 1], window_size=8, out_chans=prompt_dim,
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=prompt_dim, image_embedding_size=(emb, emb), input_image_size=(img_size, img_size),
                mask_in_chans=16,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_dim, mlp_dim=256, num_heads=4),
                transformer_dim=prompt_dim, iou_head_depth=3, iou_head_hidden_dim=64,
            ),
            pixel_mean=[123.675, 116.28, 103.53],
            pixel_std=[58.395, 57.12, 57.375],
        ).eval()

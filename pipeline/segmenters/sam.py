"""Segment Anything (v1) automatic mask generation as a segmenter (``batched.GeneratorSegmenter``)."""

from __future__ import annotations

from collections import deque
from functools import partial
from pathlib import Path

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor, sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.utils.transforms import ResizeLongestSide

from pipeline.segmenters.batched import EmbeddedPredictor, GeneratorSegmenter, check_weights, read_checkpoint
from schemas.config import SegmenterConfig

CHECKPOINTS_URL = "https://github.com/facebookresearch/segment-anything#model-checkpoints"


class SamSegmenter(GeneratorSegmenter):
    """``SamAutomaticMaskGenerator`` with the config's ``SamParams`` (``batched.GeneratorSegmenter``)."""

    name = "sam"

    def __init__(self, config: SegmenterConfig) -> None:
        super().__init__(config, check=lambda path: check_checkpoint(path, config.model_type))

    def empty_model(self) -> Sam:
        return sam_model_registry[self.config.model_type](checkpoint=None)

    def read_checkpoint(self, path: Path) -> dict:
        return torch.load(path, map_location="cpu", weights_only=True)

    def wrap(self, model: Sam) -> SamAutomaticMaskGenerator:
        generator = SamAutomaticMaskGenerator(model, output_mode="binary_mask", **self.config.sam.model_dump())
        generator.predictor = EmbeddedSamPredictor(model)
        return generator

    def model_label(self) -> str:
        return f"SAM {self.config.model_type}"

    def model_params(self) -> dict:
        return {"model_type": self.config.model_type}

    def generator_params(self) -> dict:
        return self.config.sam.model_dump()


class EmbeddedSamPredictor(EmbeddedPredictor, SamPredictor):
    """``SamPredictor`` taking stored embeddings (``batched``)."""

    def __init__(self, model: Sam) -> None:
        super().__init__(model)
        self.pending = deque()

    def encoder_input(self, crop: np.ndarray) -> torch.Tensor:
        resized = torch.as_tensor(self.transform.apply_image(crop), device=self.device).permute(2, 0, 1)
        return self.model.preprocess(resized.contiguous()[None])[0]

    def encode(self, batch: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model.image_encoder(batch).float()[:, None])

    def install(self, state: torch.Tensor, hw: tuple[int, int]) -> None:
        self.reset_image()
        self.features, self.original_size, self.is_image_set = state, hw, True
        self.input_size = ResizeLongestSide.get_preprocess_shape(*hw, self.transform.target_length)


def check_checkpoint(path: Path, model_type: str) -> None:
    """A readable state dict with exactly the keys and shapes of the ``model_type`` model, else a ``ValueError``
    naming the file and what was expected. The file is memory-mapped and the model built on the meta device,
    so no weights are read: the driver checks a 2.5 GB file in well under a second, before any worker starts."""
    fix = (f"download the official {model_type} checkpoint from {CHECKPOINTS_URL} and set segmenter.checkpoint "
           "to its path")
    state = read_checkpoint(path, "SAM checkpoint", fix)
    with torch.device("meta"):
        expected = {k: v.shape for k, v in sam_model_registry[model_type](checkpoint=None).state_dict().items()}
    check_weights(state if isinstance(state, dict) else {}, expected,
                  f"SAM checkpoint {path} is not a SAM {model_type} checkpoint", "segmenter.model_type")


def build_random_sam(model_type: str) -> Sam:
    """A real-size SAM ``model_type`` with random (seed 0) weights: the encoder's real cost without the weights
    (benchmarks on GPUs)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return sam_model_registry[model_type](checkpoint=None).eval()


build_random_vit_b = partial(build_random_sam, "vit_b")
build_random_vit_l = partial(build_random_sam, "vit_l")
build_random_vit_h = partial(build_random_sam, "vit_h")
RANDOM_BUILDERS = {"tiny": f"{__name__}:build_tiny_sam",
                   **{t: f"{__name__}:build_random_{t}" for t in ("vit_b", "vit_l", "vit_h")}}


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

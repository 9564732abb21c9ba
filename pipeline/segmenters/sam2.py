"""SAM 2 automatic mask generation (Meta's ``sam2`` package) as a segmenter (``batched.GeneratorSegmenter``)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
from sam2.build_sam import build_sam2
from sam2.modeling.backbones.hieradet import Hiera
from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
from sam2.modeling.position_encoding import PositionEmbeddingSine
from sam2.modeling.sam2_base import SAM2Base
from sam2.sam2_image_predictor import SAM2ImagePredictor
from torch.overrides import TorchFunctionMode

from pipeline.segmenters.batched import EmbeddedPredictor, GeneratorSegmenter, check_weights, read_checkpoint
from schemas.config import SegmenterConfig

CHECKPOINTS_URL = "https://github.com/facebookresearch/sam2#model-description"


class Sam2Segmenter(GeneratorSegmenter):
    """``SAM2AutomaticMaskGenerator`` with the config's ``Sam2Params`` (``batched.GeneratorSegmenter``). A model
    from ``sam2_model`` is built as the paper built it (``apply_postprocessing=False``)."""

    name = "sam2"

    def __init__(self, config: SegmenterConfig) -> None:
        super().__init__(config, check=lambda path: check_checkpoint(path, config.sam2_model))

    def empty_model(self) -> SAM2Base:
        return build_sam2(config_file(self.config.sam2_model), device="cpu", apply_postprocessing=False)

    def read_checkpoint(self, path: Path) -> dict:
        return torch.load(path, map_location="cpu", weights_only=True)["model"]

    def wrap(self, model: SAM2Base) -> SAM2AutomaticMaskGenerator:
        params = self.config.sam2
        generator = SAM2AutomaticMaskGenerator(model, output_mode="binary_mask", **params.model_dump())
        generator.predictor = EmbeddedSam2Predictor(model, max_hole_area=params.min_mask_region_area,
                                                     max_sprinkle_area=params.min_mask_region_area)
        return generator

    def model_label(self) -> str:
        return self.config.sam2_model

    def model_params(self) -> dict:
        return {"sam2_model": self.config.sam2_model}

    def generator_params(self) -> dict:
        return self.config.sam2.model_dump()


class EmbeddedSam2Predictor(EmbeddedPredictor, SAM2ImagePredictor):
    """``SAM2ImagePredictor`` taking stored embeddings (``batched``). The library assumes a 1024 px model
    (backbone features of 256, 128 and 64 px); here they follow the model's ``image_size``, so any works."""

    def __init__(self, model: SAM2Base, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self._bb_feat_sizes = backbone_feature_sizes(model)
        self.pending = deque()

    def encoder_input(self, crop: np.ndarray) -> torch.Tensor:
        return self._transforms(crop).to(self.device)

    def encode(self, batch: torch.Tensor) -> list[dict]:
        """``set_image``'s features, for a batch."""
        _, vision_feats, _, _ = self.model._prepare_backbone_features(self.model.forward_image(batch))
        if self.model.directly_add_no_mem_embed:
            vision_feats[-1] = vision_feats[-1] + self.model.no_mem_embed
        n = len(batch)
        feats = [f.float().permute(1, 2, 0).view(n, -1, *size) for f, size in zip(vision_feats, self._bb_feat_sizes)]
        return [{"image_embed": feats[-1][i:i + 1], "high_res_feats": [f[i:i + 1] for f in feats[:-1]]}
                for i in range(n)]

    def install(self, state: dict, hw: tuple[int, int]) -> None:
        self.reset_predictor()
        self._orig_hw, self._features, self._is_image_set = [hw], state, True


def backbone_feature_sizes(model: SAM2Base) -> list[tuple[int, int]]:
    """The sides of the backbone's three feature maps at the model's ``image_size`` (256, 128, 64 at 1024 px),
    which ``SAM2ImagePredictor`` hard-codes for 1024 px."""
    side = model.image_size // model.backbone_stride
    return [(4 * side, 4 * side), (2 * side, 2 * side), (side, side)]


class _AllocateOnMeta(TorchFunctionMode):
    """Parameters and buffers (``torch.empty``/``zeros``/``ones`` without a device) are allocated on the meta
    device: no memory, no initialisation. Unlike ``torch.device("meta")``, other tensors stay real, as building
    SAM 2 needs: Hiera reads its drop-path rates with ``.item()``, RoPE attention moves its tables to CUDA."""

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in (torch.empty, torch.zeros, torch.ones) and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def check_checkpoint(path: Path, sam2_model: str) -> None:
    """A readable SAM 2 checkpoint (the state dict under ``"model"``) with exactly the keys and shapes of the
    ``sam2_model`` model, else a ``ValueError`` naming the file and what was expected. The file is memory-mapped
    and the model built on the meta device, so no weights are read and the driver checks it in about a second,
    before any worker starts."""
    fix = (f"download the official checkpoint of {sam2_model} from {CHECKPOINTS_URL} and set segmenter.checkpoint "
           "to its path")
    state = read_checkpoint(path, "SAM 2 checkpoint", fix)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise ValueError(f"SAM 2 checkpoint {path}: no state dict under 'model', where SAM 2 checkpoints hold "
                         f"their weights; {fix}")
    with _AllocateOnMeta():
        model = build_sam2(config_file(sam2_model), device="meta", apply_postprocessing=False)
    check_weights(state["model"], {k: v.shape for k, v in model.state_dict().items()},
                  f"SAM 2 checkpoint {path} is not a {sam2_model} checkpoint", "segmenter.sam2_model")


def config_file(sam2_model: str) -> str:
    """The sam2 package's config of a model (``sam2.1_hiera_b+`` → ``configs/sam2.1/sam2.1_hiera_b+.yaml``)."""
    return f"configs/{sam2_model.partition('_')[0]}/{sam2_model}.yaml"


def build_random_hiera_b_plus() -> SAM2Base:
    """The paper's ``sam2.1_hiera_b+`` at 1024 px with random (seed 0) weights: the encoder's real cost without
    the weights (benchmarks on GPUs)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_sam2(config_file("sam2.1_hiera_b+"), device="cpu", apply_postprocessing=False).eval()


RANDOM_BUILDERS = {"tiny": f"{__name__}:build_tiny_sam2", "sam2.1_hiera_b+": f"{__name__}:build_random_hiera_b_plus"}


def build_tiny_sam2(image_size: int = 128) -> SAM2Base:
    """A 1 M-parameter SAM 2 with random (seed 0) weights, for tests and benchmarks: the image path of
    ``sam2.1_hiera_t.yaml`` (Hiera trunk, FPN neck, high-resolution features, object scores) at a fraction of
    its width, without the video memory modules, which image segmentation never uses.

    Use it with ``builder: "pipeline.segmenters.sam2:build_tiny_sam2"`` and the thresholds disabled
    (``pred_iou_thresh``/``stability_score_thresh`` -1e9, ``box_nms_thresh`` 1.0): random weights pass no real
    threshold.
    """
    hidden = 64
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        trunk = Hiera(embed_dim=16, num_heads=1, stages=(1, 1, 2, 1), global_att_blocks=(3,),
                      window_pos_embed_bkg_spatial_size=(7, 7))
        neck = FpnNeck(position_encoding=PositionEmbeddingSine(num_pos_feats=hidden), d_model=hidden,
                       backbone_channel_list=trunk.channel_list, fpn_top_down_levels=[2, 3], fpn_interp_model="nearest")
        return SAM2Base(
            image_encoder=ImageEncoder(trunk=trunk, neck=neck, scalp=1), memory_attention=None, memory_encoder=None,
            image_size=image_size, directly_add_no_mem_embed=True, use_high_res_features_in_sam=True,
            multimask_output_in_sam=True, iou_prediction_use_sigmoid=True, pred_obj_scores=True,
            pred_obj_scores_mlp=True, use_multimask_token_for_obj_ptr=True,
        ).eval()

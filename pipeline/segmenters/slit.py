"""SLIT (DirectSAM) as a segmenter: a ``transformers`` semantic-segmentation model predicts each pixel's
probability of lying on a boundary, and the regions the boundaries enclose are the masks (spec §4.2).

The model is loaded on the first call; the constructor only checks the model folder (it loads the weights once
on the CPU and drops them: well under a second for DirectSAM's 340 MB), so that the driver finds a wrong folder
before any worker starts.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import cv2
import numpy as np
import torch
from transformers import (AutoConfig, AutoImageProcessor, AutoModelForSemanticSegmentation, SegformerConfig,
                          SegformerForSemanticSegmentation, SegformerImageProcessorPil)
from transformers.image_processing_utils import BaseImageProcessor
from transformers.utils import logging as hf_logging

from pipeline.segmenters.base import Proposal, Segmenter, resolve_device
from schemas.config import SegmenterConfig
from schemas.files import sha256_file

MODEL_URL = "https://huggingface.co/chendelong/DirectSAM-1800px-0424"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what save_pretrained writes (older models: a pickle)

hf_logging.set_verbosity_error()  # the console shows our lines only: no loading reports,
hf_logging.disable_progress_bar()  # no "Loading weights" bars


class SlitSegmenter(Segmenter):
    """The boundary model of the ``segmenter.checkpoint`` folder, then ``boundary_masks`` with the config's
    ``SlitParams``; no confidence (scores 1.0)."""

    name = "slit"

    def __init__(self, config: SegmenterConfig) -> None:
        self.config = config
        self._folder = Path(config.checkpoint)
        self._weights = check_model_folder(self._folder)
        self.device = resolve_device(config.device)

    @cached_property
    def processor(self) -> BaseImageProcessor:
        """The folder's image processor, resizing with PIL as transformers 4 did by default for the paper's masks."""
        return AutoImageProcessor.from_pretrained(self._folder, backend="pil", local_files_only=True)

    @cached_property
    def model(self) -> torch.nn.Module:
        """The boundary model (loaded and moved to the device on first use)."""
        model = AutoModelForSemanticSegmentation.from_pretrained(self._folder, local_files_only=True)
        return model.to(self.device).eval()

    def __call__(self, image: np.ndarray) -> Proposal:
        masks = boundary_masks(self.boundary(image), **self.config.slit.model_dump())
        return Proposal(masks=masks, scores=np.ones(len(masks), dtype=np.float32))

    def boundary(self, image: np.ndarray) -> np.ndarray:
        """[H, W] float32 boundary probability of an RGB image: the model's logits at its input size, bilinearly
        upsampled to the image, through a sigmoid."""
        pixels = self.processor(images=image, return_tensors="pt", input_data_format="channels_last").pixel_values
        with torch.inference_mode():
            logits = self.model(pixel_values=pixels.to(self.device)).logits.float().cpu()
        logits = torch.nn.functional.interpolate(logits, size=image.shape[:2], mode="bilinear", align_corners=False)
        return torch.sigmoid(logits)[0, 0].numpy()

    def params(self) -> dict:
        # the weights are in checkpoint_sha256; the input size is the folder's preprocessor_config.json
        return {"input_size": dict(self.processor.size), **self.config.slit.model_dump()}

    def checkpoint_sha256(self) -> str | None:
        return self._sha256

    @cached_property
    def _sha256(self) -> str:
        """The weight file's (the hub lists the same sha256 for its files)."""
        return sha256_file(self._weights)


def boundary_masks(boundary: np.ndarray, *, boundary_threshold: float, boundary_dilation: int, connectivity: int,
                   max_masks: int) -> np.ndarray:
    """[N, H, W] bool masks from an [H, W] boundary probability map: pixels above ``boundary_threshold`` are
    boundary, dilated with a ``boundary_dilation`` x ``boundary_dilation`` elliptic kernel; each connected component
    (``connectivity`` 4 or 8) of the other pixels is a mask. The ``max_masks`` largest, largest first; equal areas
    in the order of their first pixels (row-major)."""
    edges = (boundary > boundary_threshold).astype(np.uint8)
    if boundary_dilation > 1:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (boundary_dilation, boundary_dilation))
        edges = cv2.dilate(edges, kernel)
    count, labels = cv2.connectedComponents(1 - edges, connectivity=connectivity)  # label 0: the boundary
    flat = labels.ravel()
    areas = np.bincount(flat, minlength=count)
    first = np.full(count, flat.size)
    np.minimum.at(first, flat, np.arange(flat.size))  # OpenCV's label order depends on its algorithm: not used
    order = 1 + np.lexsort((first[1:], -areas[1:]))[:max_masks]
    return labels[None] == order[:, None, None]


def check_model_folder(folder: Path) -> Path:
    """The weight file of a loadable one-channel semantic-segmentation model folder (config.json,
    preprocessor_config.json, weights), else a ``ValueError`` naming the folder and what was expected."""
    fix = (f"expected a folder with config.json, preprocessor_config.json and model.safetensors, as in {MODEL_URL} "
           "(a local copy; nothing is downloaded)")
    if not folder.is_dir():
        raise ValueError(f"SLIT model folder {folder}: no such folder; {fix}")
    absent = [name for name in ("config.json", "preprocessor_config.json") if not (folder / name).is_file()]
    weights = [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]
    if absent or not weights:
        raise ValueError(f"SLIT model folder {folder}: no {' or '.join(absent or WEIGHT_FILES)}; {fix}")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        AutoImageProcessor.from_pretrained(folder, backend="pil", local_files_only=True)
    except Exception as exc:  # unreadable or unknown JSON
        raise ValueError(f"SLIT model folder {folder}: not loadable ({exc}); {fix}") from None
    if config.num_labels != 1:
        raise ValueError(f"SLIT model folder {folder}: a boundary model has one output channel, this "
                         f"{config.model_type} model has {config.num_labels}; {fix}")
    try:
        _, info = AutoModelForSemanticSegmentation.from_pretrained(
            folder, local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True)
    except Exception as exc:  # no semantic-segmentation head for this architecture, unreadable weights
        raise ValueError(f"SLIT model folder {folder}: not loadable ({exc}); {fix}") from None
    missing, mismatched = sorted(info["missing_keys"]), sorted(info["mismatched_keys"])
    if missing or mismatched:
        if missing:
            example = f"{missing[0]}: missing"
        else:
            key, got, want = mismatched[0]
            example = f"{key}: shape {tuple(got)}, expected {tuple(want)}"
        raise ValueError(f"SLIT model folder {folder}: {weights[0].name} does not hold the weights of the "
                         f"{config.model_type} model config.json describes: {len(missing)} missing, "
                         f"{len(mismatched)} of another shape, e.g. {example}; {fix}")
    return weights[0]


def build_tiny_slit(folder: Path, *, image_size: int = 64) -> Path:
    """Write a 7 k-parameter Segformer boundary model with random (seed 0) weights and its image processor to
    ``folder`` (``save_pretrained``, as the hub's DirectSAM), for tests and benchmarks; returns ``folder``."""
    config = SegformerConfig(num_labels=1, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
                             patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 1], mlp_ratios=[2, 2],
                             decoder_hidden_size=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        SegformerForSemanticSegmentation(config).save_pretrained(folder)
    SegformerImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder

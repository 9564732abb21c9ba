"""The segmenter interface: RGB images in, candidate masks out."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Proposal:
    masks: np.ndarray  # [N, H, W] bool, at the input image's size
    scores: np.ndarray  # [N] float32 confidence (1.0 where the segmenter has none)


class Segmenter:
    """Base of every segmenter. The worker hands it ``batch_size`` images at a time (``propose_batch``);
    segmenters that batch on the device override both, the others propose one image at a time."""

    name: str
    batch_size: int = 1

    def __call__(self, image: np.ndarray) -> Proposal:
        """Propose masks for one HxWx3 uint8 RGB image."""
        raise NotImplementedError

    def propose_batch(self, images: list[np.ndarray]) -> list[Proposal]:
        """One proposal per image, in order."""
        return [self(image) for image in images]

    def params(self) -> dict:
        """The parameters that determine the masks (recorded in the manifest)."""
        raise NotImplementedError

    def checkpoint_sha256(self) -> str | None:
        """The model weights' sha256 (recorded in the manifest); None without a weight file."""
        return None


def resolve_device(device: str) -> str:
    """``segmenter.device``: ``auto`` is the GPU where there is one."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"

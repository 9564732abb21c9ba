"""The segmenter interface: an RGB image in, candidate masks out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass
class Proposal:
    masks: np.ndarray  # [N, H, W] bool, at the input image's size
    scores: np.ndarray  # [N] float32 confidence (1.0 where the segmenter has none)


class Segmenter(Protocol):
    name: str

    def __call__(self, image: np.ndarray) -> Proposal:
        """Propose masks for one HxWx3 uint8 RGB image."""
        ...

    def params(self) -> dict:
        """The parameters that determine the masks (recorded in the manifest)."""
        ...

    def checkpoint_sha256(self) -> str | None: ...

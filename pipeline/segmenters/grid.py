"""Baseline segmenter: a fixed grid of rectangular patches, independent of the image content."""

from __future__ import annotations

import numpy as np

from pipeline.segmenters.base import Proposal, Segmenter
from schemas.config import SegmenterConfig


class GridSegmenter(Segmenter):
    """``grid`` x ``grid`` patches that tile the image exactly (empty patches of tiny images are skipped)."""

    name = "grid"

    def __init__(self, config: SegmenterConfig) -> None:
        self.grid = config.grid

    def __call__(self, image: np.ndarray) -> Proposal:
        h, w = image.shape[:2]
        ys = np.linspace(0, h, self.grid + 1).round().astype(int)
        xs = np.linspace(0, w, self.grid + 1).round().astype(int)
        masks = []
        for y0, y1 in zip(ys[:-1], ys[1:]):
            for x0, x1 in zip(xs[:-1], xs[1:]):
                if y1 > y0 and x1 > x0:
                    mask = np.zeros((h, w), dtype=bool)
                    mask[y0:y1, x0:x1] = True
                    masks.append(mask)
        stacked = np.stack(masks) if masks else np.zeros((0, h, w), dtype=bool)
        return Proposal(masks=stacked, scores=np.ones(len(stacked), dtype=np.float32))

    def params(self) -> dict:
        return {"grid": self.grid}


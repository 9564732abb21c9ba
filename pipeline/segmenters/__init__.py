"""Segmenters propose masks for an RGB image; ``create_segmenter`` builds one from its config."""

from __future__ import annotations

from collections.abc import Callable

from pipeline.segmenters.base import Proposal, Segmenter
from pipeline.segmenters.grid import GridSegmenter
from pipeline.segmenters.superpixel import SuperpixelSegmenter
from schemas.config import SegmenterConfig

__all__ = ["Proposal", "Segmenter", "create_segmenter"]


def _sam(config: SegmenterConfig) -> Segmenter:
    from pipeline.segmenters.sam import SamSegmenter  # segment_anything + torch take seconds to import

    return SamSegmenter(config)


_REGISTRY: dict[str, Callable[[SegmenterConfig], Segmenter]] = {
    "superpixel": SuperpixelSegmenter,
    "grid": GridSegmenter,
    "sam": _sam,
}


def create_segmenter(config: SegmenterConfig) -> Segmenter:
    """The segmenter named by ``config.name``, built from the rest of the config."""
    try:
        factory = _REGISTRY[config.name]
    except KeyError:
        raise ValueError(f"unknown segmenter {config.name!r}; choose one of {sorted(_REGISTRY)}") from None
    return factory(config)

"""Segmenters propose masks for an RGB image; ``create_segmenter`` builds one from its config."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from pipeline.segmenters.base import Proposal, Segmenter
from pipeline.segmenters.grid import GridSegmenter
from pipeline.segmenters.superpixel import SuperpixelSegmenter
from schemas.config import SegmenterConfig

__all__ = ["Proposal", "Segmenter", "create_segmenter", "resolve_builder"]

# what the model segmenters need beyond the base install; sam2's install has three steps (README, "Install")
SAM2_INSTALL = "`make install`, or the steps in README.md, \"Install\""
SLIT_INSTALL = "pip install 'transformers>=5.24.0'"


def _sam(config: SegmenterConfig) -> Segmenter:
    from pipeline.segmenters.sam import SamSegmenter  # segment_anything + torch take seconds to import

    return SamSegmenter(config)


def _sam2(config: SegmenterConfig) -> Segmenter:
    try:
        from pipeline.segmenters.sam2 import Sam2Segmenter
    except ModuleNotFoundError as exc:
        raise ImportError(f"the sam2 segmenter needs Meta's sam2 package ({exc}): {SAM2_INSTALL}") from None
    return Sam2Segmenter(config)


def _slit(config: SegmenterConfig) -> Segmenter:
    try:
        from pipeline.segmenters.slit import SlitSegmenter
    except ModuleNotFoundError as exc:
        raise ImportError(f"the slit segmenter needs transformers ({exc}): {SLIT_INSTALL}") from None
    return SlitSegmenter(config)


_REGISTRY: dict[str, Callable[[SegmenterConfig], Segmenter]] = {
    "superpixel": SuperpixelSegmenter,
    "grid": GridSegmenter,
    "sam": _sam,
    "sam2": _sam2,
    "slit": _slit,
}


def create_segmenter(config: SegmenterConfig) -> Segmenter:
    """The segmenter named by ``config.name``, built from the rest of the config."""
    try:
        factory = _REGISTRY[config.name]
    except KeyError:
        raise ValueError(f"unknown segmenter {config.name!r}; choose one of {sorted(_REGISTRY)}") from None
    return factory(config)


def resolve_builder(spec: str) -> Callable[[], Any]:
    """The model builder ``segmenter.builder`` names (``module:function``), imported."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"segmenter.builder must be 'module:function', got {spec!r}")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"segmenter.builder {spec!r} cannot be imported: {exc}") from exc

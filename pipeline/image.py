"""Decode one input image robustly: every failure becomes an ImageError with the reason."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

from schemas.storage import Location, read_bytes

HIGH_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
# A ground-truth object mask may be soft (CUB's are greyscale averages of several annotators, 0..255): after
# the bilinear resize to the image, object = value > 127. This is the spec's "min-max normalise, > 0.5"
# over the 8-bit range (value / 255 > 0.5).
OBJECT_THRESHOLD = 127


class ImageError(ValueError):
    """An input that cannot be used as an image; the message is the reason written to the manifest."""


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in HIGH_BIT_MODES:  # 16-bit / float: rescale to 8 bits instead of clipping to white
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        im = Image.fromarray(a.round().astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # transparent pixels become white
        im = Image.alpha_composite(canvas, rgba)
    return im.convert("RGB")


class LoadedImage(NamedTuple):
    pixels: np.ndarray  # HxWx3 uint8 RGB, EXIF orientation applied, long side <= max_side
    original_size: tuple[int, int]  # (width, height) of the input, after the EXIF turn
    jpeg: bytes | None  # the file's bytes when ``pixels`` are exactly their plain decode (an RGB JPEG
    # without EXIF turn or downscale): stored as is, no re-encoding and no second generation loss


def load_image(path: Location | Path, max_side: int, max_image_pixels: int) -> LoadedImage:
    """Decode one input (a file, or an object read in one request); every failure is an ``ImageError`` with the
    reason."""
    try:
        data = read_bytes(Location.parse(path))
    except OSError as exc:
        raise ImageError(f"cannot read file: {exc.strerror or exc}") from exc
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                orientation = im.getexif().get(0x0112, 1)
                rotated = orientation in (5, 6, 7, 8)  # EXIF orientation with a 90° turn
                as_is = im.format == "JPEG" and im.mode == "RGB" and orientation == 1 and max(width, height) <= max_side
                if width * height > max_image_pixels:
                    raise ImageError(f"image has {width}x{height} pixels, above max_image_pixels={max_image_pixels}")
                if im.format == "JPEG" and max(width, height) > 2 * max_side:
                    im.draft("RGB", (max_side, max_side))  # decode at reduced scale: much faster for huge JPEGs
                im.load()
                im = ImageOps.exif_transpose(im)
                rgb = _to_rgb(im)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"decompression bomb: {exc}") from exc
    except Image.DecompressionBombWarning as exc:
        raise ImageError(f"decompression bomb: {exc}") from exc
    except Image.UnidentifiedImageError:
        raise ImageError("not an image (format not recognised)") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        raise ImageError(f"corrupt image: {exc}") from exc
    original = (height, width) if rotated else (width, height)
    if max(rgb.size) > max_side:
        scale = max_side / max(rgb.size)
        rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.BILINEAR)
    return LoadedImage(np.asarray(rgb), original, data if as_is else None)


def load_object_mask(path: Location | Path, size: tuple[int, int]) -> np.ndarray:
    """The object mask image at ``path`` as uint8 HxW, 255 = object, 0 = background, at ``size`` (width,
    height): greyscale, bilinear resize, then value > ``OBJECT_THRESHOLD``. Every failure is an ``ImageError``
    naming the file."""
    try:
        with Image.open(io.BytesIO(read_bytes(Location.parse(path)))) as im:
            soft = np.asarray(im.convert("L").resize(size, Image.BILINEAR))
    except Image.UnidentifiedImageError:
        raise ImageError(f"object mask {path}: not an image (format not recognised)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"object mask {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    return np.where(soft > OBJECT_THRESHOLD, 255, 0).astype(np.uint8)

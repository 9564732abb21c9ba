"""Decoding of hostile and unusual inputs: every case is a clean array or an ImageError with a reason."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.image import ImageError, load_image

BIG = 1024


def _save(path: Path, im: Image.Image, **kw) -> Path:
    im.save(path, **kw)
    return path


def test_rgb_passthrough(tmp_path: Path) -> None:
    a = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    img, original, _ = load_image(_save(tmp_path / "a.png", Image.fromarray(a)), BIG, 10**8)
    assert original == (30, 20) and np.array_equal(img, a)


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "1", "LA"])
def test_modes_become_rgb(tmp_path: Path, mode: str) -> None:
    im = Image.new("RGB", (10, 8), (10, 200, 30)).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    img, _, _ = load_image(_save(tmp_path / f"x.{fmt.lower()}", im, format=fmt), BIG, 10**8)
    assert img.shape == (8, 10, 3) and img.dtype == np.uint8


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    im = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    im.putpixel((0, 0), (0, 0, 255, 255))
    img, _, _ = load_image(_save(tmp_path / "a.png", im), BIG, 10**8)
    assert tuple(img[0, 0]) == (0, 0, 255) and tuple(img[3, 3]) == (255, 255, 255)


def test_16bit_rescaled_not_clipped(tmp_path: Path) -> None:
    a = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    img, _, _ = load_image(_save(tmp_path / "a.png", Image.fromarray(a)), BIG, 10**8)
    assert img[0, 0, 0] == 0 and img[-1, -1, 0] == 255 and 100 < img[4, 0, 0] < 160


def test_exif_rotation_applied(tmp_path: Path) -> None:
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    img, original, _ = load_image(_save(tmp_path / "r.jpg", im, exif=exif), BIG, 10**8)
    assert img.shape[:2] == (40, 20) and original == (20, 40)


def test_one_pixel_image_decodes(tmp_path: Path) -> None:
    img, original, _ = load_image(_save(tmp_path / "p.png", Image.new("RGB", (1, 1))), BIG, 10**8)
    assert img.shape == (1, 1, 3) and original == (1, 1)


def test_large_image_downscaled(tmp_path: Path) -> None:
    im = Image.new("RGB", (3000, 1500), (5, 5, 5))
    img, original, _ = load_image(_save(tmp_path / "big.jpg", im), 512, 10**8)
    assert img.shape == (256, 512, 3) and original == (3000, 1500)


def test_decompression_bomb_rejected(tmp_path: Path) -> None:
    path = _save(tmp_path / "bomb.png", Image.new("1", (6000, 6000)))  # tiny file, 36 Mpx
    with pytest.raises(ImageError, match="above max_image_pixels"):
        load_image(path, BIG, 10_000_000)


@pytest.mark.parametrize(
    "name,payload,reason",
    [
        ("empty.jpg", b"", "empty file"),
        ("text.jpg", b"hello, I am not an image", "not an image"),
        ("garbage.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, "corrupt|not an image"),
    ],
)
def test_bad_bytes(tmp_path: Path, name: str, payload: bytes, reason: str) -> None:
    (tmp_path / name).write_bytes(payload)
    with pytest.raises(ImageError, match=reason):
        load_image(tmp_path / name, BIG, 10**8)


def test_truncated_jpeg(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "t.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="corrupt"):
        load_image(tmp_path / "t.jpg", BIG, 10**8)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="cannot read file"):
        load_image(tmp_path / "nope.jpg", BIG, 10**8)


def test_jpeg_stored_as_is_only_when_its_plain_decode_is_the_image(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8))
    plain = _save(tmp_path / "plain.jpg", im)
    loaded = load_image(plain, BIG, 10**8)
    assert loaded.jpeg == plain.read_bytes()  # no re-encoding: the file's own bytes
    assert np.array_equal(np.asarray(Image.open(plain).convert("RGB")), loaded.pixels)
    exif = Image.Exif()
    exif[0x0112] = 3  # a turn: the pixels differ from the file's plain decode
    assert load_image(_save(tmp_path / "turned.jpg", im, exif=exif), BIG, 10**8).jpeg is None
    assert load_image(plain, 20, 10**8).jpeg is None  # downscaled
    assert load_image(_save(tmp_path / "grey.jpg", im.convert("L")), BIG, 10**8).jpeg is None
    assert load_image(_save(tmp_path / "a.png", im), BIG, 10**8).jpeg is None

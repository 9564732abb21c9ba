"""The embedded synthetic dataset: a class is decided by one local part on a cluttered background.

Class ``k`` is one (shape, colour) pair, e.g. ``red_circle``. Each image shows that part (the
*discriminative* part) plus ``distractors`` parts whose shapes and colours are taken from the class
pairs but never form a class pair, so neither colour alone nor shape alone decides the class; the
conjunction inside one part does. A uint8 part label map is saved next to every image: 0 background,
1 the discriminative part, ``1 + i`` distractor ``i``. Distractors are drawn in id order (a later one
occludes an earlier one) and the discriminative part is drawn last, on top, so it is always whole.
The object is the discriminative part (what decides the class; distractors are background): an object
map (255 on part 1, 0 elsewhere) is saved next to every image too. Every image is seeded from
``(seed, split, class, index)``: the same config gives byte-identical files.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.sources.base import SourceError, SourceItem, SourceListing
from schemas.config import SyntheticConfig
from schemas.storage import Location, list_files, makedirs, put, read_bytes, read_text, size

SHAPES = ("circle", "square", "triangle", "diamond")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "green": (30, 185, 50),
    "blue": (35, 75, 235),
    "yellow": (245, 215, 25),
    "magenta": (215, 40, 200),
    "cyan": (25, 205, 215),
}
COLOURS = tuple(PALETTE)
SPLITS = ("train", "test")
MANIFEST = "synthetic.json"
MAX_DISTRACTORS = 8  # SyntheticConfig.distractors upper bound
PART_NAMES = ("discriminative", *(f"distractor_{i}" for i in range(1, MAX_DISTRACTORS + 1)))
SIZE_RANGE = (0.18, 0.28)  # part size (a circle's diameter), as a fraction of the image side
# box side per unit of size, so that every shape of one size covers the area of that circle
AREA_SCALE = {
    "circle": 1.0, "square": np.sqrt(np.pi) / 2, "triangle": np.sqrt(np.pi / 2), "diamond": np.sqrt(np.pi / 2),
}
MAX_OVERLAP = 0.1  # placement tries to keep box intersections below this fraction of the smaller box
PLACEMENT_TRIES = 50


def class_pairs(num_classes: int) -> list[tuple[str, str]]:
    """(shape, colour) of every class: distinct pairs for up to lcm(4, 6) = 12 classes."""
    return [(SHAPES[k % len(SHAPES)], COLOURS[k % len(COLOURS)]) for k in range(num_classes)]


def class_names(num_classes: int) -> list[str]:
    return [f"{colour}_{shape}" for shape, colour in class_pairs(num_classes)]


def distractor_pairs(num_classes: int) -> list[tuple[str, str]]:
    """Shapes and colours used by the classes, combined into every pair that is not a class."""
    classes = class_pairs(num_classes)
    shapes = [s for s in SHAPES if any(s == c[0] for c in classes)]
    colours = [c for c in COLOURS if any(c == k[1] for k in classes)]
    return [(s, c) for s in shapes for c in colours if (s, c) not in classes]


def part_names(config: SyntheticConfig) -> list[str]:
    """Names of the ids in a part label map (id = index + 1)."""
    return list(PART_NAMES[: 1 + config.distractors])


def _relative(kind: str, class_name: str, split: str, index: int) -> str:
    return f"{kind}/{class_name}/{split}_{index:04d}.png"


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth muted colour gradient, low-contrast blobs and pixel noise (float RGB, 0..255)."""
    corners = _muted(rng, 4).reshape(2, 2, 3)
    t = np.linspace(0.0, 1.0, size)
    ty, tx = t[:, None, None], t[None, :, None]
    image = (corners[0, 0] * (1 - ty) * (1 - tx) + corners[0, 1] * (1 - ty) * tx
             + corners[1, 0] * ty * (1 - tx) + corners[1, 1] * ty * tx)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    for colour in _muted(rng, int(rng.integers(6, 12))):
        cy, cx = rng.uniform(0, size, 2)
        sy, sx = rng.uniform(0.04, 0.15, 2) * size
        weight = 0.35 * np.exp(-0.5 * (((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2))
        image = image * (1 - weight[..., None]) + colour * weight[..., None]
    return image + rng.normal(0.0, 4.0, image.shape)


def _muted(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` low-saturation mid-value RGB colours (far from the saturated palette)."""
    grey = rng.uniform(80, 170, (n, 1))
    tint = rng.uniform(-1.0, 1.0, (n, 3))
    return grey + 22.0 * tint


def _shape_mask(shape: str, box: tuple[int, int, int], size: int) -> np.ndarray:
    """Boolean mask of ``shape`` filling the square box ``(x, y, side)``."""
    x, y, s = box
    x1, y1 = x + s - 1, y + s - 1
    canvas = Image.new("1", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse((x, y, x1, y1), fill=1)
    elif shape == "square":
        draw.rectangle((x, y, x1, y1), fill=1)
    elif shape == "triangle":
        draw.polygon([(x + (s - 1) / 2, y), (x1, y1), (x, y1)], fill=1)
    else:  # diamond
        mx, my = x + (s - 1) / 2, y + (s - 1) / 2
        draw.polygon([(mx, y), (x1, my), (mx, y1), (x, my)], fill=1)
    return np.asarray(canvas, dtype=bool)


def _place(rng: np.random.Generator, size: int, shapes: list[str]) -> list[tuple[int, int, int]]:
    """Square boxes ``(x, y, side)`` fully inside the image, overlapping earlier ones little.

    A box's side is scaled per shape so that all shapes of one drawn size have the same area.
    """
    boxes: list[tuple[int, int, int]] = []
    for shape in shapes:
        best, best_overlap = None, np.inf
        for _ in range(PLACEMENT_TRIES):
            side = int(round(rng.uniform(*SIZE_RANGE) * AREA_SCALE[shape] * size))
            x, y = (int(v) for v in rng.integers(0, size - side + 1, 2))
            overlap = max((_overlap((x, y, side), b) for b in boxes), default=0.0)
            if overlap < best_overlap:
                best, best_overlap = (x, y, side), overlap
            if overlap <= MAX_OVERLAP:
                break
        boxes.append(best)
    return boxes


def _overlap(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[2], b[1] + b[2]) - max(a[1], b[1])
    return max(w, 0) * max(h, 0) / min(a[2], b[2]) ** 2


def render(config: SyntheticConfig, split: str, label: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """One image (uint8 HxWx3) and its part label map (uint8 HxW), determined by the arguments."""
    seed = [config.seed % 2**64, SPLITS.index(split), label, index]
    rng = np.random.default_rng(seed)
    size = config.image_size
    image = _background(rng, size)
    labels = np.zeros((size, size), np.uint8)
    choices = distractor_pairs(config.num_classes)
    distractors = [choices[int(i)] for i in rng.integers(0, len(choices), config.distractors)]
    parts = [*distractors, class_pairs(config.num_classes)[label]]
    ids = [*range(2, 2 + config.distractors), 1]  # the discriminative part is drawn last, on top
    for (shape, colour), box, part_id in zip(parts, _place(rng, size, [p[0] for p in parts]), ids):
        mask = _shape_mask(shape, box, size)
        shade = rng.uniform(-0.08, 0.08, 2) / box[2]  # mild lighting gradient across the part
        yy, xx = np.nonzero(mask)
        factor = 1.0 + shade[0] * (yy - box[1] - box[2] / 2) + shade[1] * (xx - box[0] - box[2] / 2)
        texture = rng.normal(0.0, 5.0, (len(yy), 3))
        image[yy, xx] = np.asarray(PALETTE[colour], np.float64) * factor[:, None] + texture
        labels[mask] = part_id
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), labels


def object_map(labels: np.ndarray) -> np.ndarray:
    """The object map of a part label map: 255 on the discriminative part (id 1), 0 elsewhere."""
    return np.where(labels == 1, 255, 0).astype(np.uint8)


def _write_png(array: np.ndarray, mode: str, path: Location) -> None:
    put(path, lambda f: Image.fromarray(array, mode).save(f, format="PNG"))


def _manifest(config: SyntheticConfig) -> dict:
    return {
        "config": config.model_dump(mode="json"),
        "classes": class_names(config.num_classes),
        "part_names": part_names(config),
    }


def _files(config: SyntheticConfig) -> list[tuple[int, str, str, int]]:
    """(label, class name, split, index) of every image, in listing order: sorted by (split, class, index)."""
    return [
        (label, name, split, index)
        for split, count in sorted(zip(SPLITS, (config.train_per_class, config.test_per_class)))
        for label, name in enumerate(class_names(config.num_classes))
        for index in range(count)
    ]


def generate(root: Location | Path, config: SyntheticConfig) -> Location:
    """Write the dataset under ``root``, a folder or an s3:// prefix (idempotent), and return ``root``.

    ``synthetic.json`` is written last and marks a finished dataset; one made with a different config
    is an error (nothing is deleted or overwritten). A finished root made before object maps existed
    gets them, derived from its part maps; nothing else is touched.
    """
    root = Location.parse(root)
    marker = root / MANIFEST
    expected = _manifest(config)
    if size(marker) is not None:
        try:
            recorded = json.loads(read_text(marker))
        except (OSError, ValueError) as exc:
            raise SourceError(f"{marker}: unreadable synthetic dataset marker ({exc})") from exc
        if recorded != expected:
            raise SourceError(
                f"{marker}: this root holds a synthetic dataset made with a different config "
                f"({recorded.get('config') if isinstance(recorded, dict) else recorded}); "
                "use another --root or remove it"
            )
        _add_object_maps(root, config)
        return root
    for name in expected["classes"]:
        for kind in ("images", "parts", "objects"):
            makedirs(root / f"{kind}/{name}")
    for label, name, split, index in _files(config):
        image, labels = render(config, split, label, index)
        _write_png(image, "RGB", root / _relative("images", name, split, index))
        _write_png(labels, "L", root / _relative("parts", name, split, index))
        _write_png(object_map(labels), "L", root / _relative("objects", name, split, index))
    put(marker, json.dumps(expected, indent=2, sort_keys=True) + "\n")
    return root


def _add_object_maps(root: Location, config: SyntheticConfig) -> None:
    """Write the object maps missing from a finished root (one listing of its ``objects/``), each from its part
    map."""
    present = {f"objects/{name}" for name in list_files(root / "objects")}
    for _, name, split, index in _files(config):
        relative = _relative("objects", name, split, index)
        if relative in present:
            continue
        parts_path = root / _relative("parts", name, split, index)
        try:
            with Image.open(io.BytesIO(read_bytes(parts_path))) as im:
                labels = np.asarray(im)
        except OSError as exc:
            raise SourceError(f"{parts_path}: unreadable part map, so {root / relative} cannot be derived "
                              f"({exc})") from exc
        makedirs((root / relative).parent)
        _write_png(object_map(labels), "L", root / relative)


def list_items(root: Location | Path, config: SyntheticConfig) -> SourceListing:
    """Generate under ``root`` when needed, then list it sorted by (split, class, index)."""
    generate(root, config)
    items = [
        SourceItem(
            path=_relative("images", name, split, index), label=label, class_name=name, split=split,
            parts_path=_relative("parts", name, split, index), object_path=_relative("objects", name, split, index),
        )
        for label, name, split, index in _files(config)
    ]
    return SourceListing(classes=class_names(config.num_classes), items=items)

"""One shard sample: the tar members that share a key, and the JSON record among them.

A sample with key ``K`` (digits only: 5 shard digits, then the index inside the shard) is these
adjacent tar members, in this order::

    K.crop_00.jpg    only when crop_size is set: crop of mask 0 (the largest), resized to
    ...              crop_size x crop_size, RGB JPEG; one per valid mask (n_masks of them)
    K.jpg            the image the masks refer to (RGB JPEG, long side <= max_side): the input file's
                     own bytes when it is an RGB JPEG used as is (no EXIF turn, no downscale),
                     else a re-encoding at jpeg_quality
    K.json           SampleRecord below
    K.masks.npy.gz   gzip of a .npy: uint8 [n_masks, height, ceil(width / 8)] = np.packbits(mask, axis=-1);
                     unpack with np.unpackbits(a, axis=-1, count=width).astype(bool)
    K.parts.png      optional, 8-bit ground-truth part label map (0 = none), same size as K.jpg
    K.object.png     optional, 8-bit ground-truth object mask (255 = object, 0 = background), same size as K.jpg

Padding is never written: a sample has n_masks masks (and crops). Boxes are ``[x_min, y_min, x_max,
y_max]`` in pixels of ``K.jpg`` with **inclusive** maxima: the crop is ``image[y_min:y_max + 1,
x_min:x_max + 1]``, which readers resize to their input size (pipeline.masks.crop_boxes). The label
is ``K.json``'s ``label`` (no ``.cls`` member since format 3: its two tar blocks were 6 % of a sample).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


MASKS_MEMBER = "masks.npy.gz"
PARTS_MEMBER = "parts.png"
OBJECT_MEMBER = "object.png"


def crop_member(index: int) -> str:
    """Tar extension of the crop of mask ``index``."""
    return f"crop_{index:02d}.jpg"


class SampleRecord(BaseModel):
    """The ``K.json`` member."""

    model_config = ConfigDict(extra="forbid")

    key: str
    label: int = Field(description="class index into the manifest's classes")
    class_name: str
    split: str = Field(description="train | val | test (as given by the source)")
    source_path: str = Field(description="input path relative to the source root")
    width: int
    height: int
    original_width: int
    original_height: int
    masks_per_image: int = Field(description="K of the job; n_masks <= K")
    n_masks: int = Field(description="valid masks stored; the reader pads to K and marks validity")
    boxes: list[list[int]] = Field(description="[x_min, y_min, x_max, y_max] inclusive, per mask")
    areas: list[int] = Field(description="mask pixel counts, descending")
    scores: list[float] = Field(description="segmenter confidence per mask (1.0 when it has none)")
    crop_size: int | None = Field(description="size of the K.crop_NN.jpg members; null: none stored")
    part_names: list[str] | None = Field(None, description="names of the ids in K.parts.png (id = index + 1)")
    has_object: bool = Field(False, description="K.object.png (the ground-truth object mask) is stored")
    extra: dict = Field(default_factory=dict, description="source metadata, e.g. CUB bounding box and parts")

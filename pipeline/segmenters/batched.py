"""Several images through a SAM-family image encoder per forward; the library's own mask generation on each.

The automatic mask generators of ``segment_anything`` and ``sam2`` encode every crop of every image on its own
(``predictor.set_image``). Here the crops of a batch of images are encoded together, ``encoder_batch`` inputs per
forward, optionally under bf16/fp16 autocast, and the generator's predictor takes the stored embedding instead
of encoding again. Points, decoding, thresholds and NMS stay the library's, so in fp32 the masks are the
library loop's.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from segment_anything.utils.amg import generate_crop_boxes  # the same function as sam2's

from pipeline.segmenters import resolve_builder
from pipeline.segmenters.base import Proposal, Segmenter, resolve_device
from schemas.config import SegmenterConfig
from schemas.files import sha256_file

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class EmbeddedPredictor:
    """Mixin for a library predictor: ``set_image`` installs the next stored embedding instead of encoding.

    A family defines ``encoder_input`` (one crop → the encoder's input tensor, as ``set_image`` would make it),
    ``encode`` (a batch of inputs → one fp32 embedding state per input) and ``install`` (a state and the crop's
    height and width → the predictor's own fields)."""

    pending: deque

    def encoder_input(self, crop: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, batch: torch.Tensor) -> list[Any]:
        raise NotImplementedError

    def install(self, state: Any, hw: tuple[int, int]) -> None:
        raise NotImplementedError

    def set_image(self, image: np.ndarray, *args: Any, **kwargs: Any) -> None:
        hw, state = self.pending.popleft()
        if hw != image.shape[:2]:
            raise RuntimeError(f"stored embedding is for a {hw} crop, the generator asked for {image.shape[:2]}")
        self.install(state, hw)


def _crop_boxes(generator: Any, image: np.ndarray) -> list[list[int]]:
    """The boxes of the crops of ``image`` the generator encodes, in its order."""
    return generate_crop_boxes(image.shape[:2], generator.crop_n_layers, generator.crop_overlap_ratio)[0]


def generate_batch(generator: Any, images: list[np.ndarray], *, encoder_batch: int, precision: str = "fp32",
                   overlap: bool = False) -> list[list[dict]]:
    """``generator.generate`` for each image, with every crop of every image encoded in batched forwards (at most
    ``encoder_batch`` inputs held at once). ``generator.predictor`` must be an ``EmbeddedPredictor``.

    ``overlap``: an image's mask generation (decoder, thresholds, NMS, RLE: mostly CPU) runs on a second thread as
    soon as its last crop is encoded, while this thread encodes the next inputs, so a GPU does not wait for the
    post-processing. The masks are the same either way."""
    predictor: EmbeddedPredictor = generator.predictor
    boxes = [_crop_boxes(generator, image) for image in images]
    crops = ((i, image[y0:y1, x0:x1]) for i, image in enumerate(images) for x0, y0, x1, y1 in boxes[i])
    dtype = PRECISIONS[precision]
    per_image: list[list] = [[] for _ in images]

    def generate(i: int) -> list[dict]:
        with torch.inference_mode():  # thread-local: the caller's does not reach a second thread
            predictor.pending = deque(per_image[i])
            return generator.generate(images[i])

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="masks") if overlap else nullcontext() as pool:
        results: list = []
        while chunk := list(itertools.islice(crops, encoder_batch)):
            batch = torch.stack([predictor.encoder_input(crop) for _, crop in chunk])
            with torch.autocast(batch.device.type, dtype=dtype, enabled=dtype is not None):
                states = predictor.encode(batch)
            for (owner, crop), state in zip(chunk, states):
                per_image[owner].append((crop.shape[:2], state))
            while pool is not None and len(results) < len(images) and len(per_image[len(results)]) == len(
                    boxes[len(results)]):  # every crop of the next image is encoded
                results.append(pool.submit(generate, len(results)))
        return [r.result() for r in results] + [generate(i) for i in range(len(results), len(images))]


def read_checkpoint(path: Path, what: str, fix: str) -> Any:
    """A checkpoint file's contents, memory-mapped (no weights read) and without pickled objects; a missing or
    unreadable file is a ``ValueError`` that names it as ``what`` (e.g. "SAM 2 checkpoint") and says how to
    ``fix`` it."""
    if not path.is_file():
        raise ValueError(f"{what} {path}: no such file; {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # not a torch file, truncated, pickled objects refused
        raise ValueError(f"{what} {path}: not a readable checkpoint ({exc}); {fix}") from None


def check_weights(state: dict, expected: dict[str, torch.Size], problem: str, field: str) -> None:
    """``state`` holds exactly the weights of ``expected`` (name → shape), else a ``ValueError``: ``problem`` ("<file>
    is not a <model> checkpoint"), how many weights differ and the first of them, and the config ``field`` to check."""
    found = {k: v.shape for k, v in state.items() if isinstance(v, torch.Tensor)}
    names = expected.keys() | found.keys()
    if wrong := sorted(k for k in names if found.get(k) != expected.get(k)):
        k = wrong[0]
        got = "missing" if k not in found else f"shape {tuple(found[k])}"
        want = "not in the model" if k not in expected else f"expected {tuple(expected[k])}"
        raise ValueError(f"{problem}: {len(wrong)} of {len(names)} weights differ, e.g. {k}: {got}, {want} (does "
                         f"{field} match the file?)")


def records_to_proposal(records: list[dict], size: tuple[int, int]) -> Proposal:
    """A generator's records (``output_mode="binary_mask"``) as a proposal; scores are the predicted IoU."""
    if not records:
        return Proposal(masks=np.zeros((0, *size), dtype=bool), scores=np.zeros(0, dtype=np.float32))
    masks = np.stack([r["segmentation"] for r in records]).astype(bool, copy=False)
    return Proposal(masks=masks, scores=np.array([r["predicted_iou"] for r in records], dtype=np.float32))


class GeneratorSegmenter(Segmenter):
    """A library's automatic mask generator as a segmenter (sam, sam2): the model from ``segmenter.builder``, or
    from ``checkpoint`` (checked by ``check`` on construction, so the driver finds a bad file before any worker
    starts); the generator is built on first use (``generator``), so ``params()`` and ``checkpoint_sha256()``
    load no weights. Scores are the predicted IoU; ``batch_size`` images per call share encoder forwards."""

    def __init__(self, config: SegmenterConfig, *, check: Callable[[Path], None]) -> None:
        self.config = config
        self.batch_size = config.batch_size
        self._builder = resolve_builder(config.builder) if config.builder else None
        self._checkpoint = None if self._builder else config.checkpoint
        if self._checkpoint is not None:
            check(Path(self._checkpoint))
        self.device = resolve_device(config.device)

    @cached_property
    def generator(self) -> Any:
        """The library's generator around the model (built and moved to the device on first use)."""
        if self._builder is not None:
            model = self._builder()
        else:
            model = self.empty_model()
            try:
                model.load_state_dict(self.read_checkpoint(Path(self._checkpoint)))
            except RuntimeError as exc:
                field = next(iter(self.model_params()))
                raise ValueError(f"{self._checkpoint} is not a {self.model_label()} checkpoint (does segmenter.{field} "
                                 f"match the file?): {exc}") from exc
        return self.wrap(model.to(self.device).eval())

    def empty_model(self) -> torch.nn.Module:
        """The checkpoint's model, before its weights are loaded."""
        raise NotImplementedError

    def read_checkpoint(self, path: Path) -> dict:
        """The state dict in a checkpoint file."""
        raise NotImplementedError

    def wrap(self, model: torch.nn.Module) -> Any:
        """The library's generator around the model, with an ``EmbeddedPredictor``."""
        raise NotImplementedError

    def model_label(self) -> str:
        """The checkpoint's model in words, for errors."""
        raise NotImplementedError

    def model_params(self) -> dict:
        """What names the model when it comes from a checkpoint (recorded in the manifest)."""
        raise NotImplementedError

    def generator_params(self) -> dict:
        raise NotImplementedError

    def __call__(self, image: np.ndarray) -> Proposal:
        return self.propose_batch([image])[0]

    def propose_batch(self, images: list[np.ndarray]) -> list[Proposal]:
        # The images are RGB, as both libraries' predictors expect by default. The reference implementation passed
        # cv2's BGR array here, a channel-order bug that this pipeline does not reproduce.
        with torch.inference_mode():
            per_image = generate_batch(self.generator, images, encoder_batch=self.config.encoder_batch,
                                       precision=self.config.precision, overlap=self.device == "cuda")
        return [records_to_proposal(records, image.shape[:2]) for records, image in zip(per_image, images)]

    def params(self) -> dict:
        model = {"builder": self.config.builder} if self._builder else self.model_params()
        precision = {"precision": self.config.precision} if self.config.precision != "fp32" else {}
        return {**model, **self.generator_params(), **precision}

    def checkpoint_sha256(self) -> str | None:
        return self._sha256

    @cached_property
    def _sha256(self) -> str | None:
        return None if self._checkpoint is None else sha256_file(Path(self._checkpoint))

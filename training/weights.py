"""Pretrained backbone weights as a plain state dict, from a torchvision weights enum name or a local file.

Enum names ("IMAGENET1K_V1", "DEFAULT", "ResNet50_Weights.IMAGENET1K_V2") resolve through torchvision's own
cache, ``<torch.hub.get_dir()>/checkpoints/`` (honours $TORCH_HOME): a file already there is used without the
network; otherwise torchvision downloads it, and when that is impossible a ``WeightsError`` says where to put it.
"""

from __future__ import annotations

import http.client
import os
import re
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision.models as tvm
from torchvision.models import WeightsEnum

_FILE_SUFFIXES = (".pth", ".pt", ".bin")
# Old DenseNet checkpoints name layers "norm.1"/"conv.2"; the modules are now "norm1"/"conv2" (as in
# torchvision.models.densenet._load_state_dict, which applies the same renaming inside the model builder).
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


class WeightsError(FileNotFoundError):
    """Weights that are not on this machine: a missing local file, or enum weights that could not be downloaded."""


def backbone_state_dict(backbone: str, weights: str) -> dict[str, torch.Tensor]:
    """The state dict for ``torchvision.models.<backbone>()`` named by ``weights`` (enum name or file path).

    Raises ``WeightsError`` for a missing file or failed download, ``ValueError`` for an unknown enum name, an enum of
    another backbone, or a file that is not a state dict of tensors.
    """
    if _is_path(weights):
        path = Path(weights)
        if not path.is_file():
            raise WeightsError(f"weights file {path} does not exist")
        state = _load_file(path)
    else:
        state = _enum_state_dict(backbone, weights)
    if backbone.startswith("densenet"):
        state = {_DENSENET_OLD_KEY.sub(r"\1\2", key): value for key, value in state.items()}
    return state


def _is_path(weights: str) -> bool:
    separators = {os.sep, "/"} | ({os.altsep} if os.altsep else set())
    return any(s in weights for s in separators) or weights.endswith(_FILE_SUFFIXES) or Path(weights).is_file()


def _resolve_enum(backbone: str, name: str) -> WeightsEnum:
    enum = tvm.get_model_weights(backbone)
    qualifier, _, member = name.rpartition(".")
    given_class = qualifier.rpartition(".")[2]
    if given_class and given_class != enum.__name__:
        raise ValueError(f"weights {name!r} are {given_class}, but backbone {backbone!r} takes {enum.__name__}")
    if member not in enum.__members__:
        valid = ", ".join(enum.__members__)
        raise ValueError(
            f"weights {name!r} is neither a file nor a {enum.__name__} name for {backbone!r}; "
            f"valid names: {valid} (a local state-dict file path is also accepted)"
        )
    return enum[member]


def _enum_state_dict(backbone: str, name: str) -> dict[str, torch.Tensor]:
    weights = _resolve_enum(backbone, name)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)
    if cached.is_file():
        return _load_file(cached)
    try:
        state = weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, http.client.HTTPException) as error:
        raise WeightsError(
            f"Could not download the {weights!r} weights for {backbone} ({error}). On a machine with internet, "
            f"download {weights.url} and place the file at {cached} (torchvision's cache, under $TORCH_HOME), "
            f"or pass the path of a local state-dict file instead."
        ) from error
    return _as_state_dict(state, cached)


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises assorted types (UnpicklingError, RuntimeError, EOFError...)
        raise ValueError(f"weights file {path} is not a plain state dict (torch.load refused it: {error})") from error
    return _as_state_dict(obj, path)


def _as_state_dict(obj: object, source: Path) -> dict[str, torch.Tensor]:
    """Unwrap ``{"state_dict": ...}`` / ``{"model": ...}`` and a "module." (DataParallel) key prefix; check types."""
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise ValueError(f"weights file {source} is not a state dict (a dict of parameter names to tensors)")
    if all(key.startswith("module.") for key in obj):
        obj = {key.removeprefix("module."): value for key, value in obj.items()}
    return dict(obj)

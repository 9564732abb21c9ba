"""Backbone weights by torchvision enum name (through a local TORCH_HOME cache) or file; never touches the network."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlparse

import pytest
import torch
import torchvision.models as tvm
import torchvision.models._api

from training.weights import WeightsError, backbone_state_dict


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch) -> Path:
    """An empty torchvision cache under tmp_path; any download attempt fails at once."""

    def no_network(url: str, *args, **kwargs):
        raise URLError("network disabled in tests")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    return tmp_path


def cache_path(weights: tvm.WeightsEnum) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


@pytest.fixture
def cached_resnet18() -> dict[str, torch.Tensor]:
    state = tvm.resnet18().state_dict()
    path = cache_path(tvm.ResNet18_Weights.IMAGENET1K_V1)
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return state


@pytest.mark.parametrize("name", ["IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1", "DEFAULT"])
def test_enum_name_loads_from_cache(cached_resnet18, name: str) -> None:
    state = backbone_state_dict("resnet18", name)
    assert torch.equal(state["conv1.weight"], cached_resnet18["conv1.weight"])
    tvm.resnet18().load_state_dict(state)


def test_wrong_weights_class_names_both() -> None:
    with pytest.raises(ValueError, match="ResNet50_Weights.*ResNet18_Weights"):
        backbone_state_dict("resnet18", "ResNet50_Weights.IMAGENET1K_V2")


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT") as info:
        backbone_state_dict("resnet50", "IMAGENET1K_V9")
    assert "file path" in str(info.value)


def test_offline_empty_cache_says_where_to_put_the_file() -> None:
    weights = tvm.ResNet18_Weights.IMAGENET1K_V1
    with pytest.raises(WeightsError) as info:
        backbone_state_dict("resnet18", "IMAGENET1K_V1")
    message = str(info.value)
    assert weights.url in message and str(cache_path(weights)) in message
    assert isinstance(info.value, FileNotFoundError)


def test_local_file_plain_and_wrapped(tmp_path) -> None:
    state = tvm.resnet18().state_dict()
    plain, wrapped = tmp_path / "plain.pth", tmp_path / "wrapped.bin"
    torch.save(state, plain)
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    for path in (plain, wrapped):
        loaded = backbone_state_dict("resnet18", str(path))
        assert loaded.keys() == state.keys() and torch.equal(loaded["fc.weight"], state["fc.weight"])


def test_missing_file_is_named(tmp_path) -> None:
    with pytest.raises(WeightsError, match="nope.pth"):
        backbone_state_dict("resnet50", str(tmp_path / "nope.pth"))


class NotWeights:
    pass


@pytest.mark.parametrize("obj", [{"a": NotWeights()}, {"a": 1}, [torch.zeros(1)]])
def test_non_state_dict_file_refused(tmp_path, obj) -> None:
    path = tmp_path / "odd.pt"
    torch.save(obj, path)
    with pytest.raises(ValueError, match="odd.pt"):
        backbone_state_dict("resnet18", str(path))


def test_densenet_old_keys_are_renamed() -> None:
    state = tvm.densenet121().state_dict()
    new_key = r"(denselayer\d+\.(?:norm|conv))([12])\.(weight|bias|running_mean|running_var)$"  # the fix-up, inverted
    old_style = {re.sub(new_key, r"\1.\2.\3", k): v for k, v in state.items()}
    assert "features.denseblock1.denselayer1.norm.1.weight" in old_style
    path = cache_path(tvm.DenseNet121_Weights.IMAGENET1K_V1)
    path.parent.mkdir(parents=True)
    torch.save(old_style, path)
    loaded = backbone_state_dict("densenet121", "IMAGENET1K_V1")
    tvm.densenet121().load_state_dict(loaded)  # strict
    old, new = "features.denseblock1.denselayer1.norm.1.weight", "features.denseblock1.denselayer1.norm1.weight"
    assert torch.equal(loaded[new], old_style[old])

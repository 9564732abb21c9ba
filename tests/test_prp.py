"""PRP relevance (spec §6.1) on tiny random models: conservation, zero outside the matched mask, the explain CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import segment_without_ray
from test_explain import TINY, _fake_run

from protomask.cli import main
from schemas.config import ModelConfig, SegmentConfig
from schemas.shard import SampleRecord
from training.data import ShardDataset
from training.explain import explain_sample, read_samples, region_masks
from training.model import ProtoMask, build_model
from training.prp import prp_relevance


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("prp")
    return segment_without_ray(SegmentConfig.model_validate(dict(
        source="synthetic", root=tmp / "synth", out=tmp / "shards", shard_size=8, masks_per_image=4,
        synthetic={"num_classes": 2, "train_per_class": 4, "test_per_class": 3, "image_size": 64},
    )))


def _random_model(config: ModelConfig) -> ProtoMask:
    """An eval-mode model whose BatchNorms have non-trivial statistics, so folding them matters."""
    torch.manual_seed(0)
    model = build_model(config, num_classes=2).eval()
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.1, 0.1)
    return model


@pytest.mark.parametrize(("backbone", "regions", "epsilon", "kind", "embedding"), [
    ("convnet", "masks", 1e-4, "protomask", "sigmoid"), ("convnet", "masks", 1e-14, "protomask", "sigmoid"),
    ("convnet", "patches", 1e-4, "protomask", "sigmoid"), ("resnet18", "masks", 1e-4, "protomask", "sigmoid"),
    ("vgg16", "masks", 1e-4, "protomask", "sigmoid"), ("convnet", "patches", 1e-4, "protopnet", "sigmoid"),
    ("convnet", "patches", 1e-4, "protopool", "sigmoid"), ("convnet", "masks", 1e-4, "protomask", "normalized"),
    ("convnet", "patches", 1e-4, "protopnet", "normalized"),
])
def test_relevance_is_conserved(backbone: str, regions: str, epsilon: float, kind: str, embedding: str) -> None:
    """Biases are ignored (the reference's conv2d_ignorebias), so the input relevance sums to the explained
    similarity up to the 1e-6 stabilisers: within 1e-3 relative."""
    config = ModelConfig(kind=kind, backbone=backbone, width=4, prototype_dim=8, input_size=32, prototypes_per_class=2,
                         regions=regions, patch_grid=2, similarity_epsilon=epsilon, embedding=embedding)
    model = _random_model(config)
    k = 3 if regions == "masks" else 1  # mask crops, or the whole image
    crops, valid = torch.randn(1, k, 3, 32, 32), torch.ones(1, k, dtype=torch.bool)
    out = model(crops, valid)
    nearest = out.nearest_mask[0]  # per prototype: its mask crop, or its patch of the one image
    first = torch.zeros_like(nearest)
    crop_of, cells = (nearest, first) if regions == "masks" else (first, nearest)
    relevance = prp_relevance(model, crops[0, crop_of], prototypes=torch.arange(len(nearest)), cells=cells)
    assert relevance.shape == (len(nearest), 3, 32, 32)
    explained = model.similarity(out.min_distances[0])  # ProtoPool's focal similarity subtracts its mean term
    assert torch.allclose(relevance.sum((1, 2, 3)), explained, rtol=1e-3, atol=0)
    assert torch.equal(model(crops, valid).logits, out.logits)  # the canonizers are undone


def test_backbone_without_canonizer_is_refused() -> None:
    model = ProtoMask(ModelConfig(backbone="densenet121", prototype_dim=8, input_size=32, prototypes_per_class=1), 2)
    with pytest.raises(ValueError, match="densenet121"):
        prp_relevance(model.eval(), torch.rand(1, 3, 32, 32), prototypes=torch.tensor([0]), cells=torch.tensor([0]))


def test_prp_saliency_is_zero_outside_the_matched_mask(shards: Path) -> None:
    """The reference pasted the crop's relevance into the mask's whole box; here the box pixels off the mask are 0."""
    dataset = ShardDataset.open(shards)
    model = _random_model(TINY)
    (_, members), = read_samples(dataset, [dataset.rows[1]["key"]])
    record = SampleRecord.model_validate_json(members["json"])
    masks = region_masks(model, members, record)
    binary = explain_sample(model, members, k=3)
    prp = explain_sample(model, members, k=3, relevance="prp")
    assert [e.prototype for e in prp.evidence] == [e.prototype for e in binary.evidence]
    off_mask_in_box = 0
    for e, saliency in zip(prp.evidence, prp.saliency):
        mask = masks[e.mask_index]
        x0, y0, x1, y1 = record.boxes[e.mask_index]
        box = np.zeros_like(mask)
        box[y0 : y1 + 1, x0 : x1 + 1] = True
        assert saliency[~mask].max(initial=0) == 0 and saliency.min() >= 0 and saliency[mask].max() > 0
        off_mask_in_box += int((box & ~mask).sum())
    assert off_mask_in_box > 0  # the boxes do hold pixels off their masks


def test_explain_cli_with_prp_relevance(shards: Path, tmp_path: Path, capsys) -> None:
    _fake_run(shards, tmp_path / "run")
    out = tmp_path / "explain"
    assert main(["explain", "--run-dir", str(tmp_path / "run"), "--shards", str(shards), "--out", str(out),
                 "--limit", "2", "--top-k", "2", "--relevance", "prp"]) == 0
    summary = json.loads((out / "explanations.json").read_text())
    assert summary["relevance"] == "prp" and len(summary["explanations"]) == 2
    assert all((out / record["png"]).is_file() for record in summary["explanations"])
    assert all((out / name).is_file() for name in summary["gallery"])
    assert "gallery:" in capsys.readouterr().out


def test_pipnet_relevance_is_its_channel_at_the_cell() -> None:
    """PIP-Net's prototype is a backbone channel: the relevance starts from that channel's (positive) feature at
    the matched cell, and is conserved down to the input."""
    model = _random_model(ModelConfig(kind="pipnet", backbone="convnet", width=4, input_size=32))
    crops = torch.randn(3, 3, 32, 32)
    channels, cells = torch.tensor([0, 5, 9]), torch.tensor([0, 1, 3])
    features = model.backbone(crops).flatten(2)[torch.arange(3), channels, cells]
    relevance = prp_relevance(model, crops, prototypes=channels, cells=cells)
    assert torch.allclose(relevance.sum((1, 2, 3)), features, rtol=1e-3, atol=1e-7)

"""Model shapes, padding, and loss terms against hand-computed tiny cases."""

from __future__ import annotations

import math

import pytest
import torch

from schemas.config import LossConfig, ModelConfig
from training.losses import class_weights, cluster_loss, diversity_loss, l1_off_class, separation_loss, total_loss
from training.model import ProtoMask, ProtoPNet, build_model

TINY = ModelConfig(backbone="convnet", width=4, prototype_dim=8, input_size=16, prototypes_per_class=2)


def test_forward_shapes_and_last_layer_init() -> None:
    model = ProtoMask(TINY, num_classes=3)
    out = model(torch.rand(2, 5, 3, 20, 20), torch.ones(2, 5, dtype=torch.bool))
    assert out.logits.shape == (2, 3) and out.min_distances.shape == (2, 6) and out.nearest_mask.shape == (2, 6)
    assert model.prototype_class.tolist() == [0, 0, 1, 1, 2, 2]
    assert model.last_layer.weight.tolist()[1] == [0, 0, 1, 1, 0, 0]
    assert "prototype_class" in model.state_dict()
    one = model(torch.rand(1, 1, 3, 16, 16), torch.ones(1, 1, dtype=torch.bool))  # B·K == 1: no squeeze bug
    assert one.logits.shape == (1, 3)


@pytest.mark.parametrize("backbone", ["resnet18", "vgg16", "densenet121"])
def test_torchvision_backbones(backbone: str) -> None:
    model = ProtoMask(ModelConfig(backbone=backbone, prototype_dim=8, input_size=32, prototypes_per_class=1), 2)
    assert model(torch.rand(1, 2, 3, 32, 32), torch.ones(1, 2, dtype=torch.bool)).logits.shape == (1, 2)


def test_missing_weights_file_named(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        ProtoMask(ModelConfig(backbone="resnet18", weights=str(tmp_path / "nope.pth")), 2)


def test_distance_is_squared_l2_and_similarity_is_log() -> None:
    model = ProtoMask(TINY, num_classes=1)
    z = torch.rand(1, 3, 8)
    expected = ((z[0, :, None, :] - model.prototypes[None]) ** 2).sum(-1)
    assert torch.allclose(model.distances(z)[0], expected, atol=1e-5)
    d = torch.tensor([2.0, 0.0])
    assert torch.allclose(model.similarity(d), torch.tensor([math.log(3 / (2 + 1e-4)), math.log(1e4)]))
    reference = ProtoMask(TINY.model_copy(update={"similarity_epsilon": 1e-14}), num_classes=1)
    assert reference.similarity(d.double()).tolist() == pytest.approx([math.log(3 / 2), math.log(1e14)])  # 32.2 at d=0


def test_forward_uses_the_similarity_epsilon() -> None:
    crops, valid = torch.rand(1, 2, 3, 16, 16), torch.ones(1, 2, dtype=torch.bool)
    for eps in (1e-4, 1e-14):
        torch.manual_seed(0)
        model = ProtoMask(TINY.model_copy(update={"similarity_epsilon": eps}), num_classes=2)
        out = model(crops, valid)
        assert torch.allclose(out.similarities, torch.log((out.min_distances + 1) / (out.min_distances + eps)))


def test_padding_never_wins_the_min() -> None:
    model = ProtoMask(TINY, num_classes=2)
    crops = torch.rand(1, 3, 3, 16, 16)
    z = model.embed(crops)
    with torch.no_grad():
        model.prototypes[:] = z[0, 2]  # every prototype sits exactly on crop 2
    valid = torch.tensor([[True, True, False]])
    out = model(crops, valid)
    assert (out.nearest_mask != 2).all() and (out.min_distances > 0).all()
    out_all = model(crops, torch.ones(1, 3, dtype=torch.bool))
    assert (out_all.nearest_mask == 2).all()


def test_cluster_and_separation_by_hand() -> None:
    d = torch.tensor([[1.0, 4.0, 9.0, 0.5], [2.0, 3.0, 7.0, 8.0]])
    cls = torch.tensor([0, 0, 1, 1])
    labels = torch.tensor([0, 1])
    assert cluster_loss(d, labels, cls).item() == pytest.approx((1.0 + 7.0) / 2)
    assert separation_loss(d, labels, cls).item() == pytest.approx((0.5 + 2.0) / 2)


def test_diversity_by_hand_and_has_gradient() -> None:
    p = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [1.0, 1.0]], requires_grad=True)
    cls = torch.tensor([0, 0, 1, 1])
    div = diversity_loss(p, torch.tensor([0, 1]), cls)
    # class 0: pairs (0,1),(1,0) at distance 5 → exp(-1e-3*10); class 1: identical → exp(0)
    assert div.item() == pytest.approx((math.exp(-0.01) + 1.0) / 2, rel=1e-5)
    div.backward()
    assert p.grad is not None and p.grad[:2].abs().sum() > 0


def test_l1_and_class_weights() -> None:
    model = ProtoMask(TINY, num_classes=2)
    with torch.no_grad():
        model.last_layer.weight[:] = torch.tensor([[1.0, 1.0, -0.5, 0.25], [2.0, 0.0, 1.0, 1.0]])
    assert l1_off_class(model).item() == pytest.approx(0.5 + 0.25 + 2.0)
    assert class_weights([30, 10, 0]).tolist() == pytest.approx([40 / 90, 40 / 30, 0.0])


def test_total_loss_per_phase() -> None:
    model = ProtoMask(TINY, num_classes=2)
    out = model(torch.rand(2, 2, 3, 16, 16), torch.ones(2, 2, dtype=torch.bool))
    labels = torch.tensor([0, 1])
    cfg = LossConfig()
    loss, terms = total_loss(out, labels, model, cfg, "joint", None)
    expected = terms["cross_entropy"] + 0.8 * terms["cluster"] - 0.2 * terms["separation"] + 0.2 * terms["diversity"]
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss, terms = total_loss(out, labels, model, cfg, "last_layer", None)
    assert set(terms) == {"cross_entropy", "l1"}
    assert loss.item() == pytest.approx(terms["cross_entropy"] + 1e-3 * terms["l1"], rel=1e-5)


def test_patch_baseline_regions() -> None:
    cfg = TINY.model_copy(update={"regions": "patches", "patch_grid": 3})
    model = ProtoMask(cfg, num_classes=2)
    image = torch.rand(2, 1, 3, 16, 16)
    z = model.embed(image)
    assert z.shape == (2, 9, 8)  # 3x3 patches of the whole image
    assert model.region_valid(torch.tensor([[True], [False]])).tolist() == [[True] * 9, [False] * 9]
    out = model(image, torch.ones(2, 1, dtype=torch.bool))
    assert out.logits.shape == (2, 2) and int(out.nearest_mask.max()) < 9


def test_protopnet_architecture() -> None:
    """Spec §8: two-layer 1×1 add-on (ReLU, sigmoid) to 128 channels on the whole image's own feature map."""
    cfg = ModelConfig(kind="protopnet", backbone="convnet", width=4, input_size=32, prototypes_per_class=2)
    assert (cfg.regions, cfg.prototype_dim) == ("patches", 128)  # the kind's defaults
    assert ModelConfig(kind="protopnet", prototype_dim=16).prototype_dim == 16  # set fields win
    with pytest.raises(ValueError, match="kind protopnet has prototypes on the whole image's feature map"):
        ModelConfig(kind="protopnet", regions="masks")
    model = build_model(cfg, num_classes=3)
    assert isinstance(model, ProtoPNet) and model.grid == 2  # 32 px through 4 max-pools
    assert [type(m) for m in model.add_on] == [torch.nn.Conv2d, torch.nn.ReLU, torch.nn.Conv2d, torch.nn.Sigmoid]
    assert not any(model.add_on[i].bias.detach().any() for i in (0, 2))
    assert model.prototypes.shape == (6, 128)
    assert model.backbone.training  # sizing the grid left the backbone's mode alone
    image = torch.rand(2, 1, 3, 32, 32)
    assert model.embed(image).shape == (2, 4, 128)  # 2x2 cells
    out = model(image, torch.ones(2, 1, dtype=torch.bool))
    assert out.logits.shape == (2, 3) and int(out.nearest_mask.max()) < 4
    assert build_model(ModelConfig(kind="protopnet", backbone="resnet18", input_size=224), 2).grid == 7

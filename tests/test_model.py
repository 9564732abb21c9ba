"""Model shapes, padding, and loss terms against hand-computed tiny cases."""

from __future__ import annotations

import math

import pytest
import torch

from schemas.config import LossConfig, ModelConfig, TrainConfig
from training.losses import (alignment_loss, class_weights, cluster_loss, diversity_loss, l1_off_class,
                             orthogonality_loss, pool_cluster_separation, separation_loss, tanh_loss, total_loss)
from training.model import (PIPNet, ProtoMask, ProtoPNet, ProtoPool, build_model, create_backbone, gumbel_scale,
                            hide_regions)

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


@pytest.mark.parametrize("kind", ["protomask", "protopnet"])
def test_normalized_embedding_has_unit_length(kind: str) -> None:
    """model.embedding: normalized puts every region on the unit sphere, so a squared distance to a unit
    prototype is 2 − 2 · cosine; padded crops stay zero."""
    model = build_model(ModelConfig(kind=kind, backbone="convnet", width=4, prototype_dim=8, input_size=16,
                                    prototypes_per_class=2, regions="masks" if kind == "protomask" else "patches",
                                    embedding="normalized"), num_classes=3)
    k = 3 if kind == "protomask" else 1
    valid = torch.ones(2, k, dtype=torch.bool)
    valid[1, k - 1] = kind != "protomask"
    z = model.embed(torch.rand(2, k, 3, 16, 16), valid)
    regions = model.region_valid(valid)
    norms = z.norm(dim=-1)[regions]
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)
    assert (z[~regions] == 0).all()
    assert torch.allclose(model.prototypes.detach().norm(dim=1), torch.ones(6), atol=1e-6)  # drawn on the sphere
    model.prototypes.data.mul_(3)
    model.after_step("joint")  # every optimiser step puts the prototypes back onto the sphere
    unit = model.prototypes.detach()
    assert torch.allclose(unit.norm(dim=1), torch.ones(len(unit)), atol=1e-6)
    assert torch.allclose(model.distances(z)[regions], (2 - 2 * z @ unit.T)[regions].clamp_min(0), atol=1e-5)
    with pytest.raises(ValueError, match="model.embedding: kind protopool has its own add-on"):
        ModelConfig(kind="protopool", embedding="normalized")


@pytest.mark.parametrize("backbone", ["resnet18", "vgg16", "densenet121"])
def test_torchvision_backbones(backbone: str) -> None:
    model = ProtoMask(ModelConfig(backbone=backbone, prototype_dim=8, input_size=32, prototypes_per_class=1), 2)
    assert model(torch.rand(1, 2, 3, 32, 32), torch.ones(1, 2, dtype=torch.bool)).logits.shape == (1, 2)


@pytest.mark.parametrize("backbone", ["convnet", "resnet18"])
def test_channels_last_trunk_is_the_same_function(backbone: str) -> None:
    torch.manual_seed(0)
    nchw, _ = create_backbone(backbone, None, 8, channels_last=False)
    trunk, _ = create_backbone(backbone, None, 8)
    trunk.load_state_dict(nchw.state_dict())  # an NCHW state dict loads and keeps the trunk's layout
    trunk.eval(), nchw.eval()  # BatchNorm on batch statistics of 3 images would amplify the rounding
    conv = next(m for m in trunk.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    x = torch.rand(3, 3, 64, 64, requires_grad=True)
    y = trunk(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, nchw(x), rtol=1e-4, atol=1e-4)
    y.sum().backward()  # the input's gradient goes through the layout change
    grad, x.grad = x.grad, None
    nchw(x).sum().backward()
    # rounding may flip a max-pool's winner between two near-equal cells (2 % of the norm seen with seed 1)
    assert float((grad - x.grad).norm() / x.grad.norm()) < 0.05


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


def test_match_dropout_leaves_regions_out_of_the_minimum() -> None:
    """``model.match_dropout``: about that share of the shown regions is left out, never a padded one is shown, and
    an image that would keep none (one with a single region, say) keeps all of its own."""
    torch.manual_seed(0)
    shown = torch.rand(2000, 8) < 0.9
    shown[:, 0] = True
    kept = hide_regions(shown, 0.5)
    assert not (kept & ~shown).any() and kept.any(1).all()
    assert 0.45 < 1 - kept.sum() / shown.sum() < 0.5  # 0.5, less the few images that keep all
    single = torch.zeros(500, 8, dtype=torch.bool)
    single[:, 3] = True
    assert torch.equal(hide_regions(single, 0.9), single)


def test_match_dropout_in_training_only() -> None:
    """In training each prototype's minimum runs over the regions left in (so it can only grow); in evaluation,
    as in push, over all of them, as with match_dropout 0."""
    torch.manual_seed(0)
    model = ProtoMask(TINY.model_copy(update={"match_dropout": 0.5}), num_classes=2)
    crops, valid = torch.rand(4, 6, 3, 16, 16), torch.ones(4, 6, dtype=torch.bool)
    paper = model.config.model_copy(update={"match_dropout": 0.0})
    for mode in (True, False):
        model.train(mode)
        out = model(crops, valid)
        model.config, dropout = paper, model.config
        full = model(crops, valid)  # the same embeddings: BatchNorm reads the same batch
        model.config = dropout
        if mode:
            assert (out.min_distances >= full.min_distances).all()
            assert (out.min_distances > full.min_distances).any()
        else:
            assert torch.equal(out.min_distances, full.min_distances)
    with pytest.raises(ValueError, match="model.match_dropout: kind protopool matches its prototypes its own way"):
        ModelConfig(kind="protopool", match_dropout=0.5)
    with pytest.raises(ValueError, match="match_dropout"):
        ModelConfig(match_dropout=1.0)


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


def test_protopool_forward_presence_and_focal_similarity() -> None:
    cfg = ModelConfig(kind="protopool", backbone="convnet", width=4, input_size=32, prototypes_per_class=2,
                      prototype_dim=8, pool_size=5)
    model = build_model(cfg, num_classes=3)
    assert isinstance(model, ProtoPool) and not model.pushes and model.grid == 2
    assert model.prototypes.shape == (5, 8) and model.proto_presence.shape == (3, 5, 2)
    assert model.last_layer.weight.shape == (3, 6) and model.last_layer.weight.tolist()[1] == [0, 0, 1, 1, 0, 0]
    image, valid = torch.rand(4, 1, 3, 32, 32), torch.ones(4, 1, dtype=torch.bool)
    out = model(image, valid)
    assert out.logits.shape == (4, 3) and out.min_distances.shape == (4, 5) and out.presence.shape == (3, 5, 2)
    d = model.distances(model.embed(image))  # [4, 4 cells, 5]
    focal = model.similarity(d.min(1).values) - model.similarity(d.mean(1))
    assert torch.allclose(out.similarities, focal, atol=1e-5)
    assert torch.allclose(out.presence.sum(1), torch.ones(3, 2))  # a distribution over the pool per slot
    mixed = torch.einsum("bp,cps->bcs", focal, out.presence).flatten(1)
    assert torch.allclose(out.logits, mixed @ model.last_layer.weight.T, atol=1e-5)
    model.gumbel_scale.fill_(1000.0)
    model.eval()
    assert torch.equal(model(image, valid).logits, model(image, valid).logits)  # no Gumbel noise in evaluation
    model.train()
    assert not torch.equal(model(image, valid).presence, model(image, valid).presence)  # noise in training
    weights = model.prototype_weights()  # [C, P]: the logit each prototype's similarity adds to
    assert weights.shape == (3, 5)
    assert torch.allclose(focal @ weights.T, (torch.einsum("bp,cps->bcs", focal, model.presence(noise=False))
                                              .flatten(1) @ model.last_layer.weight.T), atol=1e-5)
    with pytest.raises(ValueError, match="pool_size: 2 prototypes cannot fill 2 distinct slots"):
        build_model(cfg.model_copy(update={"pool_size": 2}), 3)


def test_gumbel_scale_schedule() -> None:
    """The reference's: a plain softmax first, then √(1000² · (e − 1) / 50) within [1, 1000]."""
    assert [round(gumbel_scale(e, 50), 1) for e in (0, 1, 2, 3, 26, 51, 80)] == [0.0, 1.0, 141.4, 200.0, 707.1,
                                                                                   1000.0, 1000.0]


def test_protopool_losses_by_hand() -> None:
    min_d = torch.tensor([[0.5, 0.2, 0.9, 0.1]])  # one image of class 0, pool of 4
    presence = torch.zeros(2, 4, 2)  # class 0's slots hold prototypes 2 and 0; class 1's hold 1 and 3
    presence[0, 2, 0] = presence[0, 0, 1] = presence[1, 1, 0] = presence[1, 3, 1] = 1.0
    clst, sep = pool_cluster_separation(min_d, torch.tensor([0]), presence)
    assert clst.item() == pytest.approx(0.5) and sep.item() == pytest.approx(0.1)  # min of {0.5, 0.9}, {0.2, 0.1}
    raw = torch.zeros(1, 3, 2)
    raw[0, :, 0], raw[0, :, 1] = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 0.0])
    assert orthogonality_loss(raw).item() == pytest.approx(2 * (1 / math.sqrt(2)) / 2)  # two ordered pairs / (2·1)


def test_protopool_config_rules() -> None:
    cfg = ModelConfig(kind="protopool")
    assert (cfg.regions, cfg.prototype_dim) == ("patches", 128)
    base = {"shards": "s", "run_dir": "r", "model": {"kind": "protopool"}}
    for schedule in ({"pretrain_epochs": 1, "prototype_init": "crops"}, {"prune": True}):
        with pytest.raises(ValueError, match="model.kind protopool shares its prototypes"):
            TrainConfig.model_validate({**base, "schedule": schedule})


def test_pipnet_forward_losses_and_last_layer_rules() -> None:
    cfg = ModelConfig(kind="pipnet", backbone="convnet", width=4, input_size=32)
    model = build_model(cfg, num_classes=3)
    assert isinstance(model, PIPNet) and not model.pushes and model.num_prototypes == 32 and model.grid == 2
    image, valid = torch.rand(4, 1, 3, 32, 32), torch.ones(4, 1, dtype=torch.bool)
    out = model(image, valid)
    assert out.cell_presence.shape == (4, 4, 32) and torch.allclose(out.cell_presence.sum(-1), torch.ones(4, 4))
    assert torch.equal(out.similarities, out.cell_presence.max(1).values)
    expected = torch.log1p((out.similarities @ torch.relu(model.last_layer.weight).T) ** 2.0)
    assert torch.allclose(out.logits, expected, atol=1e-6)
    a = torch.tensor([[[0.5, 0.5], [1.0, 0.0]]])
    b = torch.tensor([[[0.5, 0.5], [0.5, 0.5]]])
    assert alignment_loss(a, b).item() == pytest.approx(-(math.log(0.5) + math.log(0.5)) / 2)
    pooled = torch.tensor([[0.5, 0.0], [0.5, 1.0]])  # Σ over images: 1 and 1
    assert tanh_loss(pooled).item() == pytest.approx(-math.log(math.tanh(1.0) + 1e-8))
    labels = torch.tensor([0, 1, 0, 1])  # two images, two views each
    two = model(torch.cat([image[:2], image[:2]]), valid)
    loss, terms = total_loss(two, labels, model, LossConfig(cross_entropy=2.0), "warmup", None, warmup_progress=0.5)
    assert loss.item() == pytest.approx(0.5 * 5 * terms["alignment"] + 5 * terms["tanh"], rel=1e-5)  # no CE
    loss, terms = total_loss(two, labels, model, LossConfig(cross_entropy=2.0), "joint", None)
    assert loss.item() == pytest.approx(2 * terms["cross_entropy"] + 5 * terms["alignment"] + 2 * terms["tanh"],
                                        rel=1e-5)
    with torch.no_grad():
        model.last_layer.weight[0, :3] = torch.tensor([0.0005, -0.2, 0.5])
        model.multiplier.fill_(0.5)
    model.after_step("joint")
    assert model.last_layer.weight[0, :3].tolist() == pytest.approx([0.0, 0.0, 0.499])
    assert model.multiplier.item() == 1.0

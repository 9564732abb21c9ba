"""PRP (spec §6.1): layer-wise relevance propagation of a prototype's similarity to one region, through zennit.

The rules are the reference's (``lrp_params_def1``): the similarity ``s`` of the region's embedding ``z`` to the
prototype ``p`` is split over the embedding's channels in proportion to ``1 / ((z_c - p_c)² + 1e-12)`` (PRP's L2
rule); the sigmoid (or ``model.embedding: normalized``'s unit-length scaling) and ReLUs pass relevance on unchanged,
average pools and residual sums split it in proportion to their inputs (stabiliser 1e-6), max pools pass it to the
maximum, every convolution after the first uses z⁺ and the first zᴮ (bounded by the ImageNet-normalised pixel range,
per channel), all of them ignoring their biases.
BatchNorm is folded into the convolution before it (zennit's canonizers: ``ResNetCanonizer``, which also turns the
residual additions into modules, for ResNets; ``SequentialMergeBatchNorm`` for vgg16 and convnet). With the biases
ignored relevance is conserved: the input relevance sums to ``s`` (the reference starts from 1 instead of ``s``, so
its maps differ by that factor), short only of the stabilisers and of units no input feeds positively.
PIP-Net's prototypes are backbone channels: the relevance starts from the channel's feature at the cell (the
reference skips the softmax too).
"""

from __future__ import annotations

import torch
from torch import nn
from zennit.attribution import Gradient
from zennit.canonizers import Canonizer, SequentialMergeBatchNorm
from zennit.composites import SpecialFirstLayerMapComposite, layer_map_base
from zennit.rules import Pass, ZBox, ZPlus
from zennit.torchvision import ResNetCanonizer, VGGCanonizer
from zennit.types import Convolution

from training.data import IMAGENET_MEAN, IMAGENET_STD
from training.model import PIPNet, ProtoMask, UnitLength

STABILIZER = 1e-6  # the reference's ε of residual sums and pools, and the stabiliser of z⁺ and zᴮ
CHANNEL_EPSILON = 1e-12  # PRP's L2 rule: the share of channel c is ∝ 1 / ((z_c - p_c)² + ε)


def canonizers(backbone: str) -> list[Canonizer]:
    """zennit's canonizers for a backbone of ``ModelConfig.backbone``; densenet121 has none."""
    if backbone.startswith("resnet"):
        return [ResNetCanonizer()]
    if backbone == "vgg16":
        return [VGGCanonizer()]
    if backbone == "convnet":
        return [SequentialMergeBatchNorm()]
    raise ValueError(f"relevance prp: no LRP canonizer for the {backbone} backbone (resnet18/34/50, vgg16, convnet)")


def prp_composite(backbone: str) -> SpecialFirstLayerMapComposite:
    """The reference's LRP rules for the backbone and add-on (module docstring)."""
    mean, std = torch.tensor(IMAGENET_MEAN)[None, :, None, None], torch.tensor(IMAGENET_STD)[None, :, None, None]
    no_bias = {"stabilizer": STABILIZER, "zero_params": ["bias"]}
    return SpecialFirstLayerMapComposite(
        layer_map=[(UnitLength, Pass())] + layer_map_base(STABILIZER) + [(Convolution, ZPlus(**no_bias))],
        first_map=[(Convolution, ZBox(low=(0 - mean) / std, high=(1 - mean) / std, **no_bias))],
        canonizers=canonizers(backbone),
    )


def prp_relevance(model: ProtoMask, crops: torch.Tensor, *, prototypes: torch.Tensor, cells: torch.Tensor
                  ) -> torch.Tensor:
    """Input relevance [N, 3, S, S] of the similarity of prototype ``prototypes[i]`` to region ``cells[i]`` of crop
    ``crops[i]`` ([N, 3, S, S], normalised, at the model's input size), all N in one pass. ``cells`` index the
    add-on's grid row-major: 0 for a mask crop, the patch for ``regions: patches``. The model must be in eval mode
    (BatchNorm is folded with its running statistics)."""
    if model.training:
        raise ValueError("relevance prp: the model must be in eval mode")
    rows = torch.arange(len(crops), device=crops.device)
    if isinstance(model, PIPNet):  # a prototype is a backbone channel: its feature value at the cell, as the reference
        def feature_relevance(features: torch.Tensor) -> torch.Tensor:
            relevance = torch.zeros_like(features).flatten(2)
            relevance[rows, prototypes, cells] = features.detach().flatten(2)[rows, prototypes, cells]
            return relevance.view_as(features)

        composite = prp_composite(model.config.backbone)
        _, relevance = Gradient(model.backbone, composite)(crops.detach().clone(), feature_relevance)
        return relevance
    p = model.prototypes.detach()[prototypes]  # [N, D]

    def similarity_relevance(embedding: torch.Tensor) -> torch.Tensor:
        """The relevance at the add-on's output [N, D, g, g]: the L2 rule's share of s, at each region only."""
        z = embedding.detach().flatten(2)[rows, :, cells]  # [N, D]
        s = model.similarity(((z - p) ** 2).sum(1))
        share = 1 / ((z - p) ** 2 + CHANNEL_EPSILON)
        relevance = torch.zeros_like(embedding).flatten(2)
        relevance[rows, :, cells] = s[:, None] * share / share.sum(1, keepdim=True)
        return relevance.view_as(embedding)

    network = nn.Sequential(model.backbone, model.add_on)
    _, relevance = Gradient(network, prp_composite(model.config.backbone))(crops.detach().clone(), similarity_relevance)
    return relevance

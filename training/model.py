"""The networks, built by ``build_model`` from ``ModelConfig.head``:

- ``prototypes`` (ProtoMask, spec §1): every crop → shared backbone → 1×1 add-on → global average pool →
  sigmoid embedding (or unit-length: ``model.embedding``); squared L2 to class-specific prototypes; min over the
  image's *valid* crops; log similarity; bias-free last layer. ``model.kind`` picks the class: ``ProtoMask``, or
  ``ProtoPNet`` (spec §8), which differs only in its add-on and regions (the cells of the whole image's feature map).
- ``linear`` (the black-box reference): the same backbone, global average pool per crop, element-wise
  max over the image's valid crops, a linear layer. On whole images (``regions: patches``) it is the
  plain network the prototype models are measured against.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from schemas.config import ModelConfig
from training.weights import backbone_state_dict


def _convnet(width: int) -> tuple[nn.Module, int]:
    """A small VGG-style CNN for CPU runs: 4 stages, each conv-BN-ReLU twice then max-pool."""
    layers: list[nn.Module] = []
    channels, c = 3, width
    for _ in range(4):
        for _ in range(2):
            layers += [nn.Conv2d(channels, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            channels = c
        layers.append(nn.MaxPool2d(2))
        c *= 2
    return nn.Sequential(*layers), channels


def create_backbone(name: str, weights: str | None = None, width: int = 32, *, channels_last: bool = True
                    ) -> tuple[nn.Module, int]:
    """A convolutional trunk (no pooling/classifier) and its output channels. ``weights``: a torchvision
    weights name (``IMAGENET1K_V2``, resolved through torchvision's cache) or a state-dict file.
    ``channels_last``: weights and inputs in channels-last layout, which oneDNN's CPU convolutions and GPU
    tensor cores prefer (``bench/memory_format.py``: small-cpu's convnet trains 1.25× and infers 1.5× faster on CPU);
    the same function up to float rounding, and state dicts load into it as before."""
    trunk, channels = _trunk(name, weights, width)
    if channels_last:
        trunk.to(memory_format=torch.channels_last)
        trunk.register_forward_pre_hook(_to_channels_last)
    return trunk, channels


def _to_channels_last(_: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])


def _trunk(name: str, weights: str | None, width: int) -> tuple[nn.Module, int]:
    """The trunk in PyTorch's default layout."""
    if name == "convnet":
        if weights is not None:
            raise ValueError("model.weights: the convnet backbone has no pretrained weights")
        return _convnet(width)
    import torchvision.models as tvm

    net = getattr(tvm, name)(weights=None)
    if weights is not None:
        state = backbone_state_dict(name, str(weights))
        missing, _ = net.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(f"model.weights: {weights} does not fit {name}: missing {missing[:5]}...")
    if name.startswith("resnet"):
        trunk = nn.Sequential(*list(net.children())[:-2])
        channels = net.fc.in_features
    elif name == "vgg16":
        trunk, channels = net.features, 512
    else:  # densenet121
        trunk = nn.Sequential(net.features, nn.ReLU(inplace=True))
        channels = net.classifier.in_features
    return trunk, channels


def run_on_crops(network: Callable[[torch.Tensor], torch.Tensor], crops: torch.Tensor, valid: torch.Tensor | None,
                 input_size: int) -> torch.Tensor:
    """``network`` on the valid crops of ``crops`` [B, K, 3, S, S] (resized to ``input_size``), as one batch;
    returns [B, K, ...] with zeros for padded crops. Padded crops never reach the network, so BatchNorm's
    statistics are those of real crops only, and an image with fewer masks costs less."""
    b, k = crops.shape[:2]
    mask = torch.ones(b, k, dtype=torch.bool, device=crops.device) if valid is None else valid.bool()
    x = crops[mask]
    if x.shape[-1] != input_size:
        x = F.interpolate(x, size=input_size, mode="bilinear", align_corners=False)
    y = network(x)
    out = y.new_zeros((b, k, *y.shape[1:]))
    out[mask] = y
    return out


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, C]
    # prototype heads only (None for the linear head)
    min_distances: torch.Tensor | None = None  # [B, P]
    nearest_mask: torch.Tensor | None = None  # [B, P] index of the region (mask, or patch) each prototype matched
    similarities: torch.Tensor | None = None  # [B, P]
    presence: torch.Tensor | None = None  # ProtoPool: [C, P, slots] the slot assignment this forward used
    cell_presence: torch.Tensor | None = None  # PIP-Net: [B, cells, P] each cell's softmax over the prototypes
    auxiliary_logits: torch.Tensor | None = None  # [B, C] loss.auxiliary's classifier, only in phases that train it


def own_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A prototype model's state dict without loss.auxiliary's training-only head (what model.pt holds)."""
    return {k: v for k, v in state.items() if not k.startswith("auxiliary.")}


def hide_regions(shown: torch.Tensor, p: float) -> torch.Tensor:
    """``model.match_dropout``: [B, N] shown regions, each left out with probability ``p``; an image keeps all of
    its regions when none would be left."""
    keep = shown & (torch.rand(shown.shape, device=shown.device) >= p)
    return torch.where(keep.any(1, keepdim=True), keep, shown)


class UnitLength(nn.Module):
    """Scales every embedding [N, D, ...] to unit L2 norm over D."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1)


def embedding_activation(config: ModelConfig) -> nn.Module:
    """The add-on's last step (``model.embedding``): sigmoid (the paper) or unit length."""
    return nn.Sigmoid() if config.embedding == "sigmoid" else UnitLength()


def _as_regions(z: torch.Tensor) -> torch.Tensor:
    """Per-crop maps [B, K, D, g, g] → one row per region (cell of a crop) [B, K·g², D]."""
    return z.flatten(3).transpose(2, 3).flatten(1, 2)


def max_over_crops(z: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, K, F] per-crop features → [B, F], the element-wise max over each image's valid crops."""
    return z.masked_fill(~valid.bool()[..., None], float("-inf")).amax(1)


class ProtoMask(nn.Module):
    """Input crops ``[B, K, 3, S, S]`` and validity ``[B, K]``; padded crops can never win the min."""

    def __init__(self, config: ModelConfig, num_classes: int) -> None:
        super().__init__()
        self.config = config
        self.num_classes = num_classes
        self.backbone, self.channels = create_backbone(config.backbone, config.weights, config.width)
        self.add_on, self.grid = self.make_add_on()
        self.last_layer = nn.Linear(self.make_prototypes(), num_classes, bias=False)
        # loss.auxiliary: the pre-trained linear classifier, trained beside the prototypes; never exported
        self.auxiliary: nn.Linear | None = None
        self.reset_last_layer()

    def make_prototypes(self) -> int:
        """Register the prototypes (U[0, 1) draws, scaled to unit length for ``model.embedding: normalized``) and
        their classes; return the number of last-layer inputs."""
        n = self.num_classes * self.config.prototypes_per_class
        draws = torch.rand(n, self.config.prototype_dim)
        self.prototypes = nn.Parameter(F.normalize(draws, dim=1) if self.config.embedding == "normalized" else draws)
        # class identity is a buffer so it survives pruning and reloading (reference bug, spec §3.2)
        self.register_buffer("prototype_class", torch.arange(n) // self.config.prototypes_per_class)
        return n

    def make_add_on(self) -> tuple[nn.Module, int]:
        """The add-on from backbone features to region embeddings [D, grid, grid], and the grid (1 for masks)."""
        grid = 1 if self.config.regions == "masks" else self.config.patch_grid
        return nn.Sequential(nn.Conv2d(self.channels, self.config.prototype_dim, 1), nn.AdaptiveAvgPool2d(grid),
                             embedding_activation(self.config)), grid

    pushes = True  # push projects the prototypes onto training regions before the last-layer phase

    @property
    def num_prototypes(self) -> int:
        return self.prototypes.shape[0]

    @property
    def class_identity(self) -> torch.Tensor:
        """[C, inputs of the last layer] one-hot: input i (here prototype i) belongs to class c."""
        return F.one_hot(self.prototype_class, self.num_classes).to(self.prototypes.dtype).T

    def prototype_weights(self) -> torch.Tensor:
        """[C, P]: how much each prototype's similarity adds to each class's logit."""
        return self.last_layer.weight

    def reset_last_layer(self) -> None:
        """+1 to own-class inputs, ``off_class_weight`` to the others."""
        identity = self.class_identity
        self.last_layer.weight.data.copy_(identity + self.config.off_class_weight * (1 - identity))

    def embed(self, crops: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """[B, K, 3, S, S] → [B, N, D] sigmoid region embeddings, the valid crops (all when ``valid`` is
        None) through the shared backbone; padded crops get zeros.

        N = K (one per mask crop) or K·grid² (patches: K is 1, the whole image)."""
        z = run_on_crops(lambda x: self.add_on(self.backbone(x)), crops, valid, self.config.input_size)
        return _as_regions(z)

    def embed_and_pool(self, crops: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``embed`` and, from the same backbone pass, the linear head's input: [B, channels], the max over
        each image's valid crops of their globally pooled backbone features."""
        size = self.config.prototype_dim * self.grid * self.grid

        def both(x: torch.Tensor) -> torch.Tensor:
            f = self.backbone(x)
            return torch.cat([self.add_on(f).flatten(1), f.mean((2, 3))], 1)

        out = run_on_crops(both, crops, valid, self.config.input_size)
        z = out[..., :size].unflatten(-1, (self.config.prototype_dim, self.grid, self.grid))
        return _as_regions(z), max_over_crops(out[..., size:], valid)

    def region_valid(self, valid: torch.Tensor) -> torch.Tensor:
        """Validity [B, K] of the inputs → validity [B, N] of the regions ``embed`` returns."""
        return valid.bool().repeat_interleave(self.grid * self.grid, dim=1)

    def distances(self, z: torch.Tensor) -> torch.Tensor:
        """[B, K, D] → [B, K, P] squared L2 distances, clamped at 0."""
        d = (z * z).sum(-1, keepdim=True) - 2 * z @ self.prototypes.T + (self.prototypes**2).sum(-1)
        return d.clamp_min(0)

    def similarity(self, d: torch.Tensor) -> torch.Tensor:
        """ProtoPNet's log activation of squared distances: log((d + 1) / (d + model.similarity_epsilon))."""
        return torch.log((d + 1) / (d + self.config.similarity_epsilon))

    def forward(self, crops: torch.Tensor, valid: torch.Tensor) -> ModelOutput:
        auxiliary_logits = None
        if self.auxiliary is not None and self.training and self.auxiliary.weight.requires_grad:  # while it trains
            z, pooled = self.embed_and_pool(crops, valid)
            auxiliary_logits = self.auxiliary(pooled)
        else:
            z = self.embed(crops, valid)
        d = self.distances(z)
        shown = self.region_valid(valid)
        if self.training and self.config.match_dropout:
            shown = hide_regions(shown, self.config.match_dropout)
        d = d.masked_fill(~shown[..., None], float("inf"))
        min_d, nearest = d.min(dim=1)
        sim = self.similarity(min_d)
        return ModelOutput(self.last_layer(sim), min_d, nearest, sim, auxiliary_logits=auxiliary_logits)

    @torch.no_grad()
    def after_step(self, phase: str) -> None:
        """After every optimiser step: with ``model.embedding: normalized`` the prototypes go back onto the unit
        sphere, where the embeddings lie, so that a distance is 2 − 2 · cosine and push only turns them."""
        if self.config.embedding == "normalized" and self.prototypes.requires_grad:
            self.prototypes.copy_(F.normalize(self.prototypes, dim=1))

    def prune(self, keep: torch.Tensor) -> None:
        """Keep only the prototypes where ``keep`` [P] is True (rows, last-layer columns, class identity)."""
        self.prototypes = nn.Parameter(self.prototypes.data[keep].clone())
        self.prototype_class = self.prototype_class[keep].clone()
        weight = self.last_layer.weight.data[:, keep].clone()
        self.last_layer = nn.Linear(int(keep.sum()), self.num_classes, bias=False).to(weight.device)
        self.last_layer.weight.data.copy_(weight)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {
            "backbone": list(self.backbone.parameters()),
            "add_on": list(self.add_on.parameters()),
            "prototypes": [self.prototypes],
            "last_layer": list(self.last_layer.parameters()),
            **({"classifier": list(self.auxiliary.parameters())} if self.auxiliary is not None else {}),
        }


class ProtoPNet(ProtoMask):
    """ProtoPNet (Chen et al. 2019; spec §8): the whole image through the backbone, then a two-layer 1×1 add-on
    (ReLU, sigmoid; Kaiming-initialised as in the original) on every cell of its feature map; a 1×1 prototype's
    distance to an image is the min over the cells. The grid is the feature map's own (7×7 for a ResNet at
    224 px)."""

    def make_add_on(self) -> tuple[nn.Module, int]:
        d = self.config.prototype_dim
        add_on = nn.Sequential(nn.Conv2d(self.channels, d, 1), nn.ReLU(), nn.Conv2d(d, d, 1),
                               embedding_activation(self.config))
        _kaiming(add_on[0], add_on[2])
        return add_on, feature_grid(self.backbone, self.config.input_size)


def _kaiming(*convs: nn.Conv2d) -> None:
    """The add-on initialisation of ProtoPNet and ProtoPool: Kaiming normal (fan out, ReLU), zero bias."""
    for conv in convs:
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(conv.bias)


def feature_grid(backbone: nn.Module, input_size: int) -> int:
    """Side of the backbone's feature map for ``input_size`` inputs (its mode is left as it was)."""
    was_training = backbone.training
    with torch.no_grad():
        size = backbone.eval()(torch.zeros(1, 3, input_size, input_size)).shape[-1]
    backbone.train(was_training)
    return size


def gumbel_scale(epoch: int, epochs: int) -> float:
    """ProtoPool's 1/τ in its ``epoch``-th prototype epoch (0-based; the reference's schedule, spec §8): 0 (a
    plain softmax) in the first, then √(1000² · (epoch − 1) / ``epochs``) clipped to [1, 1000]."""
    return 0.0 if epoch == 0 else min(max(math.sqrt(1000.0**2 * (epoch - 1) / epochs), 1.0), 1000.0)


class ProtoPool(ProtoMask):
    """ProtoPool (Rymarczyk et al. 2022; spec §8): a pool of prototypes shared by all classes on the whole
    image's feature map (a 1×1 add-on with sigmoid, as ProtoPNet's grid), each class with ``prototypes_per_class``
    slots that learn, through a Gumbel-softmax over the pool annealed to one-hot, which prototype they hold
    (``proto_presence`` [C, P, slots]). A prototype's similarity is focal: the log similarity of its nearest cell
    minus that of its mean distance; a slot's is the presence-weighted sum; the last layer maps slots to classes.
    No push (the reference registers none). Fixed against the reference: evaluation draws no Gumbel noise (a
    plain softmax at the current scale)."""

    pushes = False

    def make_add_on(self) -> tuple[nn.Module, int]:
        add_on = nn.Sequential(nn.Conv2d(self.channels, self.config.prototype_dim, 1), nn.Sigmoid())
        _kaiming(add_on[0])
        return add_on, feature_grid(self.backbone, self.config.input_size)

    def make_prototypes(self) -> int:
        c, slots = self.num_classes, self.config.prototypes_per_class
        pool = self.config.pool_size or max(c + 5, slots + 1)
        if pool <= slots:
            raise ValueError(f"model.pool_size: {pool} prototypes cannot fill {slots} distinct slots per class "
                             "(prototypes_per_class); use more")
        self.prototypes = nn.Parameter(torch.rand(pool, self.config.prototype_dim))
        self.proto_presence = nn.Parameter(nn.init.xavier_normal_(torch.empty(c, pool, slots)))
        self.register_buffer("slot_class", torch.arange(c * slots) // slots)
        self.register_buffer("gumbel_scale", torch.zeros(()))  # set by the training loop per epoch
        return c * slots

    @property
    def class_identity(self) -> torch.Tensor:
        return F.one_hot(self.slot_class, self.num_classes).to(self.prototypes.dtype).T

    def presence(self, *, noise: bool) -> torch.Tensor:
        """[C, P, slots]: each slot's distribution over the pool (over dim 1)."""
        scale = float(self.gumbel_scale)
        if scale == 0:
            return F.softmax(self.proto_presence, dim=1)
        if noise:
            return F.gumbel_softmax(self.proto_presence * scale, tau=1.0, hard=False, dim=1)
        return F.softmax(self.proto_presence * scale, dim=1)

    def prototype_weights(self) -> torch.Tensor:
        slots = self.presence(noise=False).permute(0, 2, 1).flatten(0, 1)  # [C·slots, P]: the last layer's inputs
        return self.last_layer.weight @ slots

    @property
    def prototype_class(self) -> torch.Tensor:
        """[P]: the class each pool prototype adds most to."""
        return self.prototype_weights().detach().argmax(0)

    def forward(self, crops: torch.Tensor, valid: torch.Tensor) -> ModelOutput:
        d = self.distances(self.embed(crops, valid))
        regions = self.region_valid(valid)[..., None]
        min_d, nearest = d.masked_fill(~regions, float("inf")).min(dim=1)
        mean_d = (d * regions).sum(1) / regions.sum(1).clamp_min(1)
        sim = self.similarity(min_d) - self.similarity(mean_d)
        presence = self.presence(noise=self.training)
        logits = self.last_layer(torch.einsum("bp,cps->bcs", sim, presence).flatten(1))
        return ModelOutput(logits, min_d, nearest, sim, presence)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {**super().parameter_groups(), "prototypes": [self.prototypes, self.proto_presence]}


class PIPNet(ProtoMask):
    """PIP-Net (Nauta et al. 2023; spec §8, as the reference): no prototype vectors; each backbone channel of the
    whole image's feature map is a prototype, its presence at a cell the softmax over channels there, and in the
    image the max over cells. The last layer is non-negative (ReLU on its weights, which shrink by 1e-3 and
    are clamped at 0 after every joint step: ``after_step``), and the logits are log1p(out ** multiplier).
    Training is self-supervised first (alignment of two views' cell presences and the tanh spread loss), then
    joint with cross-entropy; no push. ``prototypes_per_class`` and ``prototype_dim`` do not apply."""

    pushes = False

    def make_add_on(self) -> tuple[nn.Module, int]:
        return nn.Softmax(dim=1), feature_grid(self.backbone, self.config.input_size)

    def make_prototypes(self) -> int:
        self.multiplier = nn.Parameter(torch.tensor(2.0))  # the reference trains it with the last layer
        return self.channels

    @property
    def num_prototypes(self) -> int:
        return self.channels

    def reset_last_layer(self) -> None:
        nn.init.normal_(self.last_layer.weight, 1.0, 0.1)

    def prototype_weights(self) -> torch.Tensor:
        return F.relu(self.last_layer.weight)

    @property
    def prototype_class(self) -> torch.Tensor:
        """[P]: the class each prototype adds most to."""
        return self.prototype_weights().detach().argmax(0)

    def embed(self, crops: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """[B, 1, 3, S, S] → [B, cells, P]: each cell's presence of every prototype (sums to 1 over P)."""
        return _as_regions(run_on_crops(lambda x: self.add_on(self.backbone(x)), crops, valid, self.config.input_size))

    def forward(self, crops: torch.Tensor, valid: torch.Tensor) -> ModelOutput:
        cells = self.embed(crops, valid)
        pooled, nearest = cells.max(dim=1)
        out = pooled @ self.prototype_weights().T
        return ModelOutput(torch.log1p(out ** self.multiplier), None, nearest, pooled, cell_presence=cells)

    @torch.no_grad()
    def after_step(self, phase: str) -> None:
        """The reference's LastLayerCallback, after every step but the warm-up's: weights shrink by 1e-3 and stay
        ≥ 0 (sparse and non-negative), the multiplier stays ≥ 1."""
        if phase == "warmup":
            return
        self.last_layer.weight.sub_(1e-3).clamp_(min=0)
        self.multiplier.clamp_(min=1)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"backbone": list(self.backbone.parameters()), "add_on": [], "prototypes": [],
                "last_layer": [self.last_layer.weight, self.multiplier]}


class LinearHead(nn.Module):
    """Black-box reference on the same inputs ``[B, K, 3, S, S]`` and validity ``[B, K]``: backbone →
    global average pool per crop → element-wise max over the valid crops → linear layer."""

    def __init__(self, config: ModelConfig, num_classes: int, *, trunk: tuple[nn.Module, int] | None = None) -> None:
        """``trunk``: an existing backbone and its channels to share (pre-training a prototype model's)."""
        super().__init__()
        self.config = config
        self.num_classes = num_classes
        self.backbone, channels = trunk or create_backbone(config.backbone, config.weights, config.width)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, crops: torch.Tensor, valid: torch.Tensor) -> ModelOutput:
        z = run_on_crops(lambda x: self.backbone(x).mean((2, 3)), crops, valid, self.config.input_size)
        return ModelOutput(self.classifier(max_over_crops(z, valid)))

    def region_features(self, crops: torch.Tensor, valid: torch.Tensor, grid: int) -> torch.Tensor:
        """[B, K·grid², channels]: each region's pooled backbone features, the regions of a prototype model
        with that ``grid`` (1: one per crop; patches: the cells of the whole image)."""
        f = run_on_crops(lambda x: F.adaptive_avg_pool2d(self.backbone(x), grid), crops, valid, self.config.input_size)
        return _as_regions(f)

    def region_logits(self, crops: torch.Tensor, valid: torch.Tensor, grid: int) -> torch.Tensor:
        """[B, K·grid², C]: the classifier applied to each region's pooled features."""
        return self.classifier(self.region_features(crops, valid, grid))

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"backbone": list(self.backbone.parameters()), "classifier": list(self.classifier.parameters())}


KINDS: dict[str, type[ProtoMask]] = {"protomask": ProtoMask, "protopnet": ProtoPNet, "protopool": ProtoPool,
                                     "pipnet": PIPNet}
Model = ProtoMask | LinearHead


def build_model(config: ModelConfig, num_classes: int) -> Model:
    """The network of ``config.head`` (and, for prototypes, ``config.kind``)."""
    return LinearHead(config, num_classes) if config.head == "linear" else KINDS[config.kind](config, num_classes)

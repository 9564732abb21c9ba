"""Configuration models for every job. Unknown keys are errors (``extra="forbid"``), so a typo in a
config file fails before anything is written, naming the field."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, ValidationError, field_validator,
                      model_validator)

from schemas.storage import Location, put, read_text
from schemas.version import FORMAT_VERSION

# a folder that may be on object storage: a local path or s3://bucket/prefix; configs hold it as its string
StoragePath = Annotated[Location, PlainValidator(Location.parse), PlainSerializer(str)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticConfig(Strict):
    """The embedded synthetic dataset: each class is one (shape, colour) part among distractor parts."""

    num_classes: int = Field(4, ge=2, le=8)
    train_per_class: int = Field(40, ge=1)
    test_per_class: int = Field(15, ge=0)
    image_size: int = Field(128, ge=32, le=1024)
    distractors: int = Field(3, ge=0, le=8)
    seed: int = 0


class SamParams(Strict):
    """segment-anything ``SamAutomaticMaskGenerator`` arguments (SAM v1 settings of the reference, spec §4.2)."""

    points_per_side: int = Field(32, ge=1)
    points_per_batch: int = Field(64, ge=1)
    pred_iou_thresh: float = 0.86
    stability_score_thresh: float = 0.92
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = Field(1, ge=0)
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = Field(2, ge=1)
    min_mask_region_area: int = Field(0, ge=0)


class Sam2Params(Strict):
    """sam2 ``SAM2AutomaticMaskGenerator`` arguments; defaults are the paper's settings (spec §4.2)."""

    points_per_side: int = Field(32, ge=1)
    points_per_batch: int = Field(512, ge=1, description="point prompts decoded together (bounds the memory)")
    pred_iou_thresh: float = 0.8
    stability_score_thresh: float = 0.9
    stability_score_offset: float = 0.5
    mask_threshold: float = Field(0.0, description="mask logit threshold")
    box_nms_thresh: float = 0.7
    crop_n_layers: int = Field(2, ge=0)
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = Field(1, ge=1)
    min_mask_region_area: int = Field(10, ge=0, description=(
        "holes and islands below this area are removed from the masks (OpenCV); the predictor's own pass on the "
        "low-resolution logits needs sam2's CUDA extension and is skipped, with a warning, without it"))
    use_m2m: bool = Field(False, description="refine each mask once more with its own low-resolution logits")
    multimask_output: bool = Field(True, description="three masks per point prompt")


class SlitParams(Strict):
    """Boundary probabilities → masks (SLIT / DirectSAM, spec §4.2): pixels above ``boundary_threshold`` are
    boundary, the boundary is dilated with a ``boundary_dilation`` x ``boundary_dilation`` ellipse, and the
    connected components of the other pixels are the masks, largest first."""

    boundary_threshold: float = Field(1e-3, gt=0, lt=1, description=(
        "boundary probability above which a pixel is boundary"))
    boundary_dilation: int = Field(3, ge=1, description=(
        "side of the elliptic kernel the boundary is dilated with (1: none)"))
    connectivity: Literal[4, 8] = Field(8, description="neighbours that connect the pixels of a mask")
    max_masks: int = Field(256, ge=1, description=(
        "only the largest components are proposed (a job keeps at most masks_per_image <= 64): bounds the memory "
        "where an image breaks into thousands of specks"))


class SegmenterConfig(Strict):
    """Which segmenter proposes masks, and its parameters."""

    name: Literal["superpixel", "sam", "sam2", "slit", "grid"] = "superpixel"
    # the model segmenters: sam, sam2, slit
    model_type: Literal["vit_b", "vit_l", "vit_h"] = Field("vit_h", description="sam: the checkpoint's model")
    checkpoint: Path | None = Field(None, description=(
        "sam: a .pth file; sam2: a .pt file; slit: a folder with config.json, preprocessor_config.json and the "
        "weights (a copy of the DirectSAM model); nothing is downloaded"))
    builder: str | None = Field(None, description=(
        "'module:function' returning the model, for sam a segment_anything Sam, for sam2 a SAM2Base; replaces "
        "checkpoint, model_type and sam2_model"))
    device: Literal["auto", "cuda", "cpu"] = "auto"
    batch_size: int = Field(4, ge=1, description=(
        "model segmenters: images a worker segments together (their encoder inputs share forwards)"))
    encoder_batch: int = Field(8, ge=1, description=(
        "model segmenters: inputs (images, or their crops with crop_n_layers) per image-encoder forward; bounds "
        "the device memory"))
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description=(
        "model segmenters: the image encoder's autocast precision; fp32 gives the library's own masks, bf16/fp16 "
        "are faster on GPUs and change masks slightly (measured by bench/p6_segmenter_throughput.py)"))
    sam: SamParams = SamParams()
    sam2_model: Literal[
        "sam2.1_hiera_t", "sam2.1_hiera_s", "sam2.1_hiera_b+", "sam2.1_hiera_l",
        "sam2_hiera_t", "sam2_hiera_s", "sam2_hiera_b+", "sam2_hiera_l",
    ] = Field("sam2.1_hiera_b+", description=(
        "sam2: the checkpoint's model, named as its config in the sam2 package (configs/sam2.1/NAME.yaml, "
        "configs/sam2/NAME.yaml)"))
    sam2: Sam2Params = Sam2Params()
    slit: SlitParams = SlitParams()
    # superpixel
    n_segments: int = Field(48, ge=2, description="SLIC superpixels before merging")
    compactness: float = Field(10.0, gt=0)
    merge_threshold: float = Field(28.0, ge=0, description="RAG mean-colour distance below which regions merge")
    merge_levels: list[Annotated[float, Field(ge=0)]] = Field([], description=(
        "superpixel: coarser thresholds whose merged regions are proposed too, so objects come as wholes besides "
        "their parts (nested masks, as SAM proposes); a region found at several levels is proposed once"))
    work_side: int = Field(256, ge=16, description="superpixels are computed at this long side, masks upsampled")
    # grid
    grid: int = Field(3, ge=1, description="grid x grid patches")

    @model_validator(mode="after")
    def _models_need_weights(self) -> SegmenterConfig:
        weights = {"sam": "path to a SAM .pth file", "sam2": "path to a SAM 2 .pt file",
                   "slit": "a folder with the DirectSAM model"}
        builds = self.builder is not None and self.name in ("sam", "sam2")
        if self.name in weights and self.checkpoint is None and not builds:
            raise ValueError(f"segmenter.checkpoint is required for the {self.name} segmenter ({weights[self.name]})")
        return self


class SegmentConfig(Strict):
    """``protomask segment``: source → masks → shards."""

    source: Literal["synthetic", "cub", "imagefolder", "listing"] = "synthetic"
    root: StoragePath = Field(description="the source's folder (a path or s3://bucket/prefix)")
    out: StoragePath = Field(description="the shard directory written (a path or s3://bucket/prefix)")
    listing: StoragePath | None = Field(None, description=(
        "CSV/Parquet file (path,label[,split]) for source=listing (a path or s3:// URL)"))
    synthetic: SyntheticConfig = SyntheticConfig()
    segmenter: SegmenterConfig = SegmenterConfig()
    masks_per_image: int = Field(8, ge=1, le=64)
    max_box_fraction: float = Field(1.0, gt=0, le=1, description=(
        "masks whose box covers more of the image than this share are dropped before the K largest are kept: "
        "their crops show about the whole image, so a prototype on one points at no part; 1: none dropped"))
    crop_size: int | None = Field(None, ge=8, le=1024, description=(
        "also store each mask's box crop, resized to crop_size x crop_size, as a JPEG member (for tools that "
        "want crops as files); default: no crop members, readers crop the image at the boxes (training does, "
        "at its input size)"))
    shard_size: int = Field(256, ge=1, le=100_000)
    shuffle_seed: int = Field(0, description="seed of the permutation that assigns inputs to shards")
    test_fraction: float = Field(0.2, gt=0, lt=1, description=(
        "stratified, seeded (shuffle_seed) share of each class drawn into the test split; applies only to "
        "inputs that carry no split (imagefolder without train/val/test folders, listing rows without a split)"))
    max_side: int = Field(1024, ge=8, description="images are downscaled so the long side is at most this")
    max_image_pixels: int = Field(178_956_970, ge=1, description="larger inputs are rejected (decompression bombs)")
    jpeg_quality: int = Field(90, ge=50, le=100)
    num_workers: int | None = Field(None, ge=1, description="segmenter workers; default: GPUs, else CPUs")
    cpus_per_worker: float | None = Field(None, gt=0)
    max_shard_retries: int = Field(2, ge=0)
    overwrite: bool = False

    @model_validator(mode="after")
    def _listing_needs_file(self) -> SegmentConfig:
        if self.source == "listing" and self.listing is None:
            raise ValueError("listing: a CSV or Parquet file is required for source=listing")
        return self

    def output_hash(self) -> str:
        """Hash of everything that changes the bytes of the shards (not paths, workers or retries)."""
        keep = self.model_dump(
            mode="json",
            exclude={"out", "root", "num_workers", "cpus_per_worker", "max_shard_retries", "overwrite"},
        )
        if self.source != "synthetic":
            keep.pop("synthetic")
        segmenter = keep["segmenter"]
        for name in ("batch_size", "encoder_batch"):  # the same masks at any batch size
            segmenter.pop(name)
        if self.segmenter.precision == "fp32":  # the hash of fp32 shards written before the field existed
            segmenter.pop("precision")
        if not self.segmenter.merge_levels:  # the hash of shards written before these fields existed
            segmenter.pop("merge_levels")
        if self.max_box_fraction == 1.0:
            keep.pop("max_box_fraction")
        for name, fields in {"sam2": ("sam2_model", "sam2"), "slit": ("slit",)}.items():
            if self.segmenter.name != name:  # the hash of shards written before these segmenters existed
                for field in fields:
                    segmenter.pop(field)
        return stable_hash({"format": FORMAT_VERSION, **keep})


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


class ConfigError(ValueError):
    """An invalid configuration; the message names the field."""


def load_config(model: type[Strict], file: Location | Path | None, overrides: dict[str, Any], *,
                section: str | None = None) -> Strict:
    """Merge a YAML/JSON config file with flag overrides (flags win, dotted keys nest) and validate.

    A preset file holds one section per command (``segment:``, ``train:``, ...); with ``section`` given, a file
    that has that top-level key (not a field of ``model``) is read from it, so one preset serves every step."""
    data: dict[str, Any] = {}
    if file is not None:
        try:
            data = yaml.safe_load(read_text(Location.parse(file))) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{file}: cannot read config: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: a config file must hold a mapping, got {type(data).__name__}")
        if section is not None and section in data and section not in model.model_fields:
            data = data[section] or {}
            if not isinstance(data, dict):
                raise ConfigError(f"{file}: section {section!r} must hold a mapping, got {type(data).__name__}")
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = [
            f"  {'.'.join(str(p) for p in err['loc']) or '(config)'}: {err['msg']}" for err in exc.errors()
        ]
        where = f" in {file}" if file else ""
        raise ConfigError(f"invalid {model.__name__}{where}:\n" + "\n".join(lines)) from None


def write_config(config: Strict, path: Location | Path) -> None:
    """Write the resolved config as YAML beside an output (``storage.put``: whole or not at all)."""
    put(Location.parse(path), yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


class ModelConfig(Strict):
    """ProtoMask network (spec §1); defaults are the reference's except where noted."""

    head: Literal["prototypes", "linear"] = Field(
        "prototypes", description="prototypes: ProtoMask (or the patch baseline); linear: the black-box reference "
        "on the same backbone and inputs (global pool per crop, max over crops, linear layer)")
    kind: Literal["protomask", "protopnet", "protopool", "pipnet"] = Field("protomask", description=(
        "prototype architecture (head: prototypes): protomask (the paper: a 1×1 add-on pooled to one embedding per "
        "region); protopnet (ProtoPNet, Chen et al. 2019: a two-layer 1×1 add-on with ReLU and sigmoid on the "
        "backbone's feature map of the whole image, one 1×1 prototype per map cell); protopool (ProtoPool, "
        "Rymarczyk et al. 2022: a pool of pool_size prototypes shared by the classes, prototypes_per_class slots "
        "per class choosing from it, focal similarity); pipnet (PIP-Net, Nauta et al. 2023: every backbone channel a "
        "prototype, softmax over channels per cell, max over cells, a non-negative last layer, self-supervised "
        "first on two views). All but protomask imply regions: patches with the map's own grid (and prototype_dim "
        "128 unless set); their recipes: --config protopnet, protopool, pipnet"))
    backbone: Literal["resnet18", "resnet34", "resnet50", "vgg16", "densenet121", "convnet"] = "resnet50"
    weights: str | None = Field(None, description=(
        "pretrained backbone: a torchvision weights name (IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT; resolved through "
        "torchvision's cache under $TORCH_HOME) or a state-dict file (e.g. an iNaturalist ResNet-50); none = random init"))
    width: int = Field(32, ge=4, description="channels of the first stage (convnet only)")
    prototypes_per_class: int = Field(10, ge=1)
    prototype_dim: int = Field(1280, ge=1)
    input_size: int = Field(224, ge=8, description="crops are resized to this before the backbone")
    regions: Literal["masks", "patches"] = Field(
        "masks", description="masks: one embedding per mask crop (ProtoMask); patches: a patch_grid² map of "
        "the whole image (the ProtoPNet-style baseline)")
    crop_margin: float = Field(0.0, ge=0.0, description=(
        "regions masks: each mask's box is grown by this share of its width and height on every side (clipped to "
        "the image) before it is cropped, so that a crop shows the part with context around it (R-CNN's context "
        "padding); the prototypes still match, and the explanations still point at, the mask. 0: the box itself "
        "(the paper)"))
    patch_grid: int = Field(7, ge=1, description="patches per side in regions=patches (kind protomask)")
    pool_size: int | None = Field(None, ge=1, description=(
        "kind protopool: prototypes in the shared pool, more than prototypes_per_class; default: classes + 5 (the "
        "reference's CUB 205, Cars 201), at least prototypes_per_class + 1"))
    off_class_weight: float = Field(0.0, description="initial last-layer weight to other classes' prototypes")
    embedding: Literal["sigmoid", "normalized"] = Field("sigmoid", description=(
        "kinds protomask and protopnet: the add-on's last step; sigmoid: each of the prototype_dim channels in (0, "
        "1) (the paper); normalized: the embedding scaled to unit length and the prototypes kept on the unit sphere, "
        "so that a squared distance is 2 − 2 · cosine (Deformable ProtoPNet's cosine similarity; on cub_dev from "
        "scratch no better than sigmoid, docs/results.md)"))
    match_dropout: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "kinds protomask and protopnet, training only: each of an image's regions (mask crops or patch cells) is "
        "left out of the prototypes' minimum with this probability (all are kept when none would be), so that a "
        "class's prototypes cannot all lean on one region; the backbone and loss.auxiliary's head still read every "
        "region, and push and evaluation match all. 0: every region, as the paper"))
    similarity_epsilon: float = Field(1e-4, gt=0, description=(
        "ε of the log similarity log((d + 1) / (d + ε)); the reference's is 1e-14 (its similarity at d = 0 is 32.2 "
        "against 9.2 here, so crops near a pushed prototype dominate its logits)"))

    @model_validator(mode="before")
    @classmethod
    def _kind_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("kind") in ("protopnet", "protopool", "pipnet"):
            data = {"regions": "patches", "prototype_dim": 128, **data}
        return data

    @model_validator(mode="after")
    def _options_fit(self) -> ModelConfig:
        if self.kind != "protomask" and self.regions != "patches":
            raise ValueError(f"model.regions: kind {self.kind} has prototypes on the whole image's feature map; "
                             "use regions: patches (its default)")
        if self.crop_margin and self.regions != "masks":
            raise ValueError(f"model.crop_margin grows mask crops; model.regions {self.regions} reads the whole image "
                             "(set model.crop_margin: 0)")
        if self.embedding != "sigmoid" and self.kind not in ("protomask", "protopnet"):
            raise ValueError(f"model.embedding: kind {self.kind} has its own add-on; embedding applies to kinds "
                             "protomask and protopnet")
        if self.match_dropout and self.kind not in ("protomask", "protopnet"):
            raise ValueError(f"model.match_dropout: kind {self.kind} matches its prototypes its own way; "
                             "match_dropout applies to kinds protomask and protopnet")
        return self


# every term a training loss may have, logged per epoch as train_<term> in metrics.csv → its name on the console
LOSS_TERMS: dict[str, str] = {
    "cross_entropy": "ce", "auxiliary": "aux", "cluster": "clst", "separation": "sep", "diversity": "div",
    "prototype_crop": "anchor", "orthogonality": "orth", "alignment": "align", "tanh": "tanh", "l1": "l1"}


class LossConfig(Strict):
    """Loss coefficients (spec §2.1/§2.4)."""

    cross_entropy: float = 1.0
    cluster: float = 0.8
    separation: float = 0.2
    diversity: float = Field(0.2, description="kinds protomask and protopnet")
    alignment: float = Field(5.0, description="kind pipnet: alignment of the two views' cell presences")
    tanh: float = Field(2.0, description="kind pipnet: the tanh term that spreads presence over the prototypes")
    tanh_warmup: float = Field(5.0, description=(
        "kind pipnet: the tanh term's weight in the self-supervised warm-up, where the alignment weight ramps from "
        "alignment / warmup_epochs up to alignment (the reference's)"))
    orthogonality: float = Field(1.0, description=(
        "kind protopool: mean cosine similarity between the presence of one class's slots (ProtoPool's L_orth)"))
    prototype_crop: float = Field(0.0, ge=0, description=(
        "coefficient of the distance from each prototype to the nearest crop of its class in the batch (Li et "
        "al. 2018's R1), so that push moves prototypes little; 0: the paper"))
    auxiliary: float = Field(0.0, ge=0, description=(
        "kinds protomask and protopnet with schedule.pretrain_epochs (the linear head ignores it): coefficient of a "
        "training-only second head in the joint phase, the pre-trained linear classifier on the max-pooled backbone "
        "features of the crops, so the backbone goes on learning as the linear head's does; the model keeps no "
        "trace of it; 0: the paper"))
    l1: float = 1e-3
    class_balanced: bool = True


class ScheduleConfig(Strict):
    """Phases: warm-up → joint → push → last-layer fine-tuning (spec §2.2–§2.4)."""

    pretrain_epochs: int = Field(0, ge=0, description=(
        "prototype heads: epochs before warm-up that train the backbone through a linear classifier on its "
        "max-pooled crop features (the linear head's network), for backbones without pretrained weights; the "
        "paper starts from ImageNet weights instead (0)"))
    pretrain_on: Literal["crops", "image"] = Field("crops", description=(
        "what pre-training shows the backbone: crops: the model's own crops; image: each whole image, once (the "
        "whole-image black-box's network, as ImageNet weights were trained on whole images; K times fewer "
        "backbone passes per epoch)"))
    prototype_init: Literal["uniform", "crops"] = Field("uniform", description=(
        "uniform: prototypes start as U[0, 1) draws (the paper); crops (needs pretrain_epochs): after pre-training, "
        "the prototypes of each class start on the training crops (or patches) of distinct images that the "
        "pre-trained linear classifier scores highest for that class"))
    addon_init: Literal["random", "classifier"] = Field("random", description=(
        "random: the add-on starts at random (the paper); classifier (needs pretrain_epochs): after pre-training, "
        "its first channels project the backbone's features onto the pre-trained classifier's leading singular "
        "directions, standardised over training regions, so the embedding starts class-discriminative"))
    warmup_epochs: int = Field(0, ge=0)
    joint_epochs: int = Field(100, ge=0)
    last_layer_epochs: int = Field(10, ge=0)
    lr_warmup: float = 1e-3
    lr_backbone: float = 6e-5
    lr_addon: float = 3e-3
    lr_prototypes: float = 3e-3
    lr_last_layer: float = 3e-4
    joint_last_layer: bool = Field(False, description=(
        "the joint phase also trains the last layer (at lr_last_layer, with the L1 term on other classes' "
        "weights); the paper keeps it at +1/0 until the last-layer phase"))
    step_size: int = Field(35, ge=1, description="StepLR step (joint epochs)")
    gamma: float = 0.5
    lr_decay_from: Literal["joint", "pretrain"] = Field("joint", description=(
        "joint: the step decay counts joint epochs only, every joint rate starts in full and pre-training runs "
        "at constant rates (the paper's schedule); pretrain: the decay also runs over the pre-training epochs, "
        "and the backbone's joint rate goes on from where pre-training left it (the linear head's schedule over "
        "the same epochs), while the add-on, prototypes and classifier start in full"))
    ema_half_life: float = Field(0.0, ge=0, description=(
        "joint and last-layer phases: keep an exponential moving average of the weights (parameters and "
        "BatchNorm statistics) whose steps' weights halve every this many epochs; validation reads the average, "
        "and the model takes it at the end of each phase: before push, and after the last-layer epochs on the "
        "pushed prototypes (torchvision's --model-ema). 0: the last step's weights (the paper)"))
    gumbel_epochs: int = Field(50, ge=1, description=(
        "kind protopool: prototype epochs (warm-up and joint) over which the Gumbel-softmax's 1/τ rises from 1 "
        "to 1000 (the reference's 50)"))
    push_every: int = Field(0, ge=0, description=(
        "also push every this many joint epochs (at the start of joint epochs n, 2n, ...), and go on training "
        "from the pushed prototypes, as the original ProtoPNet does every 10 epochs; the last push still comes "
        "after the joint phase. 0: one push only (the paper)"))
    push_distinct: bool = Field(False, description=(
        "push puts no two prototypes on the same crop: nearest first, each takes its nearest crop that is still "
        "free; the paper lets prototypes of a class share their nearest crop"))
    prune: bool = False
    prune_k: int = Field(6, ge=1)
    prune_threshold: int = Field(3, ge=1)

    @model_validator(mode="after")
    def _crops_need_pretraining(self) -> ScheduleConfig:
        if self.prototype_init == "crops" and not self.pretrain_epochs:
            raise ValueError("schedule.prototype_init: crops are chosen by the pre-trained classifier; "
                             "set schedule.pretrain_epochs > 0 (or prototype_init: uniform)")
        if self.addon_init == "classifier" and not self.pretrain_epochs:
            raise ValueError("schedule.addon_init: classifier starts from the pre-trained classifier; "
                             "set schedule.pretrain_epochs > 0 (or addon_init: random)")
        if self.pretrain_on == "image" and not self.pretrain_epochs:
            raise ValueError("schedule.pretrain_on: image says what pre-training reads; "
                             "set schedule.pretrain_epochs > 0 (or pretrain_on: crops)")
        return self


class ParityConfig(Strict):
    """Switches that reproduce the reference code's behaviour (spec §10); all off = fixed mode. The reference's
    similarity ε is ``model.similarity_epsilon`` (1e-14 there): it is part of the exported network."""

    push_last_batch: bool = Field(False, description="push keeps only the last batch's nearest crop")
    detached_diversity: bool = Field(False, description="diversity term without gradient")
    frozen_addon: bool = Field(False, description="add-on layers never optimised")
    train_mode_frozen_batchnorm: bool = Field(False, description=(
        "BatchNorm layers of a frozen backbone (warm-up and last-layer epochs) stay in training mode: they normalise "
        "with each batch's statistics and keep updating their running ones, so the last layer trains on other "
        "embeddings than push projected onto and evaluation sees"))


class DataConfig(Strict):
    batch_size: int = Field(64, ge=1, description=(
        "images per optimiser step over all workers (the reference: 16 x 4 accumulated); the same on any "
        "number of workers, which must divide it"))
    micro_batch: int | None = Field(None, ge=1, description=(
        "images per forward/backward pass on one worker (gradients accumulate up to the worker's share of "
        "batch_size); default: the most that fit memory_gb"))
    memory_gb: float | None = Field(None, gt=0, description=(
        "memory one worker may use for training; default: 60 % of the node's available memory split over its "
        "workers (CPU), or 80 % of the GPU's"))
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="stratified share of train held out")
    shuffle_buffer: int = Field(256, ge=1)
    augment: Literal["reference", "flip", "none"] = Field("reference", description=(
        "training augmentation per crop: the reference's (flip, perspective, rotation, shear, colour jitter), "
        "horizontal flips only (short schedules from scratch learn faster), or none; true/false mean "
        "reference/none"))
    crop_dropout: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "training only, regions: masks: each of an image's mask crops is hidden with this probability (at least one "
        "is kept), so that no decision can lean on one crop always being there; hidden crops skip the backbone "
        "(model.match_dropout hides them from the prototypes only). 0: every crop, as the paper"))
    loader_threads: int = Field(2, ge=0, description="decoding threads per worker")

    @field_validator("augment", mode="before")
    @classmethod
    def _augment_from_bool(cls, value: Any) -> Any:
        return {True: "reference", False: "none"}.get(value, value) if isinstance(value, bool) else value


class TrainConfig(Strict):
    """``protomask train``: cached shards → a trained ProtoMask model in run_dir."""

    shards: StoragePath
    run_dir: StoragePath = Field(description="run directory: checkpoints, metrics and the exported model (a path or "
                                 "s3://bucket/prefix)")
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    parity: ParityConfig = ParityConfig()
    data: DataConfig = DataConfig()
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP ranks)")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(2, ge=-1, description="worker failures survived by resuming from the checkpoint")
    verify_checksums: bool = Field(True, description="sha256 of every shard against the manifest before training")
    seed: int = 4861

    @model_validator(mode="after")
    def _schedule_fits_model(self) -> TrainConfig:
        s, kind = self.schedule, self.model.kind
        if s.addon_init == "classifier" and kind != "protomask":
            raise ValueError(f"schedule.addon_init: classifier starts ProtoMask's one-layer add-on; model.kind "
                             f"{kind} has its own (use addon_init: random)")
        if kind in ("protopool", "pipnet") and (s.prototype_init == "crops" or s.prune):
            raise ValueError(f"schedule: model.kind {kind} shares its prototypes between classes, so neither "
                             "prototype_init: crops nor prune (both per class) applies")
        # the linear head reads no loss term, so a config that sets one still trains the black-box
        if self.loss.auxiliary and self.model.head == "prototypes" and (kind not in ("protomask", "protopnet")
                                                                        or not s.pretrain_epochs):
            raise ValueError("loss.auxiliary: the auxiliary head is the classifier that schedule.pretrain_epochs "
                             "trains on the backbone of model.kind protomask or protopnet; set pretrain_epochs > 0 "
                             "(or loss.auxiliary: 0)")
        if self.data.crop_dropout and self.model.regions != "masks":
            raise ValueError(f"data.crop_dropout hides mask crops; model.regions {self.model.regions} reads the whole "
                             "image (set data.crop_dropout: 0)")
        if s.push_distinct and self.parity.push_last_batch:
            raise ValueError("schedule.push_distinct and parity.push_last_batch: the reference's push keeps one batch "
                             "only and cannot choose distinct crops; turn one off")
        return self

    @model_validator(mode="after")
    def _batch_splits_over_workers(self) -> TrainConfig:
        if self.data.batch_size % self.num_workers:
            raise ValueError(f"data.batch_size: {self.data.batch_size} images per step do not split evenly over "
                             f"num_workers={self.num_workers}; use a multiple of {self.num_workers}")
        return self


class EvaluateConfig(Strict):
    """``protomask evaluate``: every metric of a trained model on one split, into ``metrics_<split>.json``."""

    run_dir: StoragePath = Field(description=(
        "run directory written by `protomask train` (a path or s3://bucket/prefix)"))
    shards: StoragePath | None = Field(None, description="shard directory; default: the one the model was trained on")
    split: Literal["train", "val", "test"] = "test"
    batch_size: int = Field(32, ge=1, description="images per forward pass")
    relevance: Literal["prp", "gradient", "mask"] | None = Field(None, description=(
        "saliency of the paper's metrics (VLC, object and background overlap, IOR, consistency): prp (the paper), "
        "gradient (gradient × input) or mask (the matched region); default: prp where the backbone has LRP "
        "canonizers, else gradient"))


class ExplainConfig(Strict):
    """``protomask explain``: the prototype gallery and local explanations of test images."""

    run_dir: StoragePath = Field(description=(
        "run directory written by `protomask train` (a path or s3://bucket/prefix)"))
    shards: StoragePath | None = Field(None, description="shard directory; default: the one the model was trained on")
    out: StoragePath | None = Field(None, description="output folder (a path or s3://bucket/prefix); default: "
                                    "RUN_DIR/explain")
    keys: list[str] | None = Field(None, description="sample keys to explain; default: the first test samples")
    top_k: int = Field(3, ge=1, description="prototypes shown per image")
    limit: int = Field(8, ge=1, description="test samples explained when no keys are given")
    relevance: Literal["mask", "gradient", "prp"] = Field("mask", description=(
        "saliency inside the matched mask: the binary mask, gradient x input of the prototype's similarity, or "
        "its PRP relevance (LRP for prototypes, the paper's; resnet, vgg16 and convnet backbones)"))


class ReportConfig(Strict):
    """``protomask report``: one self-contained HTML report of one run, or several side by side."""

    run_dir: list[StoragePath] = Field(min_length=1, description=(
        "run directories written by `protomask train` (paths or s3://bucket/prefix)"))
    out: Path | None = Field(None, description=(
        "local report folder (a page to open in a browser); default: RUN_DIR/report of the first run, when local"))
    names: list[str] | None = Field(None, description=(
        "a model name per run; runs with the same name (seeds) are one row, as mean ± std; default: the folder names"))

    @model_validator(mode="after")
    def _a_name_per_run(self) -> ReportConfig:
        if self.names is not None and len(self.names) != len(self.run_dir):
            raise ValueError(f"names: {len(self.names)} names for {len(self.run_dir)} run directories")
        return self


class ManifestConfig(Strict):
    """``protomask manifest inspect|verify``: a shard directory's summary, or a check of every shard."""

    shards: StoragePath = Field(description="shard directory written by `protomask segment` (a path or "
                                "s3://bucket/prefix)")
    as_json: bool = Field(False, description="inspect: print the summary as JSON")


class DemoConfig(Strict):
    """``protomask demo``: the embedded synthetic dataset end to end (no downloads, no GPU)."""

    out: Path = Field(Path("demo"), description="folder of the images, shards, runs and report")
    num_workers: int = Field(2, ge=1, description="segmentation and training workers")
    overwrite: bool = Field(False, description=(
        "replace the shards, runs and report an earlier demo left in out (of other settings or another version); "
        "without it a rerun reuses the finished shards and runs"))

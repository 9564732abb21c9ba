"""How many images a worker can run forward and backward at once: the micro-batch.

The activations a training step keeps for backward are counted once per configuration by a forward pass
on PyTorch's ``meta`` device (shapes only: no memory, no compute): the outputs of every leaf module for
one image of K crops. Measured peaks on CPU were 0.9–1.35× that count (convnet 64 px, ResNet-18 112 px,
ResNet-50 224 px), hence ``SAFETY``. The budget is ``data.memory_gb`` per worker, by default a share of
the memory available on the node (CPU) or of the GPU's memory.
"""

from __future__ import annotations

import os

import torch

from schemas.config import TrainConfig
from training.model import Model, ProtoMask, build_model

SAFETY = 1.5  # measured peak / counted activations was at most 1.35
CPU_SHARE = 0.6  # of the node's available memory, split over the workers on the node
GPU_SHARE = 0.8  # of the device's memory


def activation_bytes_per_image(model: Model, config: TrainConfig, masks_per_image: int) -> int:
    """Bytes of leaf-module outputs of a training forward pass of one image (all its crops) through the
    backbone and add-on: the head after them is negligible."""
    k = 1 if config.model.regions == "patches" else masks_per_image
    with torch.device("meta"):
        shadow = build_model(config.model.model_copy(update={"weights": None}), model.num_classes)
    total = 0

    def count(_module, _inputs, output) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * output.element_size()

    hooks = [m.register_forward_hook(count) for m in shadow.modules() if not list(m.children())]
    size = config.model.input_size
    features = shadow.train().backbone(torch.empty(k, 3, size, size, device="meta"))  # the image's K crops
    if isinstance(shadow, ProtoMask):
        shadow.add_on(features)
    for hook in hooks:
        hook.remove()
    return total


def available_bytes(device: torch.device, workers_on_node: int) -> int:
    """This worker's default budget: a share of the GPU's memory, or of the node's available memory."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * GPU_SHARE)
    available = _meminfo_available() or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return int(available * CPU_SHARE / max(workers_on_node, 1))


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def plan_micro_batch(model: Model, config: TrainConfig, masks_per_image: int, step_share: int,
                     device: torch.device, *, workers_on_node: int = 1) -> int:
    """``data.micro_batch`` when set, else the most images (at most ``step_share``) whose activations,
    beside the parameters, gradients, Adam state and (on CPU) the decoded input batches, fit the budget.
    At least 1: a single image that does not fit is left to fail with the memory error's advice."""
    if config.data.micro_batch is not None:
        return min(config.data.micro_batch, step_share)
    budget = int(config.data.memory_gb * 2**30) if config.data.memory_gb else available_bytes(device, workers_on_node)
    fixed = 4 * sum(p.numel() * p.element_size() for p in model.parameters())  # weights, grads, 2 Adam moments
    if device.type != "cuda":
        k = 1 if config.model.regions == "patches" else masks_per_image
        batches_held = config.data.loader_threads + 3  # decoding in flight + the one being trained on
        fixed += batches_held * step_share * k * 3 * config.model.input_size**2 * 4
    per_image = SAFETY * activation_bytes_per_image(model, config, masks_per_image)
    return max(1, min(step_share, int((budget - fixed) // per_image)))

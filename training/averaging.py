"""An exponential moving average of a model's weights over optimiser steps (``schedule.ema_half_life``), as
torchvision's references (``--model-ema``) and timm (``ModelEmaV3``) keep one: the model evaluated and pushed is
the average of the last steps' weights rather than the last step's alone."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def decay_per_step(half_life_epochs: float, steps_per_epoch: int) -> float:
    """The per-step decay under which a step's weight halves after ``half_life_epochs`` epochs."""
    return 0.5 ** (1.0 / (half_life_epochs * max(steps_per_epoch, 1)))


def averaged_names(model: nn.Module) -> list[str]:
    """The state entries that are averaged: every parameter and the running statistics of every BatchNorm layer.
    Other buffers (counters, schedules such as ProtoPool's Gumbel scale, class identities) stay the live model's."""
    names = [name for name, _ in model.named_parameters()]
    for prefix, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            names += [f"{prefix}.{b}" if prefix else b for b in ("running_mean", "running_var")]
    return names


class WeightAverage:
    """The average, started from the model's current weights; ``update`` after every optimiser step."""

    def __init__(self, model: nn.Module, decay: float, *, average: dict[str, torch.Tensor] | None = None) -> None:
        self.decay = decay
        state = model.state_dict()
        self.average = {name: (state[name] if average is None else average[name].to(state[name].device)).detach()
                        .clone() for name in averaged_names(model)}

    def update(self, model: nn.Module) -> None:
        state = model.state_dict()  # detached tensors: nothing here is recorded for autograd
        for name, value in self.average.items():
            value.lerp_(state[name], 1.0 - self.decay)

    def apply(self, model: nn.Module) -> None:
        """Load the average into the model (its other entries stay as they are)."""
        model.load_state_dict(self.average, strict=False)

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """The average in the model for the block's duration, the live weights back after it."""
        live = {name: value.detach().clone() for name, value in model.state_dict().items() if name in self.average}
        self.apply(model)
        try:
            yield
        finally:
            model.load_state_dict(live, strict=False)

"""Connecting to Ray, shared by the segmentation job and the trainer."""

from __future__ import annotations

import logging
import os

VERBOSE_LOGGER = "protomask"  # -v sets it to DEBUG: Ray's own output is shown then


def verbose() -> bool:
    """Whether the user asked for Ray's own output (``protomask -v``)."""
    return logging.getLogger(VERBOSE_LOGGER).isEnabledFor(logging.DEBUG)


def init_ray(address: str | None) -> None:
    """Attach to ``address`` (or ``$RAY_ADDRESS``: ``ray job submit`` sets it), else start a local Ray.

    Unless verbose, workers' and actors' output is not forwarded to this console and Ray logs only
    warnings here: our progress reaches the driver through ``training.progress`` and failures through
    the exceptions they raise.
    """
    import ray

    if ray.is_initialized():
        return
    quiet = {} if verbose() else {"log_to_driver": False, "logging_level": logging.WARNING}
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, **quiet)
    else:
        ray.init(address="local", include_dashboard=False, **quiet)

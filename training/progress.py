"""Training progress on the driver's console.

Workers print nothing (Ray's log forwarding is off unless ``-v``). Rank 0 sends events to a
``ProgressBoard`` actor instead: notes, throttled progress of each pass (training epoch, validation,
push, test and its saliency metrics) and the epoch's metrics row; the driver polls the board on a
thread while ``trainer.fit()`` runs and renders one line per epoch, with a bar for the pass in flight
when the console is a terminal.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import ray

from schemas.config import LOSS_TERMS

if TYPE_CHECKING:
    from training.data import ShardStream

T = TypeVar("T")

THROTTLE_S = 0.5  # at most two progress events per second from rank 0


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Events from rank 0, in the order sent (Ray runs one caller's actor calls in order)."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def put(self, event: dict) -> None:
        self.events.append(event)

    def take(self) -> list[dict]:
        events, self.events = self.events, []
        return events


class Reporter:
    """The worker side: every rank holds one; only rank 0's sends (``board`` is None elsewhere)."""

    def __init__(self, board: Any | None) -> None:
        self.board = board

    def _send(self, event: dict) -> None:
        if self.board is not None:
            self.board.put.remote(event)  # fire and forget: never waits on the driver

    def note(self, text: str) -> None:
        self._send({"kind": "note", "text": text})

    def epoch(self, row: dict, epochs: int) -> None:
        self._send({"kind": "epoch", "row": row, "epochs": epochs})

    def track(self, items: ShardStream | Iterable[T], name: str, *, total: int | None = None, unit: str = "batch"
              ) -> Iterator[T]:
        """``items`` unchanged, reporting how many of ``total`` (default: the stream's ``steps_per_epoch()``)
        have been taken."""
        total = items.steps_per_epoch() if total is None else total
        self._send({"kind": "start", "name": name, "total": total, "unit": unit})
        last = time.monotonic()
        done = 0
        for done, item in enumerate(items, 1):
            yield item
            if time.monotonic() - last > THROTTLE_S:
                self._send({"kind": "step", "done": done})
                last = time.monotonic()
        self._send({"kind": "end", "done": done})


def format_epoch(row: dict, epochs: int) -> str:
    """One line per epoch, with every loss term the epoch's row holds:
    ``epoch  3/20 joint       loss 2.310  ce 1.402  clst 0.611  train 41.2%  val 38.9% balanced  86 img/s``."""
    parts = [f"epoch {row['epoch'] + 1:>{len(str(epochs))}}/{epochs} {row['phase']:<10}",
             f"loss {row['train_loss']:.3f}"]
    terms = [(f"train_{term}", name) for term, name in LOSS_TERMS.items()]
    if any(key in row for key, _ in terms[1:]):  # the loss has more than cross-entropy: show each term
        parts += [f"{name} {row[key]:.3f}" for key, name in terms if key in row]
    parts.append(f"train {row['train_accuracy']:.1%}")
    if "val_balanced_accuracy" in row:
        parts.append(f"val {row['val_balanced_accuracy']:.1%} balanced")
    parts.append(f"{row['images_per_s']:.0f} img/s")
    return "  ".join(parts)


class Console:
    """The driver side: polls ``board`` on a thread and prints; ``bars`` shows tqdm bars (a terminal only)."""

    def __init__(self, board: Any, *, bars: bool = True) -> None:
        from tqdm import tqdm

        self.board, self._tqdm, self._bars = board, tqdm, bars
        self._bar = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="protomask-progress", daemon=True)

    def __enter__(self) -> Console:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _follow(self) -> None:
        while True:
            stopping = self._stop.is_set()  # read before the last poll: no event is left behind
            try:
                events = ray.get(self.board.take.remote())
            except ray.exceptions.RayError:
                events, stopping = [], True
            for event in events:
                self._show(event)
            if stopping:
                self._close_bar()
                return
            self._stop.wait(0.2)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _show(self, event: dict) -> None:
        kind = event["kind"]
        if kind == "start":
            self._close_bar()
            self._bar = self._tqdm(total=event["total"], desc=event["name"], unit=event["unit"], leave=False,
                                   disable=None if self._bars else True, dynamic_ncols=True)
        elif kind in ("step", "end") and self._bar is not None:
            self._bar.update(event["done"] - self._bar.n)
            if kind == "end":
                self._close_bar()
        elif kind == "note":
            self._tqdm.write(event["text"])
        elif kind == "epoch":
            self._close_bar()
            self._tqdm.write(format_epoch(event["row"], event["epochs"]))

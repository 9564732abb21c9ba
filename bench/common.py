"""Shared by the benchmarks: repeated timing, a printed table, a JSON file."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

CUB_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "cub_mini"


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def report(name: str, rows: list[dict], out: Path | None) -> None:
    """Print ``rows`` as a table and write them (with the machine) to ``out`` as JSON."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    width = {k: max(len(k), *(len(_fmt(r.get(k))) for r in rows)) for k in keys}
    print(f"\n{name}")
    print("  ".join(k.ljust(width[k]) for k in keys))
    for r in rows:
        print("  ".join(_fmt(r.get(k)).ljust(width[k]) for k in keys))
    if out is not None:
        out.write_text(json.dumps({"benchmark": name, "machine": machine(), "rows": rows}, indent=1))


def machine() -> dict:
    import os

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "processor": platform.machine()}


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)

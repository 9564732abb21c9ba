"""Run every benchmark (each in its own process: each starts its own Ray), print one table, write
bench/results.json. Usage: .venv/bin/python -m bench.run_all"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import machine, report

BENCHMARKS = [("P1", "bench.p1_segment_overhead", ">= 0.95"), ("P2", "bench.p2_scaling", ">= 1.8"), ("P3", "bench.p3_input_pipeline", ">= 5"),
              ("P4", "bench.p4_step_overhead", "<= 1.10"), ("P5", "bench.p5_bytes", "<= 0.2")]


def main() -> None:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    rows, details = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for figure, module, target in BENCHMARKS:
            out = Path(tmp) / f"{figure}.json"
            subprocess.run([sys.executable, "-m", module, "--json", str(out)], check=True, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            result = json.loads(out.read_text())
            details[figure] = result
            ratio = next(v for r in result["rows"] for k, v in r.items() if isinstance(v, str) and "ratio" in v)
            value = [v for r in result["rows"] if ratio in r.values() for v in r.values() if isinstance(v, float)][0]
            rows.append({"figure": figure, "benchmark": result["benchmark"], "ratio": value, "target": target})
    report("protomask benchmarks (each ratio measured side by side in one process)", rows, None)
    Path(__file__).with_name("results.json").write_text(
        json.dumps({"machine": machine(), "summary": rows, "details": details}, indent=1))


if __name__ == "__main__":
    main()

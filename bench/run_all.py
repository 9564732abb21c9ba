"""Run every benchmark (P1-P7), each in its own process (each starts its own Ray), print their tables
and one combined table, and write bench/results.json (every round of every figure, the machine, the
load before and after, the wall time).

    .venv/bin/python bench/run_all.py            # or: .venv/bin/python -m bench.run_all
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as bench/run_all.py or python -m bench.run_all

from bench.common import fmt, machine, print_table, write_json

BENCH = Path(__file__).resolve().parent
BENCHMARKS = {"P1": "p1_segment_overhead.py", "P2": "p2_scaling.py", "P3": "p3_input_pipeline.py",
              "P4": "p4_step_overhead.py", "P5": "p5_bytes.py", "P6": "p6_segmenter_throughput.py",
              "P7": "p7_train_scaling.py"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these figures")
    p.add_argument("--out", type=Path, default=BENCH / "results.json")
    p.add_argument("--log", type=Path, help="the benchmarks' stderr (Ray's logs); default: discarded")
    args = p.parse_args()
    figures = args.only or list(BENCHMARKS)
    before, start = machine(), time.perf_counter()
    details: dict[str, dict] = {}
    log = args.log.open("w") if args.log else subprocess.DEVNULL
    with tempfile.TemporaryDirectory() as tmp:
        for figure in figures:
            out = Path(tmp) / f"{figure}.json"
            t0 = time.perf_counter()
            subprocess.run([sys.executable, str(BENCH / BENCHMARKS[figure]), "--json", str(out)], check=True,
                           stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            details[figure] = {**json.loads(out.read_text()), "wall_s": round(time.perf_counter() - t0, 1)}
    wall = time.perf_counter() - start
    rows = [{"#": f, "figure": d["title"], "protomask": f"{fmt(d['ours'])} {d['unit']}",
             "reference": f"{fmt(d['reference'])} {d['unit']}", "ratio": d["ratio"], "target": d["target"],
             "met": d["met"], "ratio per round": " ".join(fmt(r) for r in d["ratios"])} for f, d in details.items()]
    print_table(f"protomask benchmarks: each ratio measured side by side in one process, median of its rounds "
                f"({wall / 60:.1f} min)", rows)
    after = machine()
    print(f"\nmachine: {after['cpus']} x {after['cpu_model']}, {after['memory_gib']} GiB, GPU: {after['gpu']}; "
          f"load average before {before['load_average']}, after {after['load_average']}")
    write_json(args.out, {
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "finished": datetime.now(timezone.utc).isoformat(),
        "wall_s": round(wall, 1), "machine": after, "load_average_before": before["load_average"],
        "summary": [{"figure": f, "title": d["title"], "ours": d["ours"], "reference": d["reference"], "unit": d["unit"],
                     "ratio": d["ratio"], "target": d["target"], "met": d["met"], "ratios": d["ratios"]}
                    for f, d in details.items()],
        "details": details,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""The saliency metrics of the test evaluation at the end of a training run (training.interpretability: the
paper's VLC and overlaps with PRP on each test image's top-5 prototypes) on 2 processes ÷ 1 process.

    python bench/saliency_scale.py --run-dir RUN [--limit N] [--rounds 3]

RUN is a prototype model's run directory (e.g. make bench-real's ProtoMask run); its test split, or the first
--limit keys of it. Each side is a fresh torch.distributed process group (gloo) on this machine with one torch
thread per process, as a Ray Train worker holding one CPU: every process takes every world-size-th sample and
rank 0 gathers the tallies, as training.evaluate does on the workers of a run. The bench checks that both sides
give the same metrics; the sides alternate round by round.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or with python -m

import torch
import torch.distributed as dist

from bench.common import fmt, machine, median, paired_ratios, parser, print_table, side_by_side, write_json
from schemas.config import TrainConfig, load_config
from training.data import ShardDataset, split_keys
from training.evaluate import TOP_K
from training.export import load_model, trained_on
from training.interpretability import interpretability_metrics


def worker(rank: int, world: int, rendezvous: str, run_dir: str, keys: list[str], out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    model, _ = load_model(run_dir)
    dataset = ShardDataset.open(trained_on(run_dir))
    dist.barrier()
    start = time.perf_counter()
    metrics = interpretability_metrics(model.eval(), dataset, keys, k=TOP_K)
    seconds = time.perf_counter() - start  # rank 0 waits for every rank's tally in the gather
    if rank == 0:
        Path(out).write_text(json.dumps({"seconds": seconds, "metrics": metrics}))
    dist.destroy_process_group()


def trial(world: int, run_dir: Path, keys: list[str], seen: list[dict]) -> float:
    """Seconds of the metrics on ``world`` processes; their metrics are appended to ``seen``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        torch.multiprocessing.spawn(worker, args=(world, f"file://{tmp}/rendezvous", str(run_dir), keys, str(out)),
                                    nprocs=world)
        data = json.loads(out.read_text())
    seen.append(data["metrics"])
    return data["seconds"]


def main() -> None:
    p = parser(__doc__, rounds=3)
    p.add_argument("--run-dir", type=Path, required=True, help="a prototype model's run directory")
    p.add_argument("--limit", type=int, help="the first N test keys only (default: the whole test split)")
    args = p.parse_args()
    config = load_config(TrainConfig, args.run_dir / "train_config.yaml", {})
    keys = sorted(split_keys(ShardDataset.open(trained_on(args.run_dir)), config.data.val_fraction,
                             config.seed)["test"])[:args.limit]
    seen: dict[str, list[dict]] = {"1 process": [], "2 processes": []}
    values = side_by_side({side: (lambda w=w, s=seen[side]: trial(w, args.run_dir, keys, s))
                           for w, side in ((1, "1 process"), (2, "2 processes"))}, args.rounds, warmup=False)
    reference = seen["1 process"][0]
    same = all(m.keys() == reference.keys() and all(abs(m[k] - reference[k]) < 1e-6 for k in m if k != "relevance")
               for runs in seen.values() for m in runs)
    speedup = paired_ratios(values, "1 process", "2 processes")
    rows = [{"": side, "seconds": median(v), "images/s": len(keys) / median(v), "rounds": " ".join(fmt(x) for x in v)}
            for side, v in values.items()]
    rows.append({"": "speed-up", "seconds": median(speedup), "rounds": " ".join(fmt(r) for r in speedup)})
    print_table(f"saliency metrics of {len(keys)} test images ({reference['relevance']}, top {TOP_K}), "
                f"median of {args.rounds} rounds; same metrics on both sides: {same}", rows)
    if args.json:
        write_json(args.json, {"rows": rows, "values": values, "metrics": reference, "same": same,
                               "machine": machine()})
    if not same:
        sys.exit("the two sides gave different metrics")


if __name__ == "__main__":
    main()

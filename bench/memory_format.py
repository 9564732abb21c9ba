"""The trunks' speed in channels-last layout (training.model.create_backbone's default) ÷ the default
(contiguous, NCHW) layout, on CPU.

Per backbone, one training step (forward, mean of the features, backward) and one inference pass on a
batch of random inputs, in one process on --torch-threads threads (default 1, a Ray Train worker's), the two
layouts alternating round by round. The convnet row is configs/small-cpu.yaml's trunk on one worker's
micro-batch of crops (8 images × 8 crops at 64 px); resnet18 at 112 px shows a torchvision trunk.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or with python -m

import torch

from bench.common import fmt, machine, median, paired_ratios, parser, print_table, side_by_side, timed, write_json
from training.model import create_backbone

CASES = [("convnet", 16, 64, 64), ("resnet18", 0, 112, 32)]  # backbone, width, input size, batch


def step(trunk: torch.nn.Module, x: torch.Tensor, *, train: bool) -> None:
    trunk.train(train)
    if train:
        trunk(x).mean().backward()
    else:
        with torch.no_grad():
            trunk(x)


def main() -> None:
    p = parser(__doc__, rounds=5)
    p.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = p.parse_args()
    torch.set_num_threads(args.torch_threads)
    rows, results = [], []
    for name, width, size, batch in CASES:
        torch.manual_seed(0)
        x = torch.rand(batch, 3, size, size)
        trunks = {layout: create_backbone(name, None, width or 32, channels_last=layout == "channels last")[0]
                  for layout in ("channels last", "NCHW")}
        for mode in ("training step", "inference"):
            train = mode == "training step"
            values = side_by_side({layout: (lambda t=trunk, tr=train: timed(lambda: step(t, x, train=tr)))
                                   for layout, trunk in trunks.items()}, args.rounds)
            speedup = paired_ratios(values, "NCHW", "channels last")
            rows.append({"backbone": f"{name} ({size} px, batch {batch})", "pass": mode,
                         "NCHW s": median(values["NCHW"]), "channels last s": median(values["channels last"]),
                         "speed-up": median(speedup), "rounds": " ".join(fmt(r) for r in speedup)})
            results.append({**rows[-1], "values": values})
    print_table(f"channels-last ÷ NCHW, {args.torch_threads} torch thread(s), median of {args.rounds} rounds", rows)
    if args.json:
        write_json(args.json, {"rows": results, "machine": machine()})


if __name__ == "__main__":
    main()

"""Where a training step of a trunk goes on CPU: torch.profiler over bench/memory_format.py's training step (a
forward, the mean of the features, a backward) on one worker's micro-batch of crops (default:
configs/small-cpu.yaml's convnet, 8 images × 8 crops at 64 px, one torch thread as in a Ray Train worker), in
channels-last layout (training.model.create_backbone's default).

Two tables: each kind of operator's share of the step's CPU time, and each convolution's forward and backward
GFLOP/s (multiply-adds × 2 from the layer's shapes; the backward counts the input gradient except on the first
layer, whose input needs none). Compare them with one core's peak (AVX2 with two FMA units: 32 FLOP per cycle).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or with python -m

import torch
from torch import nn

from bench.common import machine, median, parser, print_table, timed, write_json
from bench.memory_format import step
from training.model import create_backbone

KINDS = {"convolution": ("convolution",), "batch norm": ("batch_norm",), "relu": ("threshold", "relu", "clamp_min"),
         "max pool": ("max_pool",)}


def kind(op: str) -> str:
    return next((k for k, words in KINDS.items() if any(w in op for w in words)), "other")


def main() -> None:
    p = parser(__doc__, rounds=3)
    p.add_argument("--backbone", default="convnet")
    p.add_argument("--width", type=int, default=16, help="convnet width (default 16)")
    p.add_argument("--input-size", type=int, default=64)
    p.add_argument("--crops", type=int, default=64, help="crops per step (default 64: 8 images × 8 crops)")
    p.add_argument("--torch-threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    trunk, _ = create_backbone(args.backbone, None, args.width)
    x = torch.rand(args.crops, 3, args.input_size, args.input_size)
    # (input shape, weight shape) -> the layers of those shapes (the profiler groups them), multiply-adds, first
    convs: dict[tuple, dict] = {}

    def shape_of(name: str):
        def hook(module: nn.Conv2d, inputs: tuple, output: torch.Tensor) -> None:
            macs = output.numel() * module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            layer = convs.setdefault((tuple(inputs[0].shape), tuple(module.weight.shape)),
                                     {"names": [], "macs": 0, "first": not convs})
            layer["names"].append(name)
            layer["macs"] += macs
        return hook

    handles = [m.register_forward_hook(shape_of(n)) for n, m in trunk.named_modules() if isinstance(m, nn.Conv2d)]

    def train_step() -> None:
        step(trunk, x, train=True)

    train_step()
    for h in handles:
        h.remove()
    seconds = median([timed(train_step) for _ in range(args.rounds)])
    with torch.profiler.profile(record_shapes=True) as prof:
        for _ in range(args.rounds):
            train_step()
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events)
    shares: dict[str, float] = defaultdict(float)
    us: dict[tuple, dict[str, float]] = defaultdict(dict)  # per shape key: microseconds over all rounds
    for e in events:
        shares[kind(e.key)] += e.self_cpu_time_total / total
        if e.key == "aten::mkldnn_convolution":  # inputs: input, weight, ...
            us[tuple(e.input_shapes[0]), tuple(e.input_shapes[1])]["forward"] = e.self_cpu_time_total
        elif e.key == "aten::convolution_backward":  # inputs: grad_output, input, weight, ...
            us[tuple(e.input_shapes[1]), tuple(e.input_shapes[2])]["backward"] = e.self_cpu_time_total
    conv_rows = []
    for (shape, weight), layer in convs.items():
        flops, t = 2 * layer["macs"] * args.rounds, us[shape, weight]
        conv_rows.append({"layers": " ".join(layer["names"]), "input": "×".join(map(str, shape)),
                          "weight": "×".join(map(str, weight)), "forward ms": t["forward"] / args.rounds / 1e3,
                          "forward GFLOP/s": flops / t["forward"] / 1e3,
                          "backward ms": t["backward"] / args.rounds / 1e3,
                          "backward GFLOP/s": flops * (1 if layer["first"] else 2) / t["backward"] / 1e3})
    share_rows = [{"operators": k, "share of the step": f"{v:.0%}"}
                  for k, v in sorted(shares.items(), key=lambda item: -item[1])]
    title = (f"{args.backbone} {args.input_size} px, {args.crops} crops, {args.torch_threads} thread(s): "
             f"{seconds:.3f} s per step (median of {args.rounds})")
    print_table(title, share_rows)
    print_table("convolutions (profiled)", conv_rows)
    if args.json:
        write_json(args.json, {"seconds": seconds, "shares": shares, "convolutions": conv_rows, "machine": machine()})


if __name__ == "__main__":
    main()

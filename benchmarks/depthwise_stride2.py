"""Stride-2 depthwise convs: TVM's fallback schedule against our rule's column-phase split
(schedules/depthwise_conv2d_cpu.py, which takes every stride-2 conv whose padded rows split evenly), one
layer at a time (conv + ReLU6, as in mobilenet_v2), both compiled for this CPU and timed in alternating
rounds, each checked against PyTorch.

    python benchmarks/depthwise_stride2.py --threads 1
    python benchmarks/depthwise_stride2.py --shapes 144x32x3,240x16x3
"""

from __future__ import annotations

import argparse

import numpy as np

SHAPES = "96x112x3,144x56x3,192x28x3,576x14x3,96x64x3,144x64x3,96x32x3,144x32x3,240x32x3,64x16x3,240x16x3," \
         "480x16x3,240x32x5,672x16x5"  # channels x input size x kernel: mobilenet_v2 / efficientnet_b0 at 224 and 128


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=SHAPES, help="channels x input size x kernel, comma-separated")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=15)
    args = p.parse_args()

    import torch
    import tvm
    from torch import nn
    from tvm import relax

    from unsparse_tvm.build import compile_program
    from unsparse_tvm.schedules import cpu_vector_lanes
    from unsparse_tvm.schedules import depthwise_conv2d_cpu as rule
    from unsparse_tvm.target import make_target
    from unsparse_tvm.timing import call_timer, round_robin, set_threads

    set_threads(args.threads)
    target = make_target("llvm")
    lanes = cpu_vector_lanes(target)[0]
    ours = rule.supports
    print(f"{target.attrs.get('mcpu')}, {lanes} lanes, {args.threads} thread(s); us per call, median of {args.repeat}")
    for shape in args.shapes.split(","):
        c, size, k = (int(v) for v in shape.split("x"))
        m = nn.Sequential(nn.Conv2d(c, c, k, 2, k // 2, groups=c), nn.ReLU6()).eval()
        x = torch.randn(1, c, size, size)
        ep = torch.export.export(m, (x,))
        with torch.no_grad():
            ref = m(x).numpy()
        timers = {}
        fallback = lambda sch: rule.stride_of(sch)[0] == 1 and ours(sch)  # noqa: E731 (stride 1 only)
        for name, supports in {"fallback": fallback, "phase split": ours}.items():
            rule.supports = supports  # what relay_passes.TagGroupedConv asks
            f = relax.VirtualMachine(compile_program(ep, target, sparse=False).executable, tvm.cpu())["main"]
            xt = tvm.runtime.tensor(x.numpy())
            y = f(xt)
            y = (y if hasattr(y, "numpy") else y[0]).numpy()
            assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max(), f"{name} differs from PyTorch on {shape}"
            timers[name] = call_timer(lambda f=f, xt=xt: f(xt))
        rule.supports = ours
        ms = round_robin(timers, args.repeat, 10)
        ow = (size + 2 * (k // 2) - k) // 2 + 1
        per = ow * ow * k * k / (size + 2 * (k // 2)) ** 2
        print(f"{c:4d} ch {size:3d}x{size:<3d} {k}x{k} -> rows of {ow:3d} ({per:.2f} taps per padded element): "
              f"fallback {ms['fallback'] * 1e3:6.0f}, phase split {ms['phase split'] * 1e3:6.0f} "
              f"({ms['fallback'] / ms['phase split']:.2f}x)", flush=True)


if __name__ == "__main__":
    main()

"""Per layer, the dense rest of mobile networks (depthwise conv + BN + activation as one op): our rule
(schedules/depthwise_conv2d_cpu.py) against TVM's generic fallback (the rule switched off) and ONNX
Runtime's kernel for the same op, each checked against PyTorch, timed in alternating rounds.

    python benchmarks/dw_layers.py [--threads 1] [--repeat 9] [--stride 2]

Layers: the depthwise shapes of mobilenet_v2 / efficientnet_b0 at 224 and at 128, stride 1 and stride 2
(the rule takes every stride-2 one whose padded rows split evenly into two column phases). Run on an idle
machine. Each op is exported once to ONNX (torch's dynamo exporter) and run by ORT with the same threads.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import numpy as np
import torch
import torch.nn as nn

LAYERS = [  # channels, map size, kernel, stride, activation
    (32, 112, 3, 1, "relu6"), (144, 56, 3, 1, "relu6"), (192, 28, 3, 1, "relu6"), (384, 14, 3, 1, "relu6"),
    (576, 14, 3, 1, "relu6"), (960, 7, 3, 1, "relu6"), (240, 28, 5, 1, "silu"), (480, 14, 3, 1, "silu"),
    (672, 14, 5, 1, "silu"), (1152, 7, 5, 1, "silu"),
    (96, 112, 3, 2, "relu6"), (144, 56, 3, 2, "relu6"), (192, 28, 3, 2, "relu6"), (576, 14, 3, 2, "relu6"),
    (144, 56, 5, 2, "silu"), (672, 28, 5, 2, "silu"),
    (96, 64, 3, 2, "relu6"), (144, 32, 3, 2, "relu6"), (96, 64, 3, 2, "silu"), (240, 16, 3, 2, "silu"),
    (144, 32, 5, 2, "silu"), (672, 16, 5, 2, "silu"),  # the same networks at 128x128
]
ACTS = {"relu6": nn.ReLU6, "silu": nn.SiLU, "hardswish": nn.Hardswish}


class DW(nn.Module):
    def __init__(self, c, k, stride, act):
        super().__init__()
        self.conv = nn.Conv2d(c, c, k, stride, k // 2, groups=c, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.act = ACTS[act]()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--stride", type=int, choices=(1, 2), help="only the layers of this stride")
    args = ap.parse_args()
    import tvm
    from tvm import relax

    from unsparse_tvm.frontend import import_program
    from unsparse_tvm.parallel_build import compile_module
    from unsparse_tvm.peers import export_onnx, onnxruntime_call
    from unsparse_tvm.relay_passes import build_pipeline
    from unsparse_tvm.target import make_target
    from unsparse_tvm.timing import call_timer, round_robin, set_threads

    set_threads(args.threads)
    torch.set_num_threads(args.threads)
    target = make_target("llvm")
    print(f"{target.attrs.get('mcpu')}, {args.threads} thread(s); us per call, median of {args.repeat} alternating rounds")
    print(f"{'layer':28s} {'ours us':>9s} {'fallback us':>12s} {'ORT us':>9s}  fallback/ours  ORT/ours")
    for c, h, k, s, act in LAYERS:
        if args.stride and s != args.stride:
            continue
        model = DW(c, k, s, act).eval()
        model.bn.running_mean.uniform_(-0.2, 0.2)
        x = torch.randn(1, c, h, h)
        with torch.no_grad():
            ep = torch.export.export(model, (x,))
            ref = model(x).numpy()
        xt = tvm.runtime.tensor(x.numpy())
        timers = {}
        for name, rule in (("ours", True), ("fallback", False)):
            mod, names = import_program(ep)  # what `compile` builds (TVM dense), with or without the rule
            ex = compile_module(mod, target, build_pipeline(target, sparse=False, names=names, depthwise_rule=rule))
            fn = relax.VirtualMachine(ex, tvm.cpu())["main"]
            y = fn(xt)
            y = (y if hasattr(y, "numpy") else y[0]).numpy()  # an exported program's main returns a tuple
            assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max(), f"{name} differs from PyTorch"
            timers[name] = call_timer(lambda fn=fn: fn(xt))
        with tempfile.TemporaryDirectory() as d:
            timers["ort"] = call_timer(onnxruntime_call(export_onnx(ep, x, d), x.numpy(), args.threads))
            us = {n: v * 1e3 for n, v in round_robin(timers, args.repeat, 10).items()}
        label = f"dw c{c} {h}x{h} k{k} s{s} {act}"
        print(f"{label:28s} {us['ours']:9.1f} {us['fallback']:12.1f} {us['ort']:9.1f}  "
              f"{us['fallback'] / us['ours']:13.2f}x {us['ort'] / us['ours']:8.2f}x", flush=True)


if __name__ == "__main__":
    sys.exit(main())

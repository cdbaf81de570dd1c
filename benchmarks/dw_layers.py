"""Per layer, the dense rest of mobile networks (depthwise conv + BN + activation as one op) against ONNX
Runtime's kernel for the same op, and against our generic fallback schedule (the rule switched off).

    python benchmarks/dw_layers.py [--threads 1] [--repeat 7]

Layers: the depthwise shapes of mobilenet_v2 / efficientnet_b0 at 224: stride 1, and stride 2 (the rule
takes those where its column-phase copy pays, efficientnet's 5x5s; the 3x3s stay on the fallback, so
"ours" and "fallback" are the same kernel there). Run on an idle machine: timings on a loaded one mean
little. Each op is exported once to ONNX (torch's dynamo exporter) and run by ORT with the same threads.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn

LAYERS = [  # channels, map size, kernel, stride, activation
    (32, 112, 3, 1, "relu6"), (144, 56, 3, 1, "relu6"), (192, 28, 3, 1, "relu6"), (384, 14, 3, 1, "relu6"),
    (576, 14, 3, 1, "relu6"), (960, 7, 3, 1, "relu6"), (240, 28, 5, 1, "silu"), (480, 14, 3, 1, "silu"),
    (672, 14, 5, 1, "silu"), (1152, 7, 5, 1, "silu"), (96, 112, 3, 2, "relu6"), (144, 56, 3, 2, "relu6"),
    (144, 56, 5, 2, "silu"), (672, 28, 5, 2, "silu"),
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


def _time(fn, repeat: int) -> float:
    fn()
    number = max(1, int(0.05 / max(_once(fn), 1e-6)))
    return min(_once(fn, number) for _ in range(repeat)) * 1e6


def _once(fn, number: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import tvm
    from tvm import relax

    from unsparse_tvm.frontend import import_program
    from unsparse_tvm.parallel_build import compile_module
    from unsparse_tvm.peers import export_onnx, onnxruntime_call
    from unsparse_tvm.relay_passes import build_pipeline
    from unsparse_tvm.target import make_target

    torch.set_num_threads(args.threads)
    target = make_target("llvm")
    print(f"{'layer':28s} {'ours us':>9s} {'fallback us':>12s} {'ORT us':>9s}  ORT/ours")
    for c, h, k, s, act in LAYERS:
        model = DW(c, k, s, act).eval()
        x = torch.randn(1, c, h, h)
        with torch.no_grad():
            ep = torch.export.export(model, (x,))
        times = {}
        for name, rule in (("ours", True), ("fallback", False)):
            mod, names = import_program(ep)  # what `compile` builds (TVM dense), with or without the rule
            ex = compile_module(mod, target, build_pipeline(target, sparse=False, names=names, depthwise_rule=rule))
            vm = relax.VirtualMachine(ex, tvm.cpu())
            xt = tvm.runtime.tensor(x.numpy())
            times[name] = _time(lambda: vm["main"](xt), args.repeat)
        with tempfile.TemporaryDirectory() as d:
            ort = onnxruntime_call(export_onnx(ep, x, d), x.numpy(), args.threads)
            times["ort"] = _time(ort, args.repeat)
        label = f"dw c{c} {h}x{h} k{k} s{s} {act}"
        print(f"{label:28s} {times['ours']:9.1f} {times['fallback']:12.1f} {times['ort']:9.1f}  "
              f"{times['ort'] / times['ours']:.2f}x", flush=True)


if __name__ == "__main__":
    sys.exit(main())

"""Our dense kernels at their knobs, one thread: the direct conv's register tile (default vs fixed tile_k) on
VGG-style 3x3 layers from 2x2 to 28x28 maps, and the fallback's linear layers (GEMV at batch 1, small
batches), each checked against numpy/the default first, timed in alternating rounds.

    python benchmarks/dense_baselines.py [--few]          # UNSPARSE_MCPU=haswell for the AVX2 code path
"""

from __future__ import annotations

import argparse

import numpy as np
import tvm

from unsparse_tvm.schedules.dense_conv2d_cpu import Config
from unsparse_tvm.ops import names
from unsparse_tvm.relay_passes import build_pipeline
from unsparse_tvm.single_layer import LayerSpec, layer_module
from unsparse_tvm.target import make_target
from unsparse_tvm.timing import round_robin, set_threads, vm_timer

CONVS = [(512, 512, 2), (512, 512, 4), (512, 256, 4), (256, 256, 8), (64, 64, 32), (512, 512, 14), (256, 256, 28)]
FEW = [(512, 512, 2), (256, 256, 8), (64, 64, 32), (256, 256, 28)]
LINEARS = [(1, 512, 512), (1, 1024, 1024), (8, 1000, 2048), (1, 10, 512), (3, 1000, 1280)]  # batch, out, in


def conv_row(target, k: int, c: int, hw: int, rng) -> str:
    w = rng.standard_normal((k, c, 3, 3)).astype(np.float32)
    spec = LayerSpec("conv2d", (1, c, hw, hw), w, rng.standard_normal(k).astype(np.float32), True,
                     {"strides": [1, 1], "padding": [1] * 4, "dilation": [1, 1], "groups": 1})
    x = rng.standard_normal((1, c, hw, hw)).astype(np.float32)
    timers, ref = {}, None
    for name, cfg in {"default": None, "tile_k=4": Config(tile_k=4), "tile_k=8": Config(tile_k=8)}.items():
        pipeline = build_pipeline(target, sparse=False, configs={names.DENSE_CONV2D: cfg} if cfg else None)
        ex = tvm.compile(layer_module(spec), target=target, relax_pipeline=pipeline)
        timers[name], out = vm_timer(ex, tvm.cpu(), x)
        ref = out if ref is None else ref
        assert np.allclose(out, ref, rtol=1e-3, atol=1e-3), name
    ms = round_robin(timers, 9, min_batch_ms=10)
    useful = k * c * 9 * hw * hw
    return f"| {k}x{c} 3x3, {hw}x{hw} | {4 * k * c * 9 / 1e6:.1f} | " + " | ".join(
        f"{v * 1e3:.0f} ({useful / v / 1e6:.1f})" for v in ms.values()) + " |"


def linear_row(target, n: int, o: int, i: int, rng) -> str:
    w, b = rng.standard_normal((o, i)).astype(np.float32), rng.standard_normal(o).astype(np.float32)
    ex = tvm.compile(layer_module(LayerSpec("dense", (n, i), w, b, True, {})), target=target,
                     relax_pipeline=build_pipeline(target, sparse=False))
    x = rng.standard_normal((n, i)).astype(np.float32)
    timer, out = vm_timer(ex, tvm.cpu(), x)
    ref = np.maximum(x @ w.T + b, 0)
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()
    ms = round_robin({"d": timer}, 7, min_batch_ms=10)["d"]
    return f"| {n} | {o}x{i} | {ms * 1e3:.1f} | {n * o * i / ms / 1e6:.2f} | {4 * o * i / ms / 1e6:.1f} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--few", action="store_true", help="four conv shapes only")
    args = ap.parse_args()
    set_threads(1)
    target, rng = make_target("llvm"), np.random.default_rng(0)
    print(f"code for {target.attrs['mcpu']}, one thread; us (useful GFMA/s)")
    print("| layer | weights MB | default | tile_k=4 | tile_k=8 |\n|---|---|---|---|---|")
    for k, c, hw in FEW if args.few else CONVS:
        print(conv_row(target, k, c, hw, rng), flush=True)
    print("\n| batch | linear | us | GFMA/s | weight GB/s |\n|---|---|---|---|---|")
    for n, o, i in LINEARS:
        print(linear_row(target, n, o, i, rng), flush=True)


if __name__ == "__main__":
    main()

"""Strided sparse convs (stems, downsampling 3x3s) at 90% and at 99.99% sparsity, where little but the pad
stage's phase-plane copy and the epilogue is left: one thread, alternating rounds, checked against PyTorch.
docs/design.md item 18 compares these with the copy as it was.

    python benchmarks/strided_pad.py [--threads 1]
"""

from __future__ import annotations

import argparse

import numpy as np

LAYERS = [  # name, out channels, in channels, kernel, input size, stride, padding
    ("mobilenet stem", 32, 3, 3, 128, 2, 1),
    ("resnet50 stem", 64, 3, 7, 224, 2, 3),
    ("resnet50 layer2.0.conv2", 128, 128, 3, 56, 2, 1),
    ("resnet50 layer3.0.conv2", 256, 256, 3, 28, 2, 1),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=9)
    a = p.parse_args()
    import torch
    import tvm
    from tvm import relax

    from unsparse_tvm.relay_passes import build_pipeline
    from unsparse_tvm.single_layer import LayerSpec, layer_module
    from unsparse_tvm.target import make_target
    from unsparse_tvm.timing import call_timer, round_robin, set_threads

    set_threads(a.threads)
    target, rng, timers = make_target("llvm"), np.random.default_rng(0), {}
    for name, k, c, r, size, stride, pad in LAYERS:
        for sparsity in (0.9, 0.9999):
            w = rng.standard_normal((k, c, r, r)).astype(np.float32)  # [K, C, R, S]
            w[rng.random(w.shape) < sparsity] = 0
            w[:, 0, 0, 0] += 0.1  # no empty row
            bias = rng.standard_normal(k).astype(np.float32)
            spec = LayerSpec("conv2d", (1, c, size, size), w, bias, True,
                             {"strides": [stride] * 2, "padding": [pad] * 4, "dilation": [1, 1], "groups": 1})
            ex = tvm.compile(layer_module(spec), target=target, relax_pipeline=build_pipeline(target, threshold=0.0))
            f = relax.VirtualMachine(ex, tvm.cpu())["main"]
            x = rng.standard_normal(spec.input_shape).astype(np.float32)  # [1, C, H, W]
            xt = tvm.runtime.tensor(x)
            ref = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(bias),
                                             stride=stride, padding=pad).relu().numpy()
            assert np.abs(f(xt).numpy() - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max()), name
            timers[f"{name}, {sparsity:g}"] = call_timer(lambda f=f, xt=xt: f(xt))
    for label, ms in round_robin(timers, a.repeat, min_batch_ms=10).items():
        print(f"{label:36s} {ms * 1e3:8.1f} us")


if __name__ == "__main__":
    main()

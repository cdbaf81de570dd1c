"""Dynamo's own per-call cost, warm and cold: why torch.compile(backend="unsparse") cannot come within 10% of
the API call on a ~2 ms model on a small VM (issue 24).

A backend that does no work (it returns an output computed beforehand) is called through torch.compile
on the model's module, warm (back to back) and cold (after writing 16 MB, as an inference that streams its
weights through the caches leaves them), with Dynamo's guards as they are, with the weight guards our backend
drops (dynamo._drop_weight_guards), and with every nn.Module guard dropped (torch's own
skip_guard_on_all_nn_modules_unsafe, which a user would have to pass); and a plain function for scale.

    python benchmarks/dynamo_cold.py vgg16-cifar --sparsity 0.9
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _median_us(call, before=None, n: int = 300) -> float:
    times = []
    for _ in range(n):
        if before:
            before()
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--sparsity", type=float, default=0.9)
    a = p.parse_args()
    import torch
    from torch.compiler import skip_guard_on_all_nn_modules_unsafe

    from unsparse_tvm.compress.prune import load_model_program
    from unsparse_tvm.dynamo import _drop_weight_guards
    from unsparse_tvm.frontend import program_input_shape
    from unsparse_tvm.peers import plain_module

    torch.set_num_threads(1)
    ep = load_model_program(a.model, a.sparsity)
    x = torch.randn(*program_input_shape(ep))
    out = plain_module(ep)(x)
    big = np.ones(16 << 20, np.uint8)

    def flush():
        big[::64] += 1

    def noop(gm, example_inputs):
        return lambda *args: [out]

    def noop_dropping(gm, example_inputs):
        _drop_weight_guards()
        return lambda *args: [out]

    variants = {"guards as they are": dict(backend=noop), "weight guards dropped (ours)": dict(backend=noop_dropping),
                "all nn.Module guards dropped": dict(backend=noop, options={"guard_filter_fn":
                                                                             skip_guard_on_all_nn_modules_unsafe}),
                "a plain function": None}
    with torch.no_grad():
        for name, kw in variants.items():
            torch._dynamo.reset()
            f = torch.compile(lambda t: t + 1, backend=noop) if kw is None else torch.compile(plain_module(ep), **kw)
            for _ in range(2):  # compile, then one warm call
                f(x)
            print(f"{name:30s} warm {_median_us(lambda: f(x)):6.1f} us   cold {_median_us(lambda: f(x), flush):6.1f} us")


if __name__ == "__main__":
    main()

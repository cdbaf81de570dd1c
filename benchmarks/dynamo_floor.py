"""How much of torch.compile(backend="unsparse")'s per-call cost is Dynamo's own?

The same compiled model called three ways, in alternating rounds in one process (`timing.round_robin`,
as `bench` times):
  api       unsparse_tvm.compile(program)(x): what `bench` compares the backend with (unsparse_api)
  backend   torch.compile(module, backend="unsparse")(x): bench's unsparse_torch_compile row
  floor     an inference through the API, then the same module through torch.compile with a backend that
            does no work (it returns the outputs computed beforehand): Dynamo's guards and argument passing
            alone, run after an inference as in a user's loop (cache-cold), minus the inference
A backend cannot go under `floor`: what `backend` costs over `api + floor` is ours.

    python benchmarks/dynamo_floor.py vgg16-cifar resnet50 --sparsity 0.9 --threads 1 [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def _calls(name: str, sparsity: float) -> tuple[dict, int]:
    import torch

    from unsparse_tvm.api import compile as compile_model
    from unsparse_tvm.compress.prune import load_model_program
    from unsparse_tvm.frontend import program_input_shape
    from unsparse_tvm.peers import plain_module, unsparse_torch_compile_call

    ep = load_model_program(name, sparsity)
    x = torch.randn(*program_input_shape(ep))  # [N, C, H, W], the program's own shape
    api = compile_model(ep)
    ready = api(x)
    backend = unsparse_torch_compile_call(ep, x)  # bench's own torch.compile row (it resets Dynamo first)
    seen = {}

    def noop(gm, example_inputs):  # a backend that does no work: the outputs are already computed
        seen["inputs"] = len(example_inputs)
        return lambda *args: [ready]

    through_noop = torch.compile(plain_module(ep), backend=noop)

    def api_then_noop():
        api(x)
        with torch.no_grad():
            return through_noop(x)

    ref = ready.numpy()
    assert np.abs(backend() - ref).max() <= 1e-4 * np.abs(ref).max()
    api_then_noop()
    return {"api": lambda: api(x).numpy(), "backend": backend, "api_then_noop": api_then_noop}, seen["inputs"]


def measure(name: str, sparsity: float, repeat: int) -> dict:
    from unsparse_tvm.timing import call_timer, round_robin

    calls, inputs = _calls(name, sparsity)
    ms = round_robin({k: call_timer(f) for k, f in calls.items()}, repeat)  # bench's alternating rounds
    floor = ms["api_then_noop"] - ms["api"]
    return {"model": name, "sparsity": sparsity, "graph_inputs": inputs, "api_ms": ms["api"],
            "backend_ms": ms["backend"], "dynamo_floor_ms": floor, "backend_vs_api": ms["backend"] / ms["api"],
            "floor_vs_api": (ms["api"] + floor) / ms["api"], "ours_over_floor_ms": ms["backend"] - ms["api"] - floor}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=9, help="alternating rounds (median reported)")
    p.add_argument("--json")
    a = p.parse_args()
    import torch

    from unsparse_tvm.timing import set_threads

    set_threads(a.threads)  # TVM's pool and torch's
    rows = []
    for name in a.models:
        r = measure(name, a.sparsity, a.repeat)
        rows.append(r)
        print(f"{name} {a.sparsity:g}, {a.threads} thread(s), {r['graph_inputs']} graph inputs: api {r['api_ms']:.3f} ms, "
              f"backend {r['backend_ms']:.3f} ({r['backend_vs_api']:.3f}x), Dynamo's floor {r['dynamo_floor_ms']:.3f} "
              f"({r['floor_vs_api']:.3f}x), ours over the floor {r['ours_over_floor_ms']:+.3f} ms")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"threads": a.threads, "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

"""Do the runtimes' thread pools disturb each other when `bench` times them in one process?

Each contender (ours through the API, ONNX Runtime, OpenVINO; the model pruned as `bench --sparsity` does)
is timed three ways with `timing.round_robin`'s batches, all in this process:
  alone      a round robin of that contender only (the others built, idle; --pause before each batch)
  together   all of them in alternating rounds, `bench`'s 10 ms pause before each batch
  --pause S  all of them again, S seconds before each batch (idle pools have gone to sleep by then)
A contender whose `together` time is far above its `alone` time is slowed by the others' threads (on a
2-vCPU machine, one spinning worker takes half of it); bench's two-thread rows then mislead.

    python benchmarks/thread_pools.py tv:mobilenet_v2@128 --threads 2 [--pause 0.2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=9, help="alternating rounds (median reported)")
    p.add_argument("--pause", type=float, default=0.2, help="seconds before each batch in the third run")
    p.add_argument("--json")
    a = p.parse_args()
    import torch

    from unsparse_tvm.api import compile as compile_model
    from unsparse_tvm.compress.prune import load_model_program
    from unsparse_tvm.frontend import program_input_shape
    from unsparse_tvm.peers import export_onnx, onnxruntime_call, openvino_call
    from unsparse_tvm.timing import call_timer, round_robin, set_threads

    set_threads(a.threads)  # TVM's pool and torch's
    ep = load_model_program(a.model, a.sparsity)
    x = torch.randn(*program_input_shape(ep))  # [N, C, H, W], the program's own shape
    ours = compile_model(ep)
    x_np = x.numpy()
    with tempfile.TemporaryDirectory() as folder:
        path = export_onnx(ep, x, folder)
        calls = {"unsparse": lambda: ours(x_np), "onnxruntime": onnxruntime_call(path, x_np, a.threads),
                 "openvino": openvino_call(path, x_np, a.threads)}
        timers = {n: call_timer(f) for n, f in calls.items()}
        alone = {n: round_robin({n: t}, a.repeat, pause=a.pause)[n] for n, t in timers.items()}  # asleep before
        together = round_robin(timers, a.repeat)  # bench's pause before: 10 ms
        paused = round_robin(timers, a.repeat, pause=a.pause)
    print(f"{a.model} {a.sparsity:g}, {a.threads} thread(s), median ms: alone / together (10 ms pause) / "
          f"together ({a.pause:g} s pause)")
    for n in calls:
        print(f"  {n:12s} {alone[n]:8.3f} {together[n]:8.3f} ({together[n] / alone[n]:.2f}x) "
              f"{paused[n]:8.3f} ({paused[n] / alone[n]:.2f}x)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "sparsity": a.sparsity, "threads": a.threads, "pause_s": a.pause,
                       "torch": torch.__version__, "alone_ms": alone, "together_ms": together,
                       "paused_ms": paused}, f, indent=2)


if __name__ == "__main__":
    main()

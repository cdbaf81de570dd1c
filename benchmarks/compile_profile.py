"""Where `compile` spends its time: export, import, each pipeline phase, TVM's build (LLVM codegen), export.

    python benchmarks/compile_profile.py tv:resnet50 tv:mobilenet_v2@128 --sparsity 0.9 [--cprofile out.prof]

LLVM runs on UNSPARSE_BUILD_JOBS threads (default: the usable cores), as in `compile`. Each phase is timed as its own module pass (the sum is the whole compile); `--cprofile` also writes a
cProfile of the whole thing (view it with `python -m pstats out.prof` then `sort cumtime` / `stats 30`).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import tempfile
import time

import tvm


def profile(model: str, sparsity: float, target_name: str = "llvm") -> dict:
    from unsparse_tvm.compress.prune import load_model_program
    from unsparse_tvm.frontend import import_program
    from unsparse_tvm.parallel_build import compile_module, export_library
    from unsparse_tvm.relay_passes.pipeline import _with_target, pipeline_phases
    from unsparse_tvm.target import make_target

    times: dict[str, float] = {}
    t = time.perf_counter()
    ep = load_model_program(model, sparsity)
    times["prune+export"] = time.perf_counter() - t
    t = time.perf_counter()
    mod, names = import_program(ep)
    times["import"] = time.perf_counter() - t
    target = make_target(target_name)
    report: list = []

    def timed(name: str, seq: tvm.transform.Pass) -> tvm.transform.Pass:
        @tvm.transform.module_pass(opt_level=0, name=f"Timed_{name}")
        def _run(m, _ctx):
            start = time.perf_counter()
            out = seq(m)
            times[name] = time.perf_counter() - start
            return out
        return _run

    passes = [timed(name, tvm.transform.Sequential(phase)) for name, phase in
              pipeline_phases(target, names=names, report=report)]
    pipeline = _with_target(tvm.transform.Sequential(passes), target, None)
    t = time.perf_counter()
    ex = compile_module(mod, target, pipeline)  # what `compile` runs (UNSPARSE_BUILD_JOBS=1: TVM's own path)
    times["tvm.compile total"] = time.perf_counter() - t
    times["codegen (total - phases)"] = times["tvm.compile total"] - sum(
        times[n] for n, _ in pipeline_phases(target, names=names, report=[]))
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        os.makedirs(os.path.join(d, "ws"))
        export_library(ex, os.path.join(d, "m.so"), os.path.join(d, "ws"))
        times["export_library"] = time.perf_counter() - t
    times["sparse layers"] = sum(1 for r in report if r.decision == "sparse")
    times["layers"] = len(report)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--cprofile", help="write a cProfile of the last model here")
    args = ap.parse_args()
    for model in args.models:
        prof = cProfile.Profile() if args.cprofile else None
        if prof:
            prof.enable()
        times = profile(model, args.sparsity)
        if prof:
            prof.disable()
            prof.dump_stats(args.cprofile)
        print(model, " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in times.items()),
              flush=True)


if __name__ == "__main__":
    main()

"""Where `compile` spends its time: export, import, each pipeline phase, TVM's build (LLVM codegen), export.

    python benchmarks/compile_profile.py tv:resnet50 tv:mobilenet_v2@128 --sparsity 0.9 [--cprofile out.prof]

LLVM runs on UNSPARSE_BUILD_JOBS threads (default: the usable cores), as in `compile`. The pipeline's
passes are timed by TVM's PassTimingInstrument and summed per phase of `pipeline_phases` (codegen is the
rest of the compile); `--cprofile` also writes a cProfile of the whole thing (view it with
`python -m pstats out.prof` then `sort cumtime` / `stats 30`).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import re
import tempfile
import time

import tvm

PIPELINE_SEQUENCE = "unsparse_pipeline"  # the name of build_pipeline's Sequential in the timing tree


def pass_times(rendered: str, parent: str = PIPELINE_SEQUENCE) -> list[tuple[str, float]]:
    """(pass name, seconds) of the passes directly under `parent` in PassTimingInstrument.render()'s tree
    (one line a pass, "<tabs>name: 123us [self] (...)", children one tab deeper), in the order they ran."""
    rows = [(len(m[1]), m[2], int(m[3]) / 1e6) for m in
            (re.match(r"^(\t*)([^:]+): (\d+)us", line) for line in rendered.splitlines()) if m]
    top = next((i for i, r in enumerate(rows) if r[1] == parent), None)
    if top is None:
        raise RuntimeError(f"no {parent} in the pass timings")
    depth, out = rows[top][0] + 1, []
    for d, name, seconds in rows[top + 1:]:
        if d < depth:
            break
        if d == depth:
            out.append((name, seconds))
    return out


def phase_times(rendered: str, phases: list[tuple[str, list]]) -> dict[str, float]:
    """Seconds per phase: the timed passes matched in order to each phase's passes (a pass that did not
    run, being off at this opt_level, is skipped)."""
    ran = pass_times(rendered)
    times, i = {}, 0
    for phase, passes in phases:
        times[phase] = 0.0
        for p in passes:
            if i < len(ran) and ran[i][0] == p.info.name:
                times[phase] += ran[i][1]
                i += 1
    if i != len(ran):
        raise RuntimeError(f"timed passes not in the pipeline's phases: {[n for n, _ in ran[i:]]}")
    return times


def profile(model: str, sparsity: float, target_name: str = "llvm") -> dict:
    from unsparse_tvm.compress.prune import load_model_program
    from unsparse_tvm.frontend import import_program
    from unsparse_tvm.parallel_build import compile_module, export_library
    from unsparse_tvm.relay_passes import build_pipeline, pipeline_phases
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
    timing = tvm.ir.instrument.PassTimingInstrument()
    t = time.perf_counter()
    with tvm.transform.PassContext(instruments=[timing]):
        ex = compile_module(mod, target, build_pipeline(target, names=names, report=report))  # as `compile`
        rendered = timing.render()  # inside the context: leaving it clears the profile
    total = time.perf_counter() - t
    phases = phase_times(rendered, pipeline_phases(target, names=names, report=[]))
    times.update(phases)
    times["tvm.compile total"] = total
    times["codegen (total - phases)"] = total - sum(phases.values())
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

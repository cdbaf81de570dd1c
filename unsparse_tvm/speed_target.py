"""Prune for a speed target: the compiler's own cost model tells the pruner where zeros pay.

A user asks for "3x faster than the dense model on this CPU" (or "at most T ms") and gets, per layer, the
sparsity and pattern that reach it at the least accuracy cost, instead of one uniform sparsity:

1. every conv/linear layer's time at each (pattern, sparsity) of a grid, predicted by the cost model the
   compile itself uses (layer_cost with this CPU's calibration), on the weights as that pattern's
   magnitude mask would leave them, packed exactly as the sparsify pass packs them; the time is the
   faster of the sparse and dense kernel, as the compile chooses;
2. each state's accuracy cost: the drop of a one-shot sensitivity scan where a data set is given (the
   `--sensitivity` scan), else -log of the share of the layer's weight energy (sum of w^2) the mask keeps;
3. a greedy multiple-choice knapsack over each layer's convex frontier of (cost, time) (as NetAdapt / AMC
   allocate budgets): from all-dense, repeatedly take the step with the most predicted time saved per
   unit of accuracy cost, until the predicted time meets the target;
4. verified: the pruned model and the dense one compiled and timed in alternating rounds; if the measured
   speedup misses the target, the target given to step 3 is scaled by the miss and the plan made again.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .errors import UnsparseError
from .speed_allocate import LayerPlan, State, allocate, next_ask, sparsest

GRID = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99)
PATTERNS = ("unstructured", "vector", "block")
ROUNDS = 4              # plan-and-measure rounds at most
TOLERANCE = 0.10        # a measured speedup within 10% of the request is a hit


def _predict(spec, weight: np.ndarray, cost) -> tuple[float, float]:
    """(dense us, sparse us) of one layer with this (masked) weight, as the compile would pack and cost it."""
    from .ops.formats import HYB_MIN_SAVING, dense_weight_rows
    from .ops.geometry import ConvGeometry
    from .relay_passes.sparsify_conv2d import kernel_geometry, pack_conv_rows, row_lane_geometry

    if spec.op == "conv2d":
        n, c, h, w = spec.input_shape
        k, _, r, s = weight.shape
        a = spec.attrs
        geo = ConvGeometry(n, c, h, w, k, r, s, tuple(a["strides"]), tuple(a["padding"]), tuple(a["dilation"]))
        ours = kernel_geometry(geo, cost)  # as the pass costs it: the sparse kernel's domain, the dense one's
        rows = pack_conv_rows(weight, ours, None, cost)
        lc = cost.conv(row_lane_geometry(ours, rows, cost), rows, dense_geo=geo)
    else:
        lc = cost.linear(spec.input_shape[0], tuple(weight.shape), dense_weight_rows(weight, None, HYB_MIN_SAVING[cost.kind]))
    return lc.dense_us, lc.sparse_us


def plan_layers(module, ep, program, cost, patterns, curves: dict | None) -> list[LayerPlan]:
    """Every prunable layer's states over PATTERNS x GRID (state 0: dense) with predicted time and cost.
    `program`: the module exported (what the compile sees); `ep`: a reloaded foreign .pt2's program or None."""
    from .compress.masks import prunable_parameters
    from .compress.config import PruneConfig
    from .single_layer import extract_layers

    specs, names = extract_layers(program)  # the compiler's view: batch norms folded, input shapes known
    params = {fqn: getattr(owner, pname).detach() for fqn, owner, pname in prunable_parameters(module, ep)}
    plans = []
    for spec in specs:
        fqn = names.name_of(spec.weight, spec.op) + ".weight"
        if fqn not in params or (spec.op == "conv2d" and spec.attrs["groups"] != 1):
            continue  # grouped / depthwise convs run dense whatever their zeros: nothing to buy there
        w = params[fqn]
        energy = float((w.double() ** 2).sum()) or 1.0
        dense_us, _ = _predict(spec, spec.weight, cost)
        plan = LayerPlan(fqn, spec.op, list(w.shape), [State("dense", 0.0, dense_us, 0.0, "dense")])
        for pattern in patterns:
            cfg = PruneConfig(method=pattern)
            if pattern != "unstructured" and w.shape[0] % 4:
                continue  # vectors / blocks of 4 need a multiple of 4 output channels
            for s in GRID:
                mask = cfg.method_for(s).compute_mask(w, torch.ones_like(w)).numpy()
                d_us, s_us = _predict(spec, spec.weight * mask.reshape(spec.weight.shape), cost)
                removed = float((w.double() ** 2 * torch.from_numpy(1 - mask)).sum()) / energy
                # without data: -log of the weight energy kept, which grows fast near 100% (a layer pruned
                # to 99% keeps ~3% of it), so zeros are spread rather than one layer cut out
                loss = _interp(curves[pattern][fqn], s) if curves else -float(np.log(max(1.0 - removed, 1e-6)))
                plan.states.append(State(pattern, s, min(d_us, s_us), loss, "sparse" if s_us < d_us else "dense"))
        plans.append(plan)
    if not plans:
        raise UnsparseError("the model has no conv2d (ungrouped) or linear layer to prune for speed")
    return plans


def _interp(curve: list, s: float) -> float:
    """A sensitivity curve's drop at s (linear between scan points, running max: more zeros never help)."""
    pts, run = [(0.0, 0.0)], 0.0
    for x, d in sorted(curve):
        run = max(run, d)
        pts.append((x, run))
    for (x0, d0), (x1, d1) in zip(pts, pts[1:]):
        if s <= x1:
            return d0 + (d1 - d0) * (s - x0) / max(x1 - x0, 1e-12)
    return pts[-1][1]


def apply_plan(module, ep, plans: list[LayerPlan]):
    """A pruned copy of `module` (one-shot masks of the plan), for timing."""
    from .compress.masks import prunable_parameters
    from .compress.config import PruneConfig

    pruned = copy.deepcopy(module)
    owners = {fqn: (owner, pname) for fqn, owner, pname in prunable_parameters(pruned, ep)}
    with torch.no_grad():
        for p in plans:
            if p.state.sparsity > 0:
                owner, pname = owners[p.name]
                w = getattr(owner, pname)
                w.mul_(PruneConfig(method=p.state.pattern).method_for(p.state.sparsity).compute_mask(w, torch.ones_like(w)))
    return pruned


@dataclass
class SpeedResult:
    requested: float                 # speedup over dense (or, with latency_ms, the dense time / latency)
    achieved: float
    dense_ms: float
    sparse_ms: float
    rounds: list = field(default_factory=list)   # per round: predicted budget, measured speedup
    layers: list = field(default_factory=list)   # per layer: name, pattern, sparsity, kernel, predicted us

    def as_dict(self) -> dict:
        return asdict(self)


def _time_pair(sparse_ep, dense_ms_fn, target, rates, threads: int, repeat: int) -> tuple[float, float, float]:
    """(measured speedup, dense ms, sparse ms): the plan compiled as `compile` would, timed against the dense
    model in alternating rounds."""
    import tvm

    from .timing import round_robin, set_threads, vm_timer
    from .build import compile_program
    from .frontend import program_input_shape
    from .models import example_input

    compiled = compile_program(sparse_ep, target, rates=rates)
    x = example_input(program_input_shape(sparse_ep)).numpy()
    set_threads(threads)
    timers = {"sparse": vm_timer(compiled.executable, tvm.cpu(), x)[0], "dense": dense_ms_fn}
    t = round_robin(timers, repeat)
    return t["dense"] / t["sparse"], t["dense"], t["sparse"]


def _check_request(speedup: float | None, latency_ms: float | None) -> None:
    if (speedup is None) == (latency_ms is None):
        raise UnsparseError("give one target: --speedup S (over the dense model) or --latency-ms T")
    if speedup is not None and not speedup > 1:
        raise UnsparseError(f"--speedup must be above 1 (the dense model is 1x), got {speedup:g}")
    if latency_ms is not None and not latency_ms > 0:
        raise UnsparseError(f"--latency-ms must be positive, got {latency_ms:g}")


@dataclass
class _Setup:
    """What every round needs: the target, its rates, the layers' plans, the dense model's timer and time."""

    target: object
    rates: object
    plans: list
    dense_timer: object
    dense_ms: float


def _setup(module, ep, example_shape, patterns, data, threads: int, repeat: int, log) -> _Setup:
    import tvm

    from .timing import round_robin, set_threads, vm_timer
    from .build import compile_program
    from .compress.config import PruneConfig, sensitivity_scan
    from .compress.masks import prunable_parameters
    from .cost.calibration import rates_for
    from .relay_passes.pipeline import cost_model
    from .frontend import eval_mode
    from .models import example_input
    from .target import make_target, require_runnable

    target = make_target("llvm")
    require_runnable(target, "prune --speedup")
    rates = rates_for(target, log=log, threads=threads)  # the rates of the thread count it is timed at
    curves = None
    if data is not None:
        log("sensitivity scan per pattern (the accuracy cost of each layer's sparsity) ...")
        layers = prunable_parameters(module, ep)
        curves = {p: sensitivity_scan(module, layers, data, PruneConfig(method=p)) for p in patterns}
    with torch.no_grad():
        program = torch.export.export(eval_mode(module), (torch.randn(*example_shape),))  # a .pt2's refuses eval()
    plans = plan_layers(module, ep, program, cost_model(target, rates), patterns, curves)
    dense = compile_program(program, target, sparse=False)
    dense_timer = vm_timer(dense.executable, tvm.cpu(), example_input(example_shape).numpy())[0]
    set_threads(threads)
    return _Setup(target, rates, plans, dense_timer, round_robin({"dense": dense_timer}, repeat)["dense"])


def prune_for_speed(module, ep, example_shape, *, speedup: float | None = None, latency_ms: float | None = None,
                    patterns=("unstructured",), data=None, threads: int = 1, repeat: int = 15, log=print):
    """Plan, verify and return (per-layer sparsity, per-layer pattern, SpeedResult); the module is untouched."""
    _check_request(speedup, latency_ms)
    setup = _setup(module, ep, example_shape, patterns, data, threads, repeat, log)
    plans = setup.plans
    requested = speedup if speedup is not None else setup.dense_ms / latency_ms
    # plans are made in predicted layer time; what no plan changes (pooling, activations) and the model's own
    # error are corrected by measuring: the request the planner gets is scaled by each round's miss
    predicted_dense = sum(p.states[0].time_us for p in plans)
    fastest = sum(min(s.time_us for s in p.states) for p in plans)
    if predicted_dense / fastest < requested * (1 - TOLERANCE):
        raise UnsparseError(f"{requested:.2f}x is out of reach on this CPU: even at 99% sparsity in every layer the "
                            f"layers are predicted at most {predicted_dense / fastest:.2f}x faster than dense "
                            f"({setup.dense_ms:.3f} ms)")
    result = SpeedResult(requested, 0.0, setup.dense_ms, 0.0)
    best = _rounds(module, ep, example_shape, setup, requested, predicted_dense, threads, repeat, result, log)
    if not best[2]:
        raise UnsparseError(f"{requested:.2f}x is out of reach on this CPU: the fastest plan measured "
                            f"{best[1]:.2f}x over dense ({best[3]:.3f} ms -> {best[4]:.3f} ms)")
    for p, i in zip(plans, best[0]):
        p.chosen = i
    result.achieved, result.dense_ms, result.sparse_ms = best[1], best[3], best[4]
    result.layers = [{"name": p.name, "op": p.op, "shape": p.shape, "pattern": p.state.pattern,
                      "sparsity": p.state.sparsity, "kernel": p.state.kernel,
                      "predicted_us": round(p.state.time_us, 2), "dense_us": round(p.states[0].time_us, 2),
                      "accuracy_cost": round(p.state.cost, 5)} for p in plans]
    sparsity = {p.name: p.state.sparsity for p in plans}
    pattern = {p.name: p.state.pattern for p in plans if p.state.sparsity > 0}
    return sparsity, pattern, result


def _rounds(module, ep, example_shape, setup: _Setup, requested, predicted_dense, threads, repeat,
            result: SpeedResult, log) -> tuple:
    """Plan, prune, compile and time against dense, up to ROUNDS times; the best round: (the layers' chosen
    states, measured speedup, whether it hit the request, dense ms, sparse ms)."""
    plans, ask, best = setup.plans, requested, None
    short, over = None, None  # (ask, measured) of the round that fell short with the largest ask, overshot with the least
    measured: dict = {}       # plan (the layers' chosen states) -> (speedup, dense ms, sparse ms): none timed twice
    for _ in range(4 * ROUNDS):  # plans already timed cost nothing: up to ROUNDS timed, 4x that planned
        reachable = allocate(plans, predicted_dense / ask)
        if not reachable:
            sparsest(plans)  # as fast as it gets: measured, not predicted
        key = tuple(p.chosen for p in plans)
        if key not in measured:
            if len(measured) == ROUNDS:
                break
            measured[key] = _measure_plan(module, ep, example_shape, setup, threads, repeat)
            achieved, d_ms, s_ms = measured[key]
            result.rounds.append({"asked_of_the_layers": round(ask, 3), "speedup": round(achieved, 3),
                                  "dense_ms": d_ms, "sparse_ms": s_ms})
            log(f"  round {len(result.rounds)}: layers planned {predicted_dense / sum(p.state.time_us for p in plans):.2f}x"
                f" -> measured {s_ms:.3f} ms vs dense {d_ms:.3f} ms: {achieved:.2f}x (asked {requested:.2f}x)")
        achieved, d_ms, s_ms = measured[key]
        hit = achieved >= requested * (1 - TOLERANCE)
        if best is None or (hit and (not best[2] or achieved < best[1])) or (not best[2] and achieved > best[1]):
            best = (list(key), achieved, hit, d_ms, s_ms)
        if requested * (1 - TOLERANCE / 2) <= achieved <= requested * (1 + TOLERANCE) or (not reachable and not hit):
            break
        if achieved < requested:
            short = max(short or (ask, achieved), (ask, achieved))
        else:
            over = min(over or (ask, achieved), (ask, achieved))
        ask = next_ask(ask, achieved, requested, short, over)
    return best


def _measure_plan(module, ep, example_shape, setup: _Setup, threads: int, repeat: int) -> tuple[float, float, float]:
    """The layers' chosen states applied to a copy of the module, compiled and timed against dense."""
    from .frontend import eval_mode

    pruned = apply_plan(module, ep, setup.plans)
    with torch.no_grad():
        sparse_ep = torch.export.export(eval_mode(pruned), (torch.randn(*example_shape),))
    return _time_pair(sparse_ep, setup.dense_timer, setup.target, setup.rates, threads, repeat)


def weighted_sparsity(module, ep, sparsity: dict) -> float:
    from .compress.masks import prunable_parameters

    sizes = {fqn: getattr(o, p).numel() for fqn, o, p in prunable_parameters(module, ep)}
    return sum(sparsity.get(n, 0.0) * s for n, s in sizes.items()) / max(1, sum(sizes.values()))



class Planned:
    """A speed plan on its way into a pruned model: `finish` times the pruned model's layers one by one (the
    report's measured column) and returns the result as a dict."""

    def __init__(self, result: SpeedResult, threads: int):
        self.result, self.threads = result, threads

    def finish(self, loaded) -> dict:
        from .frontend import loaded_program

        measured = layer_times(loaded_program(loaded), self.threads)
        for layer in self.result.layers:
            layer["measured_us"] = measured.get(layer["name"])
        return self.result.as_dict()


def plan_config(loaded, cfg, data, *, speedup: float | None = None, latency_ms: float | None = None,
                pattern: str = "unstructured", threads: int | None = None, log=print):
    """(cfg with the plan's per-layer sparsity and pattern, Planned) for prune_command."""
    from .cost.calibration import run_threads

    threads = threads or run_threads()
    patterns = PATTERNS if pattern == "auto" else (pattern,)
    sparsity, patterns_by_layer, result = prune_for_speed(
        loaded.module, loaded.ep, loaded.input_shape, speedup=speedup, latency_ms=latency_ms, patterns=patterns,
        data=data, threads=threads, log=log)
    cfg = dataclasses.replace(cfg, sparsity=weighted_sparsity(loaded.module, loaded.ep, sparsity),
                              layer_sparsity=sparsity, layer_pattern=patterns_by_layer)
    return cfg, Planned(result, threads)


def layer_times(program, threads: int, repeat: int = 7) -> dict[str, float]:
    """Each conv/linear layer of a program compiled as `compile` would (this CPU's rates) and timed alone,
    us by weight name."""
    import tvm

    from .timing import round_robin, set_threads, vm_timer
    from .cost.calibration import rates_for
    from .parallel_build import compile_module
    from .relay_passes import build_pipeline
    from .single_layer import extract_layers, layer_module
    from .target import make_target

    target = make_target("llvm")
    rates = rates_for(target, threads=threads, log=lambda m: None)
    specs, names = extract_layers(program)
    set_threads(threads)
    times = {}
    for spec in specs:
        report: list = []
        pipeline = build_pipeline(target, names=names, report=report, rates=rates)
        ex = compile_module(layer_module(spec), target, pipeline)  # as compile builds it
        x = np.random.default_rng(0).standard_normal(spec.input_shape).astype(np.float32)
        ms = round_robin({"layer": vm_timer(ex, tvm.cpu(), x)[0]}, repeat, min_batch_ms=5.0)["layer"]
        times[names.name_of(spec.weight, spec.op) + ".weight"] = round(ms * 1e3, 2)
    return times


def format_speed(speed: dict) -> str:
    """The speed plan as `prune` prints it: per layer, then end to end."""
    lines = [f"{'layer':28s} {'pattern':12s} {'sparsity':>8s} {'kernel':6s} {'predicted us':>12s} "
             f"{'measured us':>11s} {'dense us':>9s}"]
    for l in speed["layers"]:
        measured = f"{l['measured_us']:11.1f}" if l.get("measured_us") is not None else f"{'-':>11s}"
        lines.append(f"{l['name'].removesuffix('.weight')[:28]:28s} {l['pattern']:12s} {l['sparsity']:8.2f} "
                     f"{l['kernel']:6s} {l['predicted_us']:12.1f} {measured} {l['dense_us']:9.1f}")
    lines.append(f"speed: asked {speed['requested']:.2f}x over the dense model, measured {speed['achieved']:.2f}x "
                 f"({speed['dense_ms']:.3f} -> {speed['sparse_ms']:.3f} ms, {len(speed['rounds'])} round(s))")
    return "\n".join(lines)

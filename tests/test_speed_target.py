"""Pruning for a speed target: the planner's frontier and allocation, and the whole loop (plan with the cost
model, prune, compile, time against dense, correct)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import unsparse_tvm
from unsparse_tvm import UnsparseError
from unsparse_tvm.speed_allocate import LayerPlan, State, allocate, frontier, next_ask


def _states(points):
    return [State("dense" if i == 0 else "unstructured", i / 10, t, c, "sparse") for i, (c, t) in enumerate(points)]


def test_frontier_keeps_only_the_states_worth_taking():
    # (cost, time): dense; a state the compile runs dense (same time, some cost); a step that saves little;
    # two good steps; a state dominated by a cheaper, faster one
    s = _states([(0.0, 100.0), (0.1, 100.0), (0.2, 95.0), (0.3, 40.0), (0.6, 20.0), (0.7, 30.0)])
    assert frontier(s) == [0, 3, 4]  # 95 at 0.2 saves less per unit of cost than going straight on to 40


def test_allocation_takes_time_where_it_is_cheapest():
    cheap = LayerPlan("a.weight", "conv2d", [8, 8, 3, 3], _states([(0.0, 100.0), (0.2, 30.0), (1.0, 10.0)]))
    dear = LayerPlan("b.weight", "conv2d", [8, 8, 3, 3], _states([(0.0, 100.0), (1.0, 30.0), (3.0, 10.0)]))
    assert allocate([cheap, dear], 140.0)
    assert (cheap.chosen, dear.chosen) == (1, 0)          # 70 us saved for 0.2 of cost, the other left dense
    assert allocate([cheap, dear], 60.0) and (cheap.chosen, dear.chosen) == (1, 1)
    assert not allocate([cheap, dear], 10.0)              # below the fastest states: out of reach


def _net():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(16, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, 10)).eval()


@pytest.mark.slow
@pytest.mark.parametrize("steps", [[(2.9, 1.6), (3.5, 2.13), (3.9, 3.1), (99, 4.51)],   # a plan in the gap
                                   [(3.2, 2.0), (3.25, 2.9), (99, 4.4)],                 # a narrow one
                                   [(5.0, 3.0), (99, 6.0)]])                             # prediction 1.7x off
def test_next_ask_finds_the_plan_between_a_short_and_an_overshooting_round(steps):
    """A model whose measured speedup rises with the ask in steps (a large layer turning sparse moves the
    whole model), asked for 3x: the rounds must land in the step within 10% where there is one, not jump
    between the steps on either side (vgg16-cifar's 2.1x / 4.4x oscillation)."""
    measure = lambda ask: next(m for edge, m in steps if ask < edge)
    ask, short, over, seen = 3.0, None, None, []
    for _ in range(16):  # as speed_target._rounds: 4 plans timed at most, one already timed not again
        m = measure(ask)
        if m not in seen and len(seen) == 4:
            break
        seen += [m] if m not in seen else []
        if 2.85 <= m <= 3.3:
            break
        if m < 3:
            short = max(short or (ask, m), (ask, m))
        else:
            over = min(over or (ask, m), (ask, m))
        ask = next_ask(ask, m, 3.0, short, over)
    assert any(2.7 <= m <= 3.3 for m in seen), seen


def test_prune_for_a_speedup_reaches_it_measured():
    """The loop, end to end, on one thread: the measured speedup over the dense compile is within 10% of 2x
    (or better), the layers pruned unevenly, and compiling the result really is that fast."""
    net, x = _net(), torch.randn(1, 16, 32, 32)
    unsparse_tvm.prune(net, speedup=2.0, example_input=x, threads=1)
    result = net.unsparse_speed
    assert result.achieved >= 2.0 * 0.9, result.rounds
    sparsities = [l["sparsity"] for l in result.layers]
    assert len(set(sparsities)) > 1 and max(sparsities) > 0.5
    zeros = [float((m.weight == 0).float().mean()) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert [round(z, 2) for z in zeros] == [round(l["sparsity"], 2) for l in result.layers]


@pytest.mark.parametrize("kwargs, message", [
    ({"speedup": 1.0}, "must be above 1"),
    ({"speedup": 0.5}, "must be above 1"),
    ({"latency_ms": 0.0}, "must be positive"),
    ({"speedup": 2.0, "latency_ms": 1.0}, "give one target"),
    ({"speedup": 2.0, "pattern": "diagonal"}, "unknown pattern"),
    ({"speedup": 1e6}, "out of reach on this CPU"),
])
def test_bad_speed_targets_are_one_error(kwargs, message):
    with pytest.raises(UnsparseError, match=message):
        unsparse_tvm.prune(_net(), example_input=torch.randn(1, 16, 8, 8), threads=1, **kwargs)


def test_a_model_with_nothing_to_prune_is_one_error():
    with pytest.raises(UnsparseError, match="no conv2d"):
        unsparse_tvm.prune(nn.Sequential(nn.ReLU()).eval(), speedup=2.0, example_input=torch.randn(1, 3, 4, 4))


def test_cli_prunes_a_pt2_for_2x_and_reports_every_layer(tmp_path):
    """`prune net.pt2 --speedup 2 --threads 1` (a reloaded program's module refuses eval(): this crashed with a
    traceback): the report holds, per layer, the chosen sparsity and pattern, the predicted and the measured
    time, and the measured end-to-end speedup (within 10% of 2x); the summary names the plan, not a sparsity of 0.
    The same loop on vgg16-cifar (~100 s here) reached 1.92x and 2.12x in two runs (docs/results.md)."""
    import json

    from conftest import cli

    torch.export.save(torch.export.export(_net(), (torch.randn(1, 16, 32, 32),)), tmp_path / "net.pt2")
    proc = cli("prune", tmp_path / "net.pt2", "--speedup", "2", "--threads", "1", "-o", tmp_path / "p.pt2",
               "--report", tmp_path / "r.json")
    report = json.loads((tmp_path / "r.json").read_text())
    speed = report["speed"]
    assert speed["requested"] == 2.0 and speed["achieved"] >= 1.8, speed["rounds"]
    assert all(l["measured_us"] > 0 and l["predicted_us"] > 0 for l in speed["layers"])
    assert "speed: asked 2.00x over the dense model, measured" in proc.stdout
    assert f"a per-layer plan, {report['config']['sparsity']:.3f} of the weights" in proc.stdout
    assert report["config"]["sparsity"] > 0.3


@pytest.mark.parametrize("args, message", [
    (["--speedup", "1"], "must be above 1"),
    (["--speedup", "2", "--sparsity", "0.5"], "--sparsity sets the sparsity itself"),
    (["--speedup", "2", "--latency-ms", "3"], "give one speed target"),
    (["--pattern", "vector", "--sparsity", "0.5"], "--pattern is for --speedup"),
    ([], "prune needs --sparsity S, or a speed target"),
])
def test_cli_speed_target_bad_input_is_one_line_and_writes_nothing(args, message, tmp_path):
    from conftest import assert_proc_one_line_error, cli

    proc = cli("prune", "smallcnn", *args, "-o", tmp_path / "p.pt2", check=False)
    assert_proc_one_line_error(proc, message)
    assert not list(tmp_path.iterdir())


def test_the_last_resort_plan_is_the_sparsest_not_the_predicted_fastest():
    """Where predictions tie at a floor, the plan measured when even the fastest prediction misses takes every
    layer to its sparsest state (digits: uniform 99% ran 3.07x where the predicted-fastest plan ran 2.56x)."""
    from unsparse_tvm.speed_allocate import sparsest

    states = [State("dense", 0.0, 10.0, 0.0, "dense"), State("unstructured", 0.9, 4.0, 1.0, "sparse"),
              State("unstructured", 0.99, 4.0, 3.0, "sparse"), State("vector", 0.99, 3.0, 4.0, "sparse")]
    plan = LayerPlan("w", "conv2d", [8, 8, 3, 3], states)
    assert frontier(states)[-1] == 3
    sparsest([plan])
    assert plan.state.sparsity == 0.99 and plan.state.time_us == 3.0

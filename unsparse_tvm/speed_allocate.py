"""The allocation step of prune --speedup (unsparse_tvm.speed_target): each layer's states (pattern, sparsity,
predicted time, accuracy cost), the convex frontier of a layer's states, the greedy multiple-choice knapsack
over the layers' frontiers, and the ask of the next plan-and-measure round. Pure: no torch, no TVM."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class State:
    pattern: str
    sparsity: float
    time_us: float        # predicted, the faster of the two kernels
    cost: float           # accuracy cost (see the module docstring)
    kernel: str           # "sparse" or "dense": which kernel the compile will pick


@dataclass
class LayerPlan:
    name: str             # weight name, e.g. features.0.weight
    op: str
    shape: list
    states: list = field(default_factory=list)
    chosen: int = 0       # index into states (0: dense)

    @property
    def state(self) -> State:
        return self.states[self.chosen]


def frontier(states: list[State]) -> list[int]:
    """The indices of a layer's states on the lower convex hull of (accuracy cost, time), from dense onwards:
    the states worth taking, in order, each step saving less time per unit of cost than the one before
    (a 50% state the compile would run dense anyway costs accuracy and saves nothing: never on it)."""
    order = sorted(range(len(states)), key=lambda i: (states[i].cost, states[i].time_us))
    hull: list[int] = []
    for i in order:
        if hull and states[i].time_us >= states[hull[-1]].time_us:
            continue  # no faster than a cheaper state
        while len(hull) >= 2:
            a, b = states[hull[-2]], states[hull[-1]]
            slope_ab = (a.time_us - b.time_us) / max(b.cost - a.cost, 1e-12)
            slope_bi = (b.time_us - states[i].time_us) / max(states[i].cost - b.cost, 1e-12)
            if slope_bi < slope_ab:
                break
            hull.pop()  # b saves less per unit of cost than going straight on to i
        hull.append(i)
    return hull


def allocate(plans: list[LayerPlan], budget_us: float) -> bool:
    """Greedy over the layers' frontiers: the step with the most predicted time saved per unit of accuracy cost
    first, until the layers' predicted total is within budget_us. False where even the fastest states miss."""
    hulls = {id(p): frontier(p.states) for p in plans}
    pos = {id(p): 0 for p in plans}
    for p in plans:
        p.chosen = hulls[id(p)][0]
    total = sum(p.state.time_us for p in plans)
    while total > budget_us:
        best, best_slope = None, -1.0
        for p in plans:
            h, k = hulls[id(p)], pos[id(p)]
            if k + 1 < len(h):
                a, b = p.states[h[k]], p.states[h[k + 1]]
                slope = (a.time_us - b.time_us) / max(b.cost - a.cost, 1e-12)
                if slope > best_slope:
                    best, best_slope = p, slope
        if best is None:
            return False
        pos[id(best)] += 1
        total -= best.state.time_us
        best.chosen = hulls[id(best)][pos[id(best)]]
        total += best.state.time_us
    return True


def next_ask(ask: float, achieved: float, requested: float, short, over) -> float:
    """The speedup to ask of the layers next round. With one round short of the request and one over it,
    between their asks (interpolated at the request; a plan's measured speedup rises with its ask, in steps
    where a large layer turns sparse), else scaled by the miss: the prediction was off by that much."""
    if short is None or over is None:
        return ask * requested / achieved
    (a0, m0), (a1, m1) = short, over
    frac = (requested - m0) / max(m1 - m0, 1e-9)
    return a0 + (a1 - a0) * min(max(frac, 0.25), 0.75)  # not onto either end: a step lies between them


def sparsest(plans: list[LayerPlan]) -> None:
    """Every layer at its sparsest state (the least predicted time among equals): the plan measured when even
    the fastest predicted plan misses. Not the predicted-fastest plan: where a layer's predictions tie at a
    floor (the output passes, the weight traffic), more zeros still ran faster on digits' 8 us layers
    (uniform 99% 3.07x, the predicted-fastest plan 2.56x)."""
    for p in plans:
        p.chosen = max(range(len(p.states)), key=lambda i: (p.states[i].sparsity, -p.states[i].time_us))

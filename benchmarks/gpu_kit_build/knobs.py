"""The CUDA rules' knobs as the kit sees them: which rule schedules an operator, its Config's fields, and a
grid of knob points per layer geometry (the data for CUDA tuning records)."""

from __future__ import annotations

import dataclasses
import itertools
import random

# candidate values of the knobs we know (the rules' space()); a knob added later gets {d/2, d, 2d}
KNOWN_KNOB_VALUES = {"threads_q": [32, 64, 128, 256], "threads_k": [1, 2, 4, 8], "per_thread": [1, 2, 4],
                     "lanes": [8, 16, 32], "rows_per_block": [1, 2, 4, 8]}
RULE_MODULES = {"sparse_conv2d": "unsparse_tvm.schedules.sparse_conv2d_cuda",
                "sparse_dense": "unsparse_tvm.schedules.sparse_dense_cuda"}


def rule_module(op: str):
    """The CUDA schedule rule of an operator (the project's rule table; grouped rows share a rule)."""
    import importlib

    try:
        from unsparse_tvm.schedules import rule_for

        rule = rule_for(op, "cuda")
    except ImportError:
        rule = None
    if rule is None:
        if op not in RULE_MODULES:
            raise RuntimeError(f"no CUDA schedule rule for operator {op}")
        rule = importlib.import_module(RULE_MODULES[op])
    return rule


def config_class(op: str):
    return rule_module(op).Config


def knob_values(field: dataclasses.Field, default) -> list:
    if field.name in KNOWN_KNOB_VALUES:
        vals = list(KNOWN_KNOB_VALUES[field.name])
    elif isinstance(default, bool):
        vals = [False, True]
    elif isinstance(default, int):
        vals = sorted({max(1, default // 2), default, default * 2})
    else:
        vals = []
    if default not in vals:
        vals.append(default)
    return vals


def knob_grid(op: str, points: int, seed: int = 0) -> list[dict]:
    """The default first, then each knob varied alone, then a seeded sample of the rest of the factorial."""
    cls = config_class(op)
    fields = dataclasses.fields(cls)
    default = dataclasses.asdict(cls())
    values = {f.name: knob_values(f, default[f.name]) for f in fields}
    grid = [default]
    for name, vals in values.items():
        for v in vals:
            if v != default[name]:
                grid.append({**default, name: v})
    rest = [dict(zip(values, combo)) for combo in itertools.product(*values.values())]
    rest = [c for c in rest if c not in grid]
    random.Random(seed).shuffle(rest)
    grid += rest
    return grid[:max(points, 1)]

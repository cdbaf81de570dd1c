"""Hand-written schedules, one rule per file: `RULE`, a TVM dlight rule (`_common.ScheduleRule`:
`apply(func, target, tunable=False) -> Schedule | None`, None where the rule does not apply), its knobs in
a small `Config` dataclass and a `space(sch)` that samples them for MetaSchedule (the tuning design
space). The pipeline's schedule phase applies `rules(...)` with `dl.ApplyDefaultSchedule`, then on llvm
`fallback_cpu.RULE` for what is left."""

from . import (
    dense_conv2d_cpu,
    depthwise_conv2d_cpu,
    dense_conv2d_cuda,
    phase_planes_cpu,
    sparse_conv2d_cpu,
    sparse_conv2d_cuda,
    sparse_conv2d_grouped_cpu,
    sparse_conv2d_int8_cpu,
    sparse_conv2d_int8_cuda,
    sparse_dense_cpu,
    sparse_dense_cuda,
    sparse_dense_grouped_cpu,
    sparse_dense_int8_cpu,
)
from ._common import ScheduleRule, cpu_vector_lanes

_ALL = (dense_conv2d_cpu, depthwise_conv2d_cpu, dense_conv2d_cuda, phase_planes_cpu, sparse_conv2d_cpu,
        sparse_conv2d_cuda, sparse_conv2d_grouped_cpu, sparse_conv2d_int8_cpu, sparse_conv2d_int8_cuda,
        sparse_dense_cpu, sparse_dense_cuda, sparse_dense_grouped_cpu, sparse_dense_int8_cpu)
# (op attribute, target kind) -> rule; a rule may serve several ops (rows and grouped rows on CUDA)
RULES: dict[tuple[str, str], ScheduleRule] = {(op, m.RULE.target_kind): m.RULE for m in _ALL for op in m.RULE.ops}


def rule_for(op: str, target_kind: str) -> ScheduleRule | None:
    return RULES.get((op, target_kind))


def rules(target_kind: str, configs: dict | None = None) -> list[ScheduleRule]:
    """Every rule for the target kind, each at the knobs `configs` gives one of its ops (op -> Config)."""
    configs = configs or {}
    out = []
    for m in _ALL:
        if m.RULE.target_kind == target_kind:
            given = [configs[op] for op in m.RULE.ops if op in configs]
            out.append(m.RULE.with_config(given[0]) if given else m.RULE)
    return out

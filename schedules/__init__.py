"""Hand-written schedules, one rule per file (`RULE`, a `ScheduleRule`: `apply(func, target, config=None)
-> Schedule | None`, None when the rule does not apply), each with its knobs in a small `Config` dataclass
and a `space(sch)` that samples the same knobs for MetaSchedule (the tuning design space).
relay_passes/schedule_unsparse_ops.py applies them; fallback_cpu schedules what is left on llvm."""

from . import (
    dense_conv2d_cpu,
    depthwise_conv2d_cpu,
    dense_conv2d_cuda,
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
from ._common import ScheduleRule

_ALL = (dense_conv2d_cpu, depthwise_conv2d_cpu, dense_conv2d_cuda, sparse_conv2d_cpu, sparse_conv2d_cuda,
        sparse_conv2d_grouped_cpu, sparse_conv2d_int8_cpu, sparse_conv2d_int8_cuda, sparse_dense_cpu,
        sparse_dense_cuda, sparse_dense_grouped_cpu, sparse_dense_int8_cpu)
# (op attribute, target kind) -> rule; a rule may serve several ops (rows and grouped rows on CUDA)
RULES: dict[tuple[str, str], ScheduleRule] = {(op, m.RULE.target_kind): m.RULE for m in _ALL for op in m.RULE.ops}


def rule_for(op: str, target_kind: str) -> ScheduleRule | None:
    return RULES.get((op, target_kind))

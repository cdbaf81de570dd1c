"""Hand-written schedules, one rule per file, each `apply(func, target, config=None) -> Schedule | None`
(None when the rule does not apply) with its knobs in a small `Config` dataclass, and a
`space(sch)` that samples the same knobs for MetaSchedule (the tuning design space)."""

from . import (dense_conv2d_cpu, dense_conv2d_cuda, fallback_cpu, sparse_conv2d_cpu, sparse_conv2d_cuda, sparse_conv2d_grouped_cpu,
               sparse_dense_cpu, sparse_dense_cuda, sparse_dense_grouped_cpu)

# (op attribute, target kind) -> rule module; see relay_passes/schedule_ops.py
RULES = {
    ("sparse_conv2d", "llvm"): sparse_conv2d_cpu,
    ("sparse_conv2d", "cuda"): sparse_conv2d_cuda,
    ("sparse_conv2d_grouped", "llvm"): sparse_conv2d_grouped_cpu,
    ("sparse_conv2d_grouped", "cuda"): sparse_conv2d_cuda,  # one schedule for rows and groups of rows
    ("sparse_dense", "llvm"): sparse_dense_cpu,
    ("sparse_dense", "cuda"): sparse_dense_cuda,
    ("sparse_dense_grouped", "llvm"): sparse_dense_grouped_cpu,
    ("sparse_dense_grouped", "cuda"): sparse_dense_cuda,  # one schedule for rows and groups of rows
    ("dense_conv2d", "llvm"): dense_conv2d_cpu,
    ("dense_conv2d", "cuda"): dense_conv2d_cuda,
}


def rule_for(op: str, target_kind: str):
    return RULES.get((op, target_kind))

"""SerialSmallLoops: a parallel loop over little work runs on the calling thread alone.

TVM's parallel launch wakes the pool's workers and waits for them at a barrier: about 0.8 us a loop with two
threads on the Zen 4 this was measured on (0.05 us with one), more than half of what a loop that takes
~1.6 us alone saves by splitting. An inference of vgg16-cifar's int8 model ran 47 parallel loops, among them
its max pools on 4x4 and 2x2 maps, the linear layers' quantising of 512 inputs, a flatten. After the
schedules (ours, tuning records' and the fallback), a parallel loop that runs fewer than
MAX_STATEMENTS statements in all becomes serial: a vectorised loop's statement counts once per 16 lanes, an
unrolled or serial loop's once per iteration, a loop of an extent not known at compile time (the sparse kernels' row
loops) as more than any threshold. One thread is unaffected (the loops' code is the same; only the launch goes).
"""

from __future__ import annotations

import math

import tvm_ffi
from tvm import s_tir, tirx

# statement executions below which a loop is not worth a second thread: vgg16-cifar channel4 int8 on two
# threads (so_profile.py, 31 rounds) ran 0.322 ms with none serial, 0.316 / 0.309 / 0.315 with limits of 1024 /
# 2048 / 4096 (12 of its 47 parallel loops serial at 2048: flatten, quantising, relays and epilogues of 2x2 maps)
MAX_STATEMENTS = 2048


def statements(stmt: tirx.Stmt) -> float:
    """Executions of the leaf statements (stores, calls) under `stmt`; inf where a loop's extent is not a
    constant."""
    if isinstance(stmt, tirx.For):
        if not isinstance(stmt.extent, tirx.IntImm):
            return math.inf
        if stmt.kind == tirx.ForKind.VECTORIZED:  # one statement a 16-lane vector (LLVM splits wider ones)
            return -(-int(stmt.extent) // 16) * statements(stmt.body)
        return int(stmt.extent) * statements(stmt.body)
    if isinstance(stmt, tirx.SeqStmt):
        return sum(statements(s) for s in stmt.seq)
    if isinstance(stmt, tirx.IfThenElse):
        return max(statements(stmt.then_case), statements(stmt.else_case) if stmt.else_case is not None else 0)
    if isinstance(stmt, tirx.While):
        return math.inf
    if isinstance(stmt, s_tir.SBlockRealize):
        return statements(stmt.block)
    if isinstance(stmt, s_tir.SBlock):
        return statements(stmt.body) + (statements(stmt.init) if stmt.init is not None else 0)
    body = getattr(stmt, "body", None)  # LetStmt, AttrStmt, DeclBuffer, AllocBuffer, ...
    return statements(body) if isinstance(body, tirx.Stmt) else 1


def serial_small_loops(func: tirx.PrimFunc, limit: int = MAX_STATEMENTS) -> tirx.PrimFunc:
    """func with each parallel loop over fewer than `limit` statement executions made serial."""
    def on_for(loop: tirx.For) -> tirx.For:
        if loop.kind != tirx.ForKind.PARALLEL or statements(loop) >= limit:
            return loop
        return tirx.For(loop.loop_var, loop.min, loop.extent, tirx.ForKind.SERIAL, loop.body, loop.thread_binding,
                        loop.annotations)

    return func.with_body(tvm_ffi.structural_map(func.body, [(tirx.For, on_for)], order="post"))


@tirx.transform.prim_func_pass(opt_level=0, name="SerialSmallLoops")
class SerialSmallLoops:
    """serial_small_loops on every PrimFunc of the module."""

    def __init__(self, limit: int | None = None):
        self.limit = MAX_STATEMENTS if limit is None else limit  # read when the pipeline is built (tests set it)

    def transform_function(self, func: tirx.PrimFunc, _mod, _ctx) -> tirx.PrimFunc:
        return serial_small_loops(func, self.limit)

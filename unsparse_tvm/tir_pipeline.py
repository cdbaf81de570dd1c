"""The TIR lowering our CPU kernels are built with: TVM's own (s_tir), with small buffers kept on the stack.

TVM 0.27's LowerTVMBuiltin keeps an allocation on the stack only where its scope is "global" and it is under
1 KB; every other one, the "local" register tiles of the schedules (conv_local: 8 rows x 16 lanes; the
depthwise and fp32 row tiles, 1-1.8 KB) and each name a TVMScript kernel binds to a value (TVMScript makes it
a one-element local buffer), becomes a TVMBackendAllocWorkspace / TVMBackendFreeWorkspace pair, and where it
sits in a parallel loop, one pair every iteration: resnet50 95% channel4 int8 made 16358 such calls per
inference, 579 now (benchmarks/workspace_calls.py). SmallAllocsOnStack marks every constant-size allocation
under MAX_STACK_BYTES with LowerTVMBuiltin's `disable_lower_builtin`, so LLVM makes it a stack slot of the
function (or of the parallel loop's lambda: one per thread, as the workspace was). Same code otherwise: outputs
bit for bit (docs/design.md item 53).
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx

NAME = "unsparse"  # the pipeline's name for tvm.tirx.build(pipeline=...) and tvm.compile(tir_pipeline=...)
# 4x TVM's own limit (runtime::kMaxStackAlloca, 1 KB), to take the 1-1.8 KB tiles of the depthwise and fp32
# kernels too (mobilenet_v2@224 fp32 1.646 -> 1.464 ms with 4 KB, 16 KB the same); a few KB of a thread's stack
MAX_STACK_BYTES = 4096
DISABLE = "disable_lower_builtin"  # LowerTVMBuiltin leaves an allocation so annotated to LLVM (an alloca)


def allocation_bytes(buffer: tirx.Buffer) -> int | None:
    """The buffer's size in bytes, or None where a dimension is not a constant."""
    size = 1
    for dim in buffer.shape:
        if not isinstance(dim, tirx.IntImm):
            return None
        size *= int(dim.value)
    dtype = tvm.DataType(str(buffer.dtype))
    return size * dtype.bits * dtype.lanes // 8


def small_allocs_on_stack(func: tirx.PrimFunc, limit: int = MAX_STACK_BYTES) -> tirx.PrimFunc:
    """func with each constant-size allocation of fewer than `limit` bytes marked to stay on the stack."""
    def on_alloc(op: tirx.AllocBuffer) -> tirx.AllocBuffer:
        size = allocation_bytes(op.buffer)
        if size is None or size >= limit or DISABLE in op.annotations:
            return op
        return tirx.AllocBuffer(op.buffer, {**dict(op.annotations), DISABLE: tirx.IntImm("int32", 1)})

    return func.with_body(tvm_ffi.structural_map(func.body, [(tirx.AllocBuffer, on_alloc)], order="post"))


@tirx.transform.prim_func_pass(opt_level=0, name="SmallAllocsOnStack")
class SmallAllocsOnStack:
    """small_allocs_on_stack on every PrimFunc of a lowered host module (right before LowerTVMBuiltin)."""

    def transform_function(self, func: tirx.PrimFunc, _mod, _ctx) -> tirx.PrimFunc:
        return small_allocs_on_stack(func)


def _factory(**kwargs):
    from tvm.tirx import compilation_pipeline as pipelines

    lower, finalize_host, finalize_device = pipelines.PIPELINE_MAP["s_tir"](**kwargs)  # what "default" builds

    def host() -> tvm.transform.Pass:
        return tvm.transform.Sequential([SmallAllocsOnStack(), finalize_host()], name="unsparse_finalize_host")

    return lower, host, finalize_device


def pipeline() -> str:
    """The registered name of this pipeline (registered on first use) for llvm builds."""
    from tvm.tirx import compilation_pipeline as pipelines

    if NAME not in pipelines.PIPELINE_MAP:
        pipelines.register_tir_pipeline(NAME, _factory)
    return NAME

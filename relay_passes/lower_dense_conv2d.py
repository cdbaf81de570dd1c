"""LowerDenseConv2d: the remaining dense conv2d (+ bias/residual/ReLU) -> TE dense direct conv2d.

TVM's default llvm pipeline leaves a legalized conv2d as an unscheduled loop nest, and its CUDA pipeline
gives it dlight's fallback (one thread per output); this gives every dense conv the same flat-input
formulation as the sparse kernel and a hand-written x86 or CUDA schedule.
"""

from __future__ import annotations

from functools import partial

import tvm
from tvm import relax
from tvm.ir import IRModule

from unsparse_tvm.ops import names
from unsparse_tvm.ops import sparse as sparse_ops
from ._conv_match import ConvChainRewriter
from ._util import mark


@relax.expr_functor.mutator
class _Lowerer(ConvChainRewriter):
    def rewrite(self, conv, weight, geo, ep):
        if geo is None or int(conv.attrs.groups) != 1:
            return None  # grouped/depthwise: legalized by TVM, scheduled by the CPU fallback rule
        extra, flags = self.epilogue_args(ep)
        op = partial(sparse_ops.dense_conv2d, geo=geo, **flags)  # call_te only passes TE-able kwargs
        call = self.builder_.call_te(op, self.visit_expr(conv.args[0]), relax.const(weight), *extra,
                                     primfunc_name_hint=names.DENSE_CONV2D)
        target = tvm.target.Target.current(allow_none=True)
        strided = geo.stride != (1, 1) and target is not None and target.kind.name == "llvm"
        mark(self.builder_, call, {"op": names.DENSE_CONV2D, "unsparse.pad_shape": geo.pad_shape,
                                   **({names.STRIDE: list(geo.stride)} if strided else {})})  # its phase planes
        return call


@tvm.transform.module_pass(opt_level=0, name="LowerDenseConv2d")
class LowerDenseConv2d:
    """Lower dense conv2d chains to the direct-conv TE operator (x86 and CUDA schedules)."""

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        return _Lowerer(mod).run(mod)

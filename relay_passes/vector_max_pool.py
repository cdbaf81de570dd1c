"""VectorMaxPool (llvm): ResNet's stem pool (max_pool2d 3x3, stride 2, padding 1, NCHW, fp32 or uint8) as
ops.pool.max_pool_3x3s2, a vectorised TVMScript kernel, instead of TVM's pool (one scalar window per output,
which on uint8 LLVM compiled to branches). resnet50's stem pool, 64 x 112x112, one thread, alone: fp32
0.21 -> 0.15 ms, uint8 1.05 -> 0.06 ms; in resnet50 90% fp32 20.48 -> 20.40 ms (AVX2 code: 24.42 -> 24.19),
in the channel4 int8 model at 95% 5.53 -> 5.49. Other pools keep TVM's.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.ir import IRModule

from unsparse_tvm.ops.geometry import MAP_SPLIT_POSITIONS
from unsparse_tvm.ops.pool import max_pool_3x3s2

from ._util import FunctionRewriter, dtype_of, is_op, shape_of


def vector_lanes(dtype: str, width: int, lanes: int) -> int:
    """The kernel's vector for a pool on rows `width` wide, output rows `(width - 1) // 2 + 1`: the target's
    fp32 lanes (16 AVX-512, 8 AVX2), twice that of uint8 (one 256-bit register of bytes on AVX-512), or 0
    where a row is narrower than one vector."""
    lanes = 2 * lanes if dtype == "uint8" else lanes
    return lanes if (width - 1) // 2 + 1 >= lanes else 0


def stem_pool(call: relax.Call) -> bool:
    """A 3x3, stride-2, padding-1 NCHW max pool (no dilation, floor mode) on fp32 or uint8."""
    a = call.attrs
    return (is_op(call, "relax.nn.max_pool2d") and dtype_of(call.args[0]) in ("float32", "uint8")
            and [int(v) for v in a.pool_size] == [3, 3] and [int(v) for v in a.strides] == [2, 2]
            and [int(v) for v in a.padding] == [1, 1, 1, 1] and [int(v) for v in a.dilation] == [1, 1]
            and not a.ceil_mode and str(a.layout) == "NCHW" and str(a.out_layout) == "NCHW")


@relax.expr_functor.mutator
class _Rewriter(FunctionRewriter):
    lanes = 16

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not stem_pool(call):
            return call
        shape, dtype = shape_of(call.args[0]), dtype_of(call.args[0])
        if shape is None or len(shape) != 4:
            return call
        lanes = vector_lanes(dtype, int(shape[3]), self.lanes)
        if not lanes:
            return call
        n, c, h, w = (int(d) for d in shape)
        out = [n, c, (h - 1) // 2 + 1, (w - 1) // 2 + 1]
        # a large uint8 map under AVX-512: in two parts, as the int8 kernels around it split 56x56 maps (AVX2's 49
        # steps do not halve; the relays and the pool split alone ran 0.3-9.5% slower on two threads there). The
        # fp32 kernels split by channel, so a float pool keeps to that
        split = self.lanes >= 16 and dtype == "uint8" and out[2] * out[3] >= MAP_SPLIT_POSITIONS
        kernel = self.builder_.add_func(max_pool_3x3s2((n, c, h, w), dtype, lanes, 2 if split else 1), "max_pool_3x3s2")
        return relax.call_tir(kernel, [call.args[0]], relax.TensorType(out, dtype))


@tvm.transform.module_pass(opt_level=0, name="VectorMaxPool")
class VectorMaxPool:
    def __init__(self, lanes: int):
        self.lanes = lanes  # the target's fp32 vector lanes (schedules.cpu_vector_lanes)

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        rewriter = _Rewriter(mod)
        rewriter.lanes = self.lanes
        return rewriter.run(mod)

"""The mutator both conv2d rewrites share: find conv2d(x, const OIHW weight) and its epilogue chain,
ask the subclass what to emit, remap the chain's last variable to the new call."""

from __future__ import annotations

import dataclasses

import numpy as np
from tvm import relax, topi

from unsparse_tvm.ops.geometry import ConvGeometry

from ._util import ChainRewriter, Epilogue, const_array, dtype_of, is_op, match_epilogue, shape_of, users_of


def conv_geometry(call: relax.Call, weight: np.ndarray) -> ConvGeometry | None:
    """Geometry of a plain NCHW/OIHW float32 conv2d with static shapes; None if it is anything else."""
    a = call.attrs
    if str(a.data_layout) != "NCHW" or str(a.kernel_layout) != "OIHW" or str(a.out_layout) != "NCHW":
        return None
    xshape = shape_of(call.args[0])
    if xshape is None or len(xshape) != 4 or weight.dtype != np.float32:
        return None
    unset = ("", "void", "None")  # an unset out_dtype means "as the input"
    if str(a.out_dtype) not in unset + ("float32",) or getattr(call.args[0].ty, "dtype", None) != "float32":
        return None
    n, c, h, w = xshape
    k, _, r, s = weight.shape
    return ConvGeometry(n, c, h, w, k, r, s, tuple(int(v) for v in a.strides),
                        tuple(int(v) for v in a.padding), tuple(int(v) for v in a.dilation))


def strided_pointwise(geo: ConvGeometry) -> ConvGeometry | None:
    """A strided 1x1 conv without padding reads only every s-th row and column: it is the same conv at
    stride 1 on the input subsampled first (one strided_slice), so the sparse kernel walks one plane instead
    of the s*s phase planes its pad stage would copy (resnet50's downsample convs). The geometry of that
    stride-1 conv, or None for any other conv."""
    if (geo.r, geo.s) != (1, 1) or geo.stride == (1, 1) or any(geo.padding):
        return None
    return dataclasses.replace(geo, h=geo.oh, w=geo.ow, stride=(1, 1), dilation=(1, 1))


def subsampled(builder: relax.BlockBuilder, x: relax.Expr, geo: ConvGeometry, llvm: bool = False) -> relax.Expr:
    """x[:, :, ::sh, ::sw] for the conv strided_pointwise rewrote (geo: the conv as written). On llvm a kernel
    FuseOps leaves alone: fused with the reshape to the conv's flat view, it indexed each value by division
    (resnet50's 256 x 56x56 -> 28x28, one thread: 0.139 ms; alone, as the fallback schedules it, 0.024)."""
    if not llvm:
        return builder.emit(relax.op.strided_slice(x, axes=[2, 3], begin=[0, 0], end=[geo.h, geo.w],
                                                   strides=list(geo.stride)))
    end = [int(d) for d in shape_of(x)]
    call = builder.call_te(topi.strided_slice, x, [0] * len(end), end, [1, 1, *geo.stride],
                           primfunc_name_hint="subsample")
    gv = call.args[0]
    builder.update_func(gv, builder.get()[gv].with_attr("op_pattern", 8))  # kOpaque: FuseOps keeps it alone
    return builder.emit(call)


def channel_gate(expr: relax.Expr, geo: ConvGeometry, var2val: dict, counts: dict, chains: dict):
    """(x, g, sigmoid) where a 1x1 stride-1 conv's input `expr` is x * g or x * sigmoid(g), g [N or 1, C, 1, 1]
    and x a map larger than 1x1 (squeeze-excitation's output, the project conv's input: efficientnet,
    mobilenet_v3), the product and the sigmoid used by nothing else and not the end of another layer's
    fused chain (`chains`: a SiLU on a 1x1 map, x * sigmoid(x), is its conv's epilogue); the sparse conv then
    scales its weights instead (ops.sparse.gate_stage). None for anything else."""
    if not (geo.pointwise and geo.dilation == (1, 1)) or geo.h * geo.w == 1 or not isinstance(expr, relax.Var) \
            or counts.get(expr, 0) != 1 or expr in chains or not is_op(var2val.get(expr), "relax.multiply"):
        return None
    full, gate = (geo.n, geo.c, geo.h, geo.w), {(geo.n, geo.c, 1, 1), (1, geo.c, 1, 1)}
    a, b = var2val[expr].args
    for x, g in ((a, b), (b, a)):
        if shape_of(x) == full and shape_of(g) in gate and dtype_of(g) == "float32" and not x.same_as(g):
            if isinstance(g, relax.Var) and counts.get(g, 0) == 1 and is_op(var2val.get(g), "relax.sigmoid"):
                return x, var2val[g].args[0], True
            return x, g, False
    return None


def channel_gather(expr: relax.Expr, var2val: dict, counts: dict) -> tuple[relax.Expr, np.ndarray] | None:
    """(x, idx) where `expr` is take(x, idx, axis=1) with constant integer indices, used once (DropDeadChannels'
    gather before a depthwise conv, which the sparse kernel folds into its rows' offsets); else None."""
    value = var2val.get(expr) if isinstance(expr, relax.Var) else None
    if not is_op(value, "relax.take") or counts.get(expr, 0) != 1 or int(value.attrs.axis) != 1:
        return None
    idx = const_array(value.args[1])
    if idx is None or idx.ndim != 1 or idx.dtype.kind not in "iu":
        return None
    return value.args[0], idx.astype(np.int64)


def is_depthwise(call: relax.Call, weight: np.ndarray) -> bool:
    """A depthwise conv2d: one input channel per group and one output channel per input channel."""
    xshape = shape_of(call.args[0])
    groups = int(call.attrs.groups)
    return groups > 1 and weight.shape[:2] == (groups, 1) and xshape is not None and len(xshape) == 4 \
        and xshape[1] == groups


def unsupported_reason(call: relax.Call, weight: np.ndarray, depthwise: bool = False) -> str | None:
    """Why a conv2d stays dense whatever its sparsity (one distinct reason each), or None; `depthwise`:
    whether depthwise convs are supported (the llvm kernel takes them as block-diagonal rows)."""
    a = call.attrs
    if int(a.groups) != 1 and not (depthwise and is_depthwise(call, weight)):
        return f"grouped conv, groups={int(a.groups)}"
    layouts = (str(a.data_layout), str(a.kernel_layout), str(a.out_layout))
    if layouts != ("NCHW", "OIHW", "NCHW"):
        return f"layout {'/'.join(layouts)}, not NCHW/OIHW"
    xshape = shape_of(call.args[0])
    if xshape is None or len(xshape) != 4:
        return "input shape not static 4-D"
    dtypes = {str(weight.dtype), str(getattr(call.args[0].ty, "dtype", None))}
    if str(a.out_dtype) not in ("", "void", "None"):
        dtypes.add(str(a.out_dtype))
    if dtypes != {"float32"}:
        return f"dtype {'/'.join(sorted(dtypes - {'float32'}))}, not float32"
    return None


class ConvChainRewriter(ChainRewriter):
    """Base of the conv2d rewrites (undecorated, see ChainRewriter): subclasses, decorated with
    `@relax.expr_functor.mutator`, implement `rewrite(conv, weight, geo, epilogue) -> relax.Expr | None`."""

    allow_residual = True
    allow_act = True  # the operator's epilogue can cap its ReLU (clip(0, M), ReLU6) or apply a SiLU

    def plan(self, func: relax.Function) -> None:
        var2val, counts, users = self.var2val, self.counts, users_of(func)  # the first two: prepare()'s
        self.plans = {}
        claimed: set = set()  # epilogue nodes already fused into an earlier conv's chain
        for block in func.body.blocks:
            for b in block.bindings:
                if not is_op(b.value, "relax.nn.conv2d") or const_array(b.value.args[1]) is None:
                    continue
                out = shape_of(b.var)
                if out is None:
                    continue
                ep = match_epilogue(b.var, out[1], 1, out, var2val, users, counts, self.allow_residual, claimed,
                                    self.allow_act)
                self.plans[ep.last] = (b.value, ep)

    def rewrite_plan(self, planned) -> relax.Expr | None:
        conv, ep = planned
        weight = const_array(conv.args[1])
        return self.rewrite(conv, weight, conv_geometry(conv, weight), ep)

    def rewrite(self, conv, weight, geo, ep):  # pragma: no cover - abstract
        raise NotImplementedError

    def epilogue_args(self, ep: Epilogue) -> tuple[list[relax.Expr], dict]:
        args = []
        if ep.bias is not None:
            args.append(relax.const(ep.bias))
        if ep.residual is not None:
            args.append(self.visit_expr(ep.residual))
        flags = {"has_bias": ep.bias is not None, "has_residual": ep.residual is not None, "relu": ep.relu}
        if ep.relu_max is not None:
            flags["relu_max"] = ep.relu_max
        if ep.silu:
            flags["silu"] = True
        return args, flags

"""FoldBatchNormIntoConv: conv2d [+ const bias] -> batch_norm (inference) becomes conv2d(W') + bias'.

Relax's own FoldBatchnormToConv2D skips the conv -> bias -> batch_norm chain that PyTorch's
Conv2d(bias=True) + BatchNorm2d exports to. Scaling is per output channel, so pruned zeros stay zero.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.ir import IRModule

from unsparse_tvm.reference import fold_batchnorm

from ._util import ChainRewriter, const_array, is_op
from .fold_constant_arrays import FoldConstantArrays
from .layers import LayerNames


@relax.expr_functor.mutator
class _Folder(ChainRewriter):
    def __init__(self, mod: IRModule, names: LayerNames | None):
        super().__init__(mod)
        self.names = names

    def plan(self, func: relax.Function) -> None:
        """Every `batch_norm(...)[0]` binding is a candidate; _fold decides."""
        self.plans = {var: value for var, value in self.var2val.items()
                      if isinstance(value, relax.TupleGetItem) and value.index == 0}

    def rewrite_plan(self, value: relax.TupleGetItem) -> relax.Expr | None:
        return self._fold(value)

    def _fold(self, value: relax.Expr) -> relax.Expr | None:
        # lv = batch_norm(x, gamma, beta, mean, var)[0]
        bn = self.var2val.get(value.tuple_value)
        if bn is None or not is_op(bn, "relax.nn.batch_norm") or int(bn.attrs.axis) != 1:
            return None
        gamma, beta, mean, var = (const_array(a) for a in bn.args[1:])
        if any(a is None for a in (gamma, beta, mean, var)) or self.counts.get(bn.args[0], 0) != 1:
            return None
        x = self.var2val.get(bn.args[0])
        bias = None
        if x is not None and is_op(x, "relax.add"):  # conv -> + bias -> bn
            conv_var, bias_expr = x.args
            bias = const_array(bias_expr)
            if bias is None or self.counts.get(conv_var, 0) != 1:
                return None
            x = self.var2val.get(conv_var)
        if x is None or not is_op(x, "relax.nn.conv2d") or str(x.attrs.kernel_layout) != "OIHW":
            return None
        weight = const_array(x.args[1])
        if weight is None:
            return None
        new_w, new_b = fold_batchnorm(weight, bias, gamma, beta, mean, var, float(bn.attrs.epsilon))
        if self.names is not None:
            self.names.alias(new_w, weight)
        conv = self.builder_.emit(relax.Call(x.op, [self.visit_expr(x.args[0]), relax.const(new_w)], x.attrs))
        return relax.op.add(conv, relax.const(new_b.reshape(1, -1, 1, 1)))


@tvm.transform.module_pass(opt_level=0, name="FoldBatchNormIntoConv")
class FoldBatchNormIntoConv:
    """Fold inference batch norms (and the conv bias before them) into the preceding conv2d."""

    def __init__(self, names: LayerNames | None = None):
        self.names = names

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        mod = FoldConstantArrays()(mod)  # the importer reshapes conv biases: make them constants
        return _Folder(mod, self.names).run(mod)

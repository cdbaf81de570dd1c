"""FoldBatchNormIntoConv: conv2d [+ const bias] -> batch_norm (inference) becomes conv2d(W') + bias'.

Relax's own FoldBatchnormToConv2D skips the conv -> bias -> batch_norm chain that PyTorch's
Conv2d(bias=True) + BatchNorm2d exports to. Scaling is per output channel, so pruned zeros stay zero.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.ir import IRModule

from ._util import const_array, is_op, use_counts
from .layers import LayerNames


@relax.expr_functor.mutator
class _Folder(relax.PyExprMutator):
    def __init__(self, mod: IRModule, names: LayerNames | None):
        super().__init__(mod)
        self.names = names
        self.var2val: dict = {}
        self.counts: dict = {}

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        folded = self._fold(binding.value)
        if folded is None:
            return super().visit_var_binding_(binding)
        self.set_var_remap(binding.var, self.builder_.emit(folded))

    def _fold(self, value: relax.Expr) -> relax.Expr | None:
        # lv = batch_norm(x, gamma, beta, mean, var)[0]
        if not (isinstance(value, relax.TupleGetItem) and value.index == 0):
            return None
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
        k = weight.shape[0]
        scale = gamma / np.sqrt(var + float(bn.attrs.epsilon))                # [K]
        new_w = (weight * scale.reshape(k, 1, 1, 1)).astype(weight.dtype)      # zeros stay zero
        b = np.zeros(k, np.float32) if bias is None else bias.reshape(k)
        new_b = ((b - mean) * scale + beta).astype(np.float32).reshape(1, k, 1, 1)
        if self.names is not None:
            self.names.alias(new_w, weight)
        conv = self.builder_.emit(relax.Call(x.op, [self.visit_expr(x.args[0]), relax.const(new_w)], x.attrs))
        return relax.op.add(conv, relax.const(new_b))


@tvm.transform.module_pass(opt_level=0, name="FoldBatchNormIntoConv")
class FoldBatchNormIntoConv:
    """Fold inference batch norms (and the conv bias before them) into the preceding conv2d."""

    def __init__(self, names: LayerNames | None = None):
        self.names = names

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        mod = relax.transform.FoldConstant()(mod)  # the importer reshapes conv biases: make them constants
        folder = _Folder(mod, self.names)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                folder.var2val = relax.analysis.get_var2val(func)
                folder.counts = use_counts(func)
                folder.builder_.update_func(gv, folder.visit_expr(func))
        return relax.transform.DeadCodeElimination()(folder.builder_.finalize())

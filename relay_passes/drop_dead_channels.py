"""DropDeadChannels: a depthwise conv whose filter for channel c is all zero leaves channel c of its inverted
residual block dead. The depthwise output there is the constant act(bias[c]), which the 1x1 project conv
after it takes into its bias; the expand conv before it then computes channel c for nothing. The block's
hidden width shrinks to its live channels (exact, up to float rounding of the folded bias):

    e = act_e(conv(x, We) + be)     [N, H, h, w]     expand (groups 1; each link of the chain used once)
    d = act_d(dwconv(e, Wd) + bd)   [N, H, h', w']   depthwise (groups H), used once
    p = conv(d, Wp) [+ bp]          [N, K, h', w']   project: 1x1, no padding
 -> the same over the live channels L, and bp + Wp[:, dead] @ act_d(bd[dead]).

At 90% unstructured sparsity 0.9^9 = 39% of a 3x3 depthwise conv's filters are all zero (mobilenet_v2@128
pruned by `prune --sparsity 0.9`: 2770 of 7136), so expand, depthwise and project each lose that share of
their work; a 5x5 one loses 7%. Where the depthwise output also feeds something else (efficientnet's
squeeze-excitation), the dead channel reaches the project conv scaled by a gate computed per image, which no
constant bias carries: there (with `gather`) only the expand conv drops it, and the depthwise conv reads the
live channels through a take along the channel axis that SparsifyConv2d folds into its rows' offsets.
Only the sparse pipeline runs it: TVM's dense baseline computes what the dense runtimes compute.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.ir import IRModule

from ._conv_match import is_depthwise
from ._util import Epilogue, FunctionRewriter, const_array, is_op, match_epilogue, shape_of, users_of
from .layers import LayerNames


def _activation(ep: Epilogue, v: np.ndarray) -> np.ndarray:
    """The epilogue's activation of a constant, as the graph computes it."""
    if ep.silu:
        return v / (1.0 + np.exp(-v.astype(np.float64)))
    if ep.relu:
        v = np.maximum(v, 0.0)
    return np.minimum(v, ep.relu_max) if ep.relu_max is not None else v


def _conv_out(call: relax.Call, weight: np.ndarray, data: relax.Expr) -> relax.Call:
    """conv2d(data, weight) with `call`'s attributes, groups following the weight's channels where the call
    was depthwise."""
    a = call.attrs
    groups = weight.shape[0] if int(a.groups) > 1 else 1
    out_dtype = None if str(a.out_dtype) in ("", "void", "None") else str(a.out_dtype)
    return relax.op.nn.conv2d(data, relax.const(weight), strides=a.strides, padding=a.padding,
                              dilation=a.dilation, groups=groups, data_layout=str(a.data_layout),
                              kernel_layout=str(a.kernel_layout), out_layout=str(a.out_layout),
                              out_dtype=out_dtype)


@relax.expr_functor.mutator
class _Dropper(FunctionRewriter):
    def __init__(self, mod: IRModule, names: LayerNames | None, gather: bool):
        super().__init__(mod)
        self.names, self.gather = names, gather
        self.replace: dict = {}  # binding var -> function of nothing returning its new value

    def prepare(self, func: relax.Function) -> None:
        super().prepare(func)
        self.replace = {}
        users = users_of(func)
        chains = self._chains(func, users)  # last var of a groups-1 conv's chain -> (conv var, epilogue)
        for var, value in self.var2val.items():
            weight = const_array(value.args[1]) if is_op(value, "relax.nn.conv2d") else None
            if weight is not None and is_depthwise(value, weight):
                self._plan(var, value, weight, chains, users)

    def _chains(self, func: relax.Function, users: dict) -> dict:
        chains = {}
        for var, value in self.var2val.items():
            if is_op(value, "relax.nn.conv2d") and int(value.attrs.groups) == 1 and const_array(value.args[1]) is not None:
                out = shape_of(var)
                if out is not None and len(out) == 4:
                    ep = match_epilogue(var, out[1], 1, out, self.var2val, users, self.counts, False, set(), True)
                    chains[ep.last] = (var, ep)
        return chains

    def _plan(self, dw_var, dw, wd: np.ndarray, chains: dict, users: dict) -> None:
        dead = ~wd.reshape(wd.shape[0], -1).any(axis=1)
        expand = chains.get(dw.args[0])
        out = shape_of(dw_var)
        if not dead.any() or dead.all() or expand is None or self.counts.get(dw.args[0], 0) != 1 or out is None:
            return
        live = np.flatnonzero(~dead)
        d_ep = match_epilogue(dw_var, out[1], 1, out, self.var2val, users, self.counts, False, set(), True)
        project = self._project(d_ep, users)
        if project is None and not self.gather:
            return
        e_var, e_ep = expand
        self._replace_conv(e_var, lambda w: w[live])
        self._replace_bias(e_var, e_ep, users, live)
        name = None if self.names is None else \
            self.names.known(wd) or f"depthwise{len(self.names.dropped) + len(self.names.gathered) + 1}"
        if project is None:  # the depthwise conv keeps its channels, reading the live ones through a gather
            idx = np.zeros(wd.shape[0], np.int64)
            idx[live] = np.arange(live.size)  # a dead channel reads live channel 0, times its zero taps
            self.replace[dw_var] = lambda: self._gathered(dw, idx)
            if self.names is not None:
                self.names.gathered[name] = (int(dead.sum()), int(dead.size))
            return
        p_var, p_ep, wp = project
        bd = d_ep.bias if d_ep.bias is not None else np.zeros(wd.shape[0], np.float32)
        fold = wp[:, dead, 0, 0].astype(np.float64) @ _activation(d_ep, bd[dead].astype(np.float64))
        self._replace_conv(dw_var, lambda w: w[live])
        self._replace_bias(dw_var, d_ep, users, live)
        self._replace_project(p_var, p_ep, users, live, fold.astype(np.float32))
        if self.names is not None:
            self.names.dropped[name] = (int(dead.sum()), int(dead.size))

    def _project(self, d_ep: Epilogue, users: dict):
        """(var, epilogue, weight) of the 1x1 project conv that is the depthwise chain's only user, else None."""
        p_var = users.get(d_ep.last)
        project = self.var2val.get(p_var)
        if self.counts.get(d_ep.last, 0) != 1 or not is_op(project, "relax.nn.conv2d") \
                or not project.args[0].same_as(d_ep.last) or int(project.attrs.groups) != 1:
            return None
        wp, p_out = const_array(project.args[1]), shape_of(p_var)
        if wp is None or wp.shape[2:] != (1, 1) or any(int(p) for p in project.attrs.padding) or p_out is None:
            return None
        p_ep = match_epilogue(p_var, p_out[1], 1, p_out, self.var2val, users, self.counts, False, set(), False)
        return p_var, p_ep, wp

    def _gathered(self, dw: relax.Call, idx: np.ndarray) -> relax.Call:
        x = self.builder_.emit(relax.op.take(self.visit_expr(dw.args[0]), relax.const(idx), axis=1))
        return relax.Call(dw.op, [x, dw.args[1]], dw.attrs)

    def _replace_conv(self, var, cut) -> None:
        call = self.var2val[var]
        old = const_array(call.args[1])
        new = np.ascontiguousarray(cut(old))
        if self.names is not None:
            self.names.alias(new, old)
        self.replace[var] = lambda: _conv_out(call, new, self.visit_expr(call.args[0]))

    def _replace_bias(self, var, ep: Epilogue, users: dict, live: np.ndarray) -> None:
        if ep.bias is not None:
            add = users[var]  # the chain's bias add, var's only user
            bias = ep.bias[live].reshape(1, -1, 1, 1)
            self.replace[add] = lambda: relax.op.add(self.visit_expr(var), relax.const(bias))

    def _replace_project(self, var, ep: Epilogue, users: dict, live: np.ndarray, fold: np.ndarray) -> None:
        """The project conv over the live channels; `fold` ([K], the dead channels' constant contribution)
        joins its bias, or becomes one."""
        self._replace_conv(var, lambda w: w[:, live])
        conv = self.replace[var]
        if ep.bias is not None:
            bias = (ep.bias + fold).reshape(1, -1, 1, 1)
            self.replace[users[var]] = lambda: relax.op.add(self.visit_expr(var), relax.const(bias))
        else:
            self.replace[var] = lambda: relax.op.add(self.builder_.emit(conv()),
                                                     relax.const(fold.reshape(1, -1, 1, 1)))

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        new = self.replace.get(binding.var)
        if new is None:
            return super().visit_var_binding_(binding)
        self.set_var_remap(binding.var, self.builder_.emit(new()))


@tvm.transform.module_pass(opt_level=0, name="DropDeadChannels")
class DropDeadChannels:
    """Shrink inverted residual blocks to the channels their depthwise convs do not zero out entirely, recorded
    in `names.dropped` (depthwise layer name -> (dropped, channels)); with `gather` (where the sparse depthwise
    kernel can read a gathered input: llvm, where a quantised model's depthwise convs also run the fp32 kernel, on
    their weights' values), a block whose depthwise output has other uses loses the dead channels from its expand
    conv only (`names.gathered`)."""

    def __init__(self, names: LayerNames | None = None, gather: bool = False):
        self.names, self.gather = names, gather

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        return _Dropper(mod, self.names, self.gather).run(mod)

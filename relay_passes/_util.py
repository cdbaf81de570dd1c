"""Shared pieces of the rewrite passes: constants, use counts, epilogue chains, marking our kernels."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.ir import IRModule
from tvm.ir import GenericConst, Op

from unsparse_tvm.cost.model import CostModel
from unsparse_tvm.ops.formats import compact_offsets, interleave_rows
from unsparse_tvm.ops.names import OP_ATTR
from unsparse_tvm.reference import operand_arrays

from .layers import LayerNames


def const_array(expr: relax.Expr) -> np.ndarray | None:
    return expr.value.numpy() if isinstance(expr, GenericConst) else None


def shape_of(expr: relax.Expr) -> tuple[int, ...] | None:
    ty = expr.ty if hasattr(expr, "ty") else None
    shape = getattr(ty, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        return None
    try:
        return tuple(int(v) for v in shape.values)
    except TypeError:  # symbolic dimension
        return None


def dtype_of(expr: relax.Expr) -> str | None:
    return getattr(getattr(expr, "ty", None), "dtype", None)


def is_op(expr: relax.Expr, name: str) -> bool:
    return isinstance(expr, relax.Call) and isinstance(expr.op, Op) and expr.op.name == name


def use_counts(func: relax.Function) -> dict[relax.Var, int]:
    """How many times each bound variable is used (in later bindings or the function's result)."""
    counts: dict[relax.Var, int] = {}

    def visit(expr):
        if isinstance(expr, relax.Var):
            counts[expr] = counts.get(expr, 0) + 1

    for block in func.body.blocks:
        for b in block.bindings:
            relax.analysis.post_order_visit(b.value, visit)
    relax.analysis.post_order_visit(func.body.body, visit)
    return counts


class FunctionRewriter(relax.PyExprMutator):
    """Undecorated base of a pass that rewrites every Relax function of a module (decorated classes cannot
    be subclassed): `prepare(func)` runs before each function is visited; what the rewrite left unused
    is removed afterwards."""

    def __init__(self, mod: IRModule):
        super().__init__(mod)
        self.var2val: dict = {}  # the function being rewritten: var -> bound value, var -> number of uses
        self.counts: dict = {}

    def prepare(self, func: relax.Function) -> None:
        """Per-function state before the function is visited (subclasses add theirs)."""
        self.var2val = relax.analysis.get_var2val(func)
        self.counts = use_counts(func)

    def run(self, mod: IRModule) -> IRModule:
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                self.prepare(func)
                self.builder_.update_func(gv, self.visit_expr(func))
        return relax.transform.DeadCodeElimination()(self.builder_.finalize())


class ChainRewriter(FunctionRewriter):
    """Base of the layer rewrite passes: `plan(func)` maps the last variable of each matched chain to a
    plan, `rewrite_plan(plan)` returns the replacement (or None to keep the chain); the chain's absorbed
    bindings become dead and are removed."""

    def __init__(self, mod: IRModule):
        super().__init__(mod)
        self.plans: dict = {}

    def prepare(self, func: relax.Function) -> None:
        super().prepare(func)
        self.plan(func)

    def plan(self, func: relax.Function) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def rewrite_plan(self, planned) -> relax.Expr | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        planned = self.plans.get(binding.var)
        new = self.rewrite_plan(planned) if planned is not None else None
        if new is None:
            return super().visit_var_binding_(binding)
        self.set_var_remap(binding.var, self.builder_.emit(new))


@dataclass
class Epilogue:
    """conv/matmul -> [+ per-channel const bias] -> [+ residual tensor] -> [ReLU | clip(0, M) | SiLU], each
    link used once."""

    last: relax.Var                     # the variable the fused call replaces
    bias: np.ndarray | None = None      # [K]
    residual: relax.Expr | None = None
    relu: bool = False
    relu_max: float | None = None       # clip(0, M) (ReLU6: M = 6): relu is True and the output is capped at M
    silu: bool = False                  # SiLU / swish (efficientnet, yolo): x * sigmoid(x), relu False
    absorbed: list[relax.Var] = field(default_factory=list)


def _single_user(var, users, counts, claimed):
    if counts.get(var, 0) != 1 or users.get(var) in claimed:
        return None
    return users.get(var)


def match_epilogue(var: relax.Var, channels: int, channel_axis: int, out_shape: tuple[int, ...],
                   var2val: dict, users: dict, counts: dict, allow_residual: bool = True,
                   claimed: set | None = None, allow_act: bool = False) -> Epilogue:
    """Follow `var` through a bias add, a residual add and a ReLU (or, with allow_act, a clip(0, M) such
    as ReLU6, or a SiLU), as far as each link is its only use and no earlier chain has claimed it (two convs can meet
    at one residual add: only one may fuse it). The chain's nodes are added to `claimed`."""
    claimed = claimed if claimed is not None else set()
    ep = Epilogue(last=var)
    cur = var
    nxt = _single_user(cur, users, counts, claimed)
    if nxt is not None and is_op(var2val[nxt], "relax.add"):
        a, b = var2val[nxt].args
        other = b if a.same_as(cur) else a
        arr = const_array(other)
        if arr is not None and _is_channel_vector(arr, channels, channel_axis, len(out_shape)):
            ep.bias = arr.reshape(-1).astype(np.float32)
            ep.absorbed.append(cur)
            cur = nxt
            nxt = _single_user(cur, users, counts, claimed)
    if allow_residual and nxt is not None and is_op(var2val[nxt], "relax.add"):
        a, b = var2val[nxt].args
        other = b if a.same_as(cur) else a
        if const_array(other) is None and shape_of(other) == out_shape and dtype_of(other) == "float32" \
                and not other.same_as(cur):
            ep.residual = other
            ep.absorbed.append(cur)
            cur = nxt
            nxt = _single_user(cur, users, counts, claimed)
    if nxt is not None and is_op(var2val[nxt], "relax.nn.relu"):
        ep.relu = True
        ep.absorbed.append(cur)
        cur = nxt
    elif allow_act and nxt is not None and (cap := _relu_cap(var2val[nxt])) is not None:
        ep.relu, ep.relu_max = True, cap
        ep.absorbed.append(cur)
        cur = nxt
    elif allow_act and nxt is not None and is_op(var2val[nxt], "relax.nn.silu"):
        ep.silu = True
        ep.absorbed.append(cur)
        cur = nxt
    elif allow_act and (silu := _decomposed_silu(cur, var2val, users, counts, claimed)) is not None:
        ep.silu = True
        ep.absorbed += [cur, silu[0]]
        cur = silu[1]
    ep.last = cur
    claimed.update(ep.absorbed + [cur])
    return ep


def _decomposed_silu(var, var2val, users, counts, claimed) -> tuple[relax.Var, relax.Var] | None:
    """(s, m) where var's only two uses are s = sigmoid(var) and m = var * s: torch.export's SiLU."""
    m = users.get(var)  # the later of var's two users
    if counts.get(var, 0) != 2 or m is None or m in claimed or not is_op(var2val[m], "relax.multiply"):
        return None
    a, b = var2val[m].args
    s = b if a.same_as(var) else a if b.same_as(var) else None
    if s is None or not isinstance(s, relax.Var) or s not in var2val or counts.get(s, 0) != 1:
        return None
    sig = var2val[s]
    return (s, m) if is_op(sig, "relax.sigmoid") and sig.args[0].same_as(var) else None


def _relu_cap(call: relax.Expr) -> float | None:
    """M of a clip(x, 0, M) with constant bounds and M > 0 (ReLU6 as torch.export gives it), else None."""
    if not is_op(call, "relax.clip") or len(call.args) != 3:
        return None
    bounds = []
    for arg in call.args[1:]:
        while hasattr(arg, "value") and not isinstance(arg, (int, float)):  # PrimValue -> FloatImm -> float
            arg = arg.value
        if not isinstance(arg, (int, float)):
            return None
        bounds.append(float(arg))
    lo, hi = bounds
    return hi if lo == 0.0 and 0.0 < hi < float("inf") else None


def _is_channel_vector(arr: np.ndarray, channels: int, axis: int, ndim: int) -> bool:
    """Does arr broadcast against the output as one value per channel (e.g. [1, K, 1, 1] for NCHW)?"""
    if arr.size != channels or arr.ndim > ndim:
        return False
    padded = (1,) * (ndim - arr.ndim) + arr.shape
    return padded[axis] == channels


def users_of(func: relax.Function) -> dict[relax.Var, relax.Var]:
    """For each var, the (last seen) binding var that uses it; meaningful where the use count is 1."""
    users: dict[relax.Var, relax.Var] = {}
    for block in func.body.blocks:
        for b in block.bindings:
            def visit(expr, _b=b):
                if isinstance(expr, relax.Var):
                    users[expr] = _b.var
            relax.analysis.post_order_visit(b.value, visit)
    return users


def fused_label(ep: Epilogue) -> str:
    relu = "relu" if ep.relu_max is None else f"relu{ep.relu_max:g}"
    links = (("bias", ep.bias is not None), ("residual", ep.residual is not None), (relu, ep.relu),
             ("silu", ep.silu))
    parts = [p for p, on in links if on]
    return "+".join(parts)


def rows_consts(rows, lengths: bool = False, interleave: int = 0, order: np.ndarray | None = None) -> list[relax.Expr]:
    """The constant operands of a sparse operator for a SparseRows: data, off [, ovf_data, ovf_off, slot]
    (reference.operand_arrays, which the GPU kit packs with too); lengths: each row's (group's) stored
    entries as off's last column (schedules/row_extents ends the row loops there); order (ell, hyb's main
    part): the rows
    stored in that order (formats.length_order); interleave T (ell, hyb's main part): data and off stored by
    row tiles of T rows (formats.interleave_rows)."""
    arrays = operand_arrays(rows)
    if lengths:
        arrays["off"] = compact_offsets(rows.off_with_lengths())
    if order is not None:
        arrays["data"], arrays["off"] = arrays["data"][order], arrays["off"][order]
    if interleave:
        arrays["data"], arrays["off"] = (interleave_rows(arrays[k], interleave) for k in ("data", "off"))
    return [relax.const(a) for a in arrays.values()]


def mark(builder: relax.BlockBuilder, call: relax.Call, attrs: dict) -> None:
    """Attach unsparse attributes to the PrimFunc a call_te just created."""
    gv = call.args[0]
    func: tirx.PrimFunc = builder.get()[gv]
    # op_pattern 8 (kOpaque): FuseOps must not fuse our kernels with neighbours (it would drop these attrs)
    for key, value in {OP_ATTR: attrs.pop("op"), "op_pattern": 8, **attrs}.items():
        func = func.with_attr(key, value)
    builder.update_func(gv, func)


def record_sparse(decision, rows, ep: Epilogue) -> None:
    """Fill in a LayerDecision for a layer that became a sparse operator."""
    decision.decision, decision.format = "sparse", rows.fmt
    decision.padded, decision.fused = rows.padded_size, fused_label(ep)


MIN_SPARSITY_FOR_COST = 0.2  # below it no format is predicted to win: skip packing the weight (compile time)


def choose_sparse(decision, sparsity: float, threshold: float | None, pack, cost):
    """The packed rows if the layer should run sparse, else None (decision says why). threshold None:
    by predicted time (`cost(rows)` -> LayerCost); a number: sparsity >= threshold, as --threshold asks."""
    if threshold is not None and sparsity < threshold:
        decision.keep_dense("below threshold")
        return None
    if threshold is None and sparsity < MIN_SPARSITY_FOR_COST:
        decision.keep_dense(f"sparsity under {MIN_SPARSITY_FOR_COST}")
        return None
    rows = pack()
    predicted = cost(rows)
    decision.dense_us, decision.sparse_us = round(predicted.dense_us, 2), round(predicted.sparse_us, 2)
    if threshold is None and not predicted.sparse_wins:
        tie = predicted.dense_us == predicted.sparse_us  # both at the memory-bound floor (layer_cost)
        decision.keep_dense("memory-bound either way" if tie else "predicted faster")
        decision.format = rows.fmt
        return None
    return rows


class SparsifyPass:
    """Undecorated base of SparsifyConv2d / SparsifyDense (decorated classes cannot be subclassed): their
    options, and running the pass's mutator (`mutator`, a staticmethod) over the module."""

    mutator = None

    def __init__(self, threshold: float | None = None, names: LayerNames | None = None, report: list | None = None,
                 fmt: str | None = None, cost: CostModel | None = None, quant: dict | None = None):
        self.threshold, self.fmt, self.quant = threshold, fmt, quant
        self.cost = cost if cost is not None else CostModel("llvm")  # target kind and (x86) rates
        self.names = names if names is not None else LayerNames()
        self.report = report if report is not None else []

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        mutator = self.mutator(mod, self.threshold, self.names, self.report, self.fmt, self.cost)
        mutator.quant = self.quant  # unsparse_quant.json of the model, or None (relay_passes/_quant.py)
        return mutator.run(mod)

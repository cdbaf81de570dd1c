"""The mutator both linear-layer rewrites share (SparsifyDense, QuantizeInt8Dense), as _conv_match.py is for
convs: find matmul(x, constant weight) with a 2-D input and its epilogue chain, ask the subclass what to
emit, remap the chain's last variable to the new call. Also `find_layers`: every conv2d and linear layer of
a module, as the passes see them (what `bench` times one by one)."""

from __future__ import annotations

import numpy as np
from tvm import relax

from ._util import ChainRewriter, const_array, is_op, match_epilogue, shape_of, use_counts, users_of


def linear_weight(call: relax.Call, var2val: dict) -> np.ndarray | None:
    """[out, in] weight of matmul(x, W^T) where W^T is a constant or permute_dims of a constant."""
    if not is_op(call, "relax.matmul"):
        return None
    rhs = call.args[1]
    rhs = var2val.get(rhs, rhs)
    arr = const_array(rhs)
    if arr is not None and arr.ndim == 2:
        return np.ascontiguousarray(arr.T)
    if is_op(rhs, "relax.permute_dims"):
        inner = const_array(rhs.args[0])
        axes = [int(a) for a in rhs.attrs.axes] if rhs.attrs.axes is not None else [1, 0]
        if inner is not None and inner.ndim == 2 and axes == [1, 0]:
            return inner
    return None


class DenseChainRewriter(ChainRewriter):
    """Base of the linear-layer rewrites (undecorated, see ChainRewriter): subclasses, decorated with
    `@relax.expr_functor.mutator`, implement `rewrite(call, weight, epilogue) -> relax.Expr | None`, and may
    narrow `takes(weight)`."""

    def takes(self, weight: np.ndarray) -> bool:
        return True

    def plan(self, func: relax.Function) -> None:
        var2val, counts, users = self.var2val, self.counts, users_of(func)  # the first two: prepare()'s
        self.plans = {}
        for block in func.body.blocks:
            for b in block.bindings:
                weight = linear_weight(b.value, var2val)
                if weight is None or not self.takes(weight):
                    continue
                xshape, out = shape_of(b.value.args[0]), shape_of(b.var)
                if xshape is None or len(xshape) != 2 or out is None:
                    continue
                ep = match_epilogue(b.var, out[1], 1, out, var2val, users, counts, allow_residual=False)
                self.plans[ep.last] = (b.value, weight, ep)

    def rewrite_plan(self, planned) -> relax.Expr | None:
        return self.rewrite(*planned)

    def rewrite(self, call, weight, ep):  # pragma: no cover - abstract
        raise NotImplementedError


def find_layers(func: relax.Function) -> list[tuple[str, relax.Call, np.ndarray, object]]:
    """Every conv2d and linear layer with a constant weight in a Relax function, in order: (op "conv2d" or
    "dense", the call, its weight (OIHW or [out, in]), its bias/ReLU epilogue)."""
    var2val, counts, users = relax.analysis.get_var2val(func), use_counts(func), users_of(func)
    layers = []
    for block in func.body.blocks:
        for b in block.bindings:
            out = shape_of(b.var)
            if out is None:
                continue
            if is_op(b.value, "relax.nn.conv2d") and const_array(b.value.args[1]) is not None:
                kind, weight = "conv2d", const_array(b.value.args[1])
            elif (weight := linear_weight(b.value, var2val)) is not None:
                kind = "dense"
            else:
                continue
            ep = match_epilogue(b.var, out[1], 1, out, var2val, users, counts, allow_residual=False)
            layers.append((kind, b.value, weight, ep))
    return layers

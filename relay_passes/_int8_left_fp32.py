"""Which of the convs with an int8 range stay fp32 (quantize_int8's rules whose answer is a set of layers), and
the input a conv reads through a max pool, which the int8 chaining sees through."""

from __future__ import annotations

from tvm import relax

from . import _gathered_int8
from ._conv_match import conv_geometry
from ._util import const_array, is_op, match_epilogue, shape_of, users_of


def max_pool_input(src: relax.Var, var2val: dict, counts: dict) -> relax.Expr | None:
    """The input of the max pool `src` comes from, or None. The PyTorch importer writes a max pool as
    (max_pool2d(x), zeros_like(...))[0] (the second field for the indices): seen through."""
    value = var2val.get(src)
    if isinstance(value, relax.TupleGetItem) and value.index == 0 and counts.get(value.tuple_value, 0) == 1:
        tup = var2val.get(value.tuple_value)
        if not isinstance(tup, relax.Tuple) or not isinstance(tup.fields[0], relax.Var):
            return None
        pool = tup.fields[0]
        zeros = [f for f in tup.fields[1:] if isinstance(f, relax.Var) and is_op(var2val.get(f), "relax.zeros_like")]
        consts = [f for f in tup.fields[1:] if const_array(f) is not None]  # zeros_like, folded
        if len(zeros) + len(consts) != len(tup.fields) - 1 or counts.get(pool, 0) != 1 + len(zeros):
            return None  # the pool's value goes somewhere else too
        value = var2val.get(pool)
    return value.args[0] if is_op(value, "relax.nn.max_pool2d") else None


def capped_convs(rw, func: relax.Function) -> dict:
    """{name: "ReLU6" or "SiLU"} of the convs such an activation follows (CAPPED_FP32)."""
    users, out = users_of(func), {}
    for block in func.body.blocks:
        for b in block.bindings:
            weight = const_array(b.value.args[1]) if is_op(b.value, "relax.nn.conv2d") else None
            shape = shape_of(b.var) if weight is not None else None
            if shape is None or (name := rw.names.known(weight)) is None:
                continue
            ep = match_epilogue(b.var, shape[1], 1, shape, rw.var2val, users, rw.counts, True, set(), True)
            if ep.relu_max is not None or ep.silu:
                out[name] = "SiLU" if ep.silu else "ReLU6"
    return out


def fed_fp32(rw) -> set:
    """The names of the scattered convs (quads under MAX_FILL) that the gathered kernel does not take and whose
    input (through a max pool, as the chaining sees it) is not written by a conv that runs int8 (FED_FP32). The
    chains in binding order, so a producer is decided before its readers: the set is rw.fed_fp32 as it fills, which
    act_of reads."""
    out = rw.fed_fp32 = set()
    for conv, _ in rw.plans.values():
        weight = const_array(conv.args[1])
        geo = conv_geometry(conv, weight)
        name = rw.names.known(weight)
        if name is None or geo is None or _gathered_int8.quad_fill(weight) >= _gathered_int8.MAX_FILL \
                or rw.gathered_geometry(weight, geo) is not None:
            continue
        pooled = max_pool_input(conv.args[0], rw.var2val, rw.counts)
        src = conv.args[0] if pooled is None else pooled
        producer = rw.plans.get(src)
        pweight = None if producer is None else const_array(producer[0].args[1])
        if producer is None or rw.act_of(producer[0], pweight, conv_geometry(producer[0], pweight)) is None:
            out.add(name)
    return out

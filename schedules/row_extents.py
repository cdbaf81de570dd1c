"""TrimRowLoops: a sparse conv's loop over its stored entries runs to the longest row among the rows it
serves, not to the layer's longest row.

The weights are ELL rows padded to the layer's longest row (hyb's main part: to its width), and the kernels'
loop over them (`j`, the register tile's rows inside it) multiplied the padding too: a zero quad costs a
vpdpbusd like any other, a zero weight an FMA. Rows differ a lot in length (resnet50 at 95% channel4 stores
1.92x its nonzero int8 quads padded; to the longest of each pair of rows it would be 1.14x). The rewrite
passes store each row's stored entries in an extra last column of the offsets (PrimFunc attr
`names.ROW_LENGTHS`, llvm); after scheduling (our rules, or a tuning record's trace) this
pass sets the `j` loop's extent to the largest count among the rows its body serves, read from that column
at run time. The padding stays in memory; only the loop stops before it. One thread, the same outputs bit
for bit: int8 resnet50 channel4 95% 6.24 -> 5.73 ms, 90% 9.18 -> 8.33, vgg16-cifar 90% 0.62 -> 0.58,
unstructured 90% resnet50 16.2 -> 15.1, vgg16-cifar 1.56 -> 1.44; fp32 unstructured 90% resnet50 22.9 ->
22.0 (AVX2 code: 25.1 -> 23.2), vgg16-cifar unchanged (its hyb rows were tight already), vgg16-cifar
vector-4 (vell4 row groups) 1.02 -> 0.96.
"""

from __future__ import annotations

import functools
import itertools
import math

import tvm_ffi
from tvm import s_tir, sym, tirx

from unsparse_tvm.ops import names

TRIMMED = (names.SPARSE_CONV2D_INT8, names.SPARSE_CONV2D, names.SPARSE_CONV2D_GROUPED)  # loops over rows
MAX_GROUP = 64  # rows one `j` loop serves, at most (the extent reads each one's length once per loop)


def trim_row_loops(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """func with each `j` loop of its conv update blocks bounded by its rows' lengths (see above)."""
    def on_for(loop: tirx.For) -> tirx.For:
        extent = _extent(loop) if isinstance(loop.extent, tirx.IntImm) else None
        if extent is None:
            return loop
        extent = tirx.Cast(str(loop.loop_var.ty.dtype), extent)  # int64 loops in the pipeline's functions
        return tirx.For(loop.loop_var, loop.min, extent, loop.kind, loop.body, loop.thread_binding, loop.annotations)

    return func.with_body(tvm_ffi.structural_map(func.body, [(tirx.For, on_for)], order="post"))


def _extent(loop: tirx.For) -> tirx.PrimExpr | None:
    """max over the rows the loop's conv block reads of off[k, L], or None where `loop` is not a conv's loop
    over all L stored entries of rows whose offsets off [K, L + 1] end with their lengths."""
    realize, inner = _conv_block(loop.body)
    if realize is None:
        return None
    width = int(loop.extent)
    off = next((r.source for r in realize.block.reads if len(r.source.shape) in (2, 3) and r.source.scope() == "global"
                and r.source.dtype in ("int32", "uint16") and int(r.source.shape[1]) == width + 1), None)
    if off is None:
        return None
    bound = {iv.var.name: value for iv, value in zip(realize.block.iter_vars, realize.iter_values)}
    j = next((v for n, v in bound.items() if n.startswith("v_j")), None)
    k = next((v for n, v in bound.items() if n.startswith(("v_k", "v_g"))), None)  # a row, or a row group
    if j is None or k is None or not (isinstance(j, tirx.Var) and j.same_as(loop.loop_var)):
        return None
    used = [(var, ext) for var, ext in inner if _uses(k, var)]  # the register tile's rows inside the loop
    if any(not isinstance(ext, tirx.IntImm) for _, ext in used) or math.prod(int(e) for _, e in used) > MAX_GROUP:
        return None
    analyzer = sym.Analyzer()
    lengths = []
    for point in itertools.product(*(range(int(ext)) for _, ext in used)):
        values = {var: tirx.const(p, str(var.ty.dtype)) for (var, _), p in zip(used, point)}
        row = analyzer.simplify(_substitute(k, values))
        last = tirx.const(width, str(row.ty.dtype))
        if len(off.shape) == 3:  # rows interleaved by tiles of T (formats.interleave_rows): [K/T, L + 1, T]
            tile = tirx.const(int(off.shape[2]), str(row.ty.dtype))
            index = [analyzer.simplify(tirx.floordiv(row, tile)), last, analyzer.simplify(tirx.floormod(row, tile))]
        else:
            index = [row, last]
        lengths.append(tirx.Cast("int32", tirx.BufferLoad(off, index)))
    return functools.reduce(tirx.Max, lengths)


def _conv_block(body: tirx.Stmt):
    """(the first block realize under `body` whose block is a conv update, the (var, extent) of the loops on
    the way to it)."""
    found: list = []

    def visit(node, visitor):
        if found:
            return None
        if isinstance(node, s_tir.SBlockRealize) and node.block.name_hint.startswith("conv_update"):
            found.append((node, list(path)))
            return None
        if isinstance(node, tirx.For):
            path.append((node.loop_var, node.extent))
            visitor.default_visit(node)
            path.pop()
            return None
        return visitor.default_visit(node)

    path: list = []
    tvm_ffi.structural_visit(body, [(object, visit)])
    return found[0] if found else (None, [])


def _uses(expr, var) -> bool:
    hits = []
    tvm_ffi.structural_visit(expr, [(tirx.Var, lambda v, _: hits.append(v.same_as(var)))])
    return any(hits)


def _substitute(expr, values: dict):
    return tvm_ffi.structural_map(expr, [(tirx.Var, lambda v: next((c for var, c in values.items()
                                                                    if var.same_as(v)), v))])


@tirx.transform.prim_func_pass(opt_level=0, name="TrimRowLoops")
class TrimRowLoops:
    """trim_row_loops on every sparse conv PrimFunc that stores its row lengths (an unscheduled one has no
    conv update block yet, so it stays as it is)."""

    def transform_function(self, func: tirx.PrimFunc, _mod, _ctx) -> tirx.PrimFunc:
        return trim_row_loops(func) if names.op_of(func) in TRIMMED and names.ROW_LENGTHS in func.attrs else func

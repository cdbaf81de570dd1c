"""QuantizeInt8Dense: linear layers (matmul with a constant weight, + bias, + ReLU) whose input has a
calibrated range -> the int8 sparse linear operator (int8_ops.sparse_dense_int8), llvm only (there is
no CUDA rule for it: on cuda these layers stay fp32). As QuantizeInt8Conv2d, before SparsifyDense."""

from __future__ import annotations

import dataclasses
from functools import partial

import numpy as np
import tvm
from tvm import relax
from tvm.ir import IRModule

from unsparse_tvm.ops import names
from unsparse_tvm.ops import sparse_dense_int8_lanes as lanes_ops
from unsparse_tvm.ops import sparse_int8 as int8_ops
from unsparse_tvm.ops.int8_formats import ActQuant, dense_quad_rows, epilogue_consts, quantize_weight

from . import quantize_int8
from ._dense_match import DenseChainRewriter
from ._util import fused_label, mark, shape_of
from ._gathered_int8 import MAX_FILL, quad_fill
from .layers import LayerNames
from .quantize_int8 import FORMAT, Int8LayerPass, int8_decision

OP = names.SPARSE_DENSE_INT8
# llvm: output features in vector lanes (lanes_ops), not the TE operator's scalar schedule: resnet50's fc at 95%
# channel4 0.051-0.054 -> 0.015 ms, vgg16-cifar's 512x512 at 90% 0.013-0.015 -> 0.004-0.008 (one thread, in the model)
LANES = True


@relax.expr_functor.mutator
class _Int8DenseRewriter(DenseChainRewriter):
    saturating = False  # Int8LayerPass sets it (ActQuant.saturating)
    packs = False  # and this (ActQuant.packs)

    def __init__(self, mod: IRModule, ranges: dict, names: LayerNames, report: list, qmax: int):
        super().__init__(mod)
        self.ranges, self.names, self.report, self.qmax = ranges, names, report, qmax

    def takes(self, weight: np.ndarray) -> bool:
        name = self.names.known(weight)
        if weight.dtype.name != "float32" or name not in self.ranges:
            return False
        # the TE operator's scalar code (LANES off) multiplies a stored quad's 4 bytes at a time, so on scattered
        # nonzeros it lost to an fp32 FMA per nonzero (vgg16-cifar unstructured 90%, 512x512: 0.035 against 0.020
        # ms); rows in lanes beat fp32 at any fill (0.010 against 0.017-0.018 ms, AVX-512 and AVX2 code alike)
        if not LANES and quantize_int8.SCATTERED_FP32 and (fill := quad_fill(weight)) < MAX_FILL:
            self.names.fp32_int8[name] = round(fill, 3)
            return False
        return True

    def rewrite(self, call, weight, ep) -> relax.Expr | None:
        name = self.names.known(weight)
        act = ActQuant.from_range(*self.ranges[name], self.qmax, self.saturating, self.packs)
        wq, wscale = quantize_weight(weight)
        rows = dense_quad_rows(wq)
        comp, out_scale = epilogue_consts(wq, wscale, act)
        x = self.visit_expr(call.args[0])
        if LANES and self.kind == "llvm":
            new, rows = self.rows_in_lanes(x, rows, act, comp, out_scale, ep)  # the rows as stored, for the report
        else:
            args = [x] + [relax.const(a) for a in (rows.data, rows.off, comp, out_scale)]
            if ep.bias is not None:
                args.append(relax.const(ep.bias))
            op = partial(int8_ops.sparse_dense_int8, act=act, quads=rows.pad_quads, has_bias=ep.bias is not None,
                         relu=ep.relu)  # call_te only passes TE-able kwargs
            new = self.builder_.call_te(op, *args, primfunc_name_hint=OP)
        mark(self.builder_, new, {"op": OP, "unsparse.fmt": FORMAT})
        self.report.append(int8_decision(name, "dense", weight, rows, list(shape_of(call.args[0])), fused_label(ep),
                                         (comp, out_scale)))
        return new

    def rows_in_lanes(self, x, rows, act, comp, out_scale, ep) -> tuple:
        """The layer as lanes_ops.sparse_dense_int8_lanes: output features in vector lanes (AVX-512: 16 a
        vpdpbusd, or vpmaddubsw + vpmaddwd in 16; AVX2: 8). Returns (the call, rows with the data and offsets it
        stores)."""
        (batch, fin), fout = (int(d) for d in shape_of(x)), int(rows.data.shape[0])
        lanes = 8 if self.lanes < 16 else 16
        packed = lanes_ops.lane_rows(rows, lanes)
        bias = ep.bias if ep.bias is not None else np.zeros(fout, np.float32)
        kernel = lanes_ops.sparse_dense_int8_lanes(batch, fin, fout, rows.pad_quads, packed, act,
                                                   "pmadd" if self.pmadd else "vnni", ep.relu)
        consts = [packed.data, packed.off, packed.start,
                  *(lanes_ops.padded(a, packed) for a in (comp, out_scale, bias.astype(np.float32))),
                  lanes_ops.row_order(packed)]
        call = relax.call_tir(self.builder_.add_func(kernel, OP), [x, *map(relax.const, consts)],
                              relax.TensorType([batch, fout], "float32"))
        return call, dataclasses.replace(rows, data=packed.data, off=packed.off)


@tvm.transform.module_pass(opt_level=0, name="QuantizeInt8Dense")
class QuantizeInt8Dense(Int8LayerPass):
    """Replace calibrated linear layers by the int8 sparse linear operator (llvm)."""

    rewriter = _Int8DenseRewriter

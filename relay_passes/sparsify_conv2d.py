"""SparsifyConv2d: conv2d with a constant weight -> TE sparse direct conv2d, where its predicted time
beats the dense kernel's (unsparse_tvm.cost.model), or where sparsity >= threshold if one is given.

The bias add, a residual add and the ReLU that follow the conv are fused into the same kernel.
Depthwise convs go sparse on llvm as block-diagonal rows (a channel's nonzero taps, offsets into its own
plane: ops.formats.depthwise_weight_rows), priced against the dense depthwise kernel, those with quantised
weights on the fp32 kernel over their values (there is no weight-quantised depthwise kernel); other grouped convs,
and depthwise ones on cuda, stay dense, as do non-float32 convs. Every conv gets a LayerDecision.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import numpy as np
import tvm
from tvm import relax
from tvm.ir import IRModule

from unsparse_tvm.ops import sparse as sparse_ops
from unsparse_tvm.ops.formats import (HYB_MIN_SAVING, conv_weight_rows, depthwise_weight_rows, inverse_order,
                                      length_order, stored_lengths)
from unsparse_tvm.ops.names import PHASE_PLANES, ROW_LENGTHS, STRIDE, sparse_op
from unsparse_tvm.ops.phase_planes import phase_planes, phase_rows, phase_split
from unsparse_tvm.ops.names import ROW_ORDER as ROW_ORDER_ATTR
from unsparse_tvm.cost.model import CostModel, unfused_epilogue_us
from unsparse_tvm.schedules.sparse_conv2d_cpu import interleave_tile

from ._expand_planes import PLANES_MIN_POSITIONS, expandable, planes_expand, planes_pay
from ._conv_match import (ConvChainRewriter, channel_gate, channel_gather, strided_pointwise, subsampled,
                          unsupported_reason)
from ._quant import layer_entry, quant_conv, record_bytes
from ._util import SparsifyPass, choose_sparse, mark, record_sparse, rows_consts, shape_of
from .layers import LayerDecision, LayerNames


INTERLEAVE = True  # llvm ell/hyb rows stored by register tiles (formats.interleave_rows); tests turn it off
ROW_ORDER = True  # llvm interleaved ell/hyb rows stored sorted by length where that saves (formats.length_order)
# ...on maps of at most this many positions: sorted rows are read back by an index, so the epilogue no longer
# joins the write-back, a pass over the output that a large map pays for (vgg16-cifar's first conv, 64 rows of
# 2.7 entries on 32x32: 0.018 -> 0.022 ms; its 4x4 layers, tiles of 16: 0.174 -> 0.163)
ROW_ORDER_MAX_POSITIONS = 16


def sorted_rows(data: np.ndarray, tile: int, positions: int) -> np.ndarray | None:
    """The order to store a layer's rows in (formats.length_order: by stored length, for register tiles of
    `tile` rows), where ROW_ORDER allows it on a map of `positions` outputs; None: rows stay in order. The
    fp32 pass asks for ell and hyb's main rows, QuantizeInt8 for int8 quad rows."""
    if not ROW_ORDER or tile <= 1 or positions > ROW_ORDER_MAX_POSITIONS:
        return None
    return length_order(stored_lengths(data), tile)


@relax.expr_functor.mutator
class _Sparsifier(ConvChainRewriter):
    def __init__(self, mod: IRModule, threshold: float | None, names: LayerNames, report: list, fmt: str | None,
                 cost: CostModel):
        super().__init__(mod)
        self.threshold, self.names, self.report, self.fmt = threshold, names, report, fmt
        self.cost, self.target_kind = cost, cost.kind
        self.quant = None
        self.expands: dict = {}  # chain end -> (conv, weight, geo, epilogue, decision) of a sparse fp32 1x1 conv

    def rewrite(self, conv, weight, geo, ep):
        sparsity = float((weight == 0).sum()) / weight.size
        name = self.names.name_of(weight, "conv")
        decision = LayerDecision(name, "conv2d", list(weight.shape), round(sparsity, 4), "dense",
                                 nnz=int((weight != 0).sum()), input_shape=[geo.n, geo.c, geo.h, geo.w] if geo else [])
        self.report.append(decision)
        entry = layer_entry(self.quant, name, self.names.left_fp32())
        if entry is not None and self.target_kind == "llvm" and int(conv.attrs.groups) > 1:
            # quantised depthwise weights: their values on the sparse fp32 kernel, where they ran dense
            # (mobilenet_v2@224 90% int8 weights: 2.64 -> 2.41 ms; with int8 activations 2.78 -> 2.48)
            entry = None
        reason = unsupported_reason(conv, weight, depthwise=self.target_kind == "llvm" and entry is None)
        depthwise = reason is None and int(conv.attrs.groups) > 1
        record_bytes(decision, None, None, weight)
        if reason is not None or geo is None:
            return decision.keep_dense(reason or "unsupported conv2d")
        pointwise, run, gather = self.kernel_input(conv, geo, depthwise)
        channels = gather[1] if gather is not None else None
        split, ours, dense_geo, pack = self.kernel_plan(run, geo, weight, depthwise, entry is not None, channels)
        rows = choose_sparse(decision, sparsity, self.threshold, pack,
                             lambda rows: self.cost.conv(row_lane_geometry(ours, rows, self.cost), rows,
                                                         depthwise=depthwise, dense_geo=dense_geo))
        if rows is None:
            return None
        extra, flags = self.epilogue_args(ep)
        # x * g feeding a 1x1 conv (squeeze-excitation): the rows scale their weights by g instead (llvm, fp32)
        gate = channel_gate(conv.args[0], geo, self.var2val, self.counts, self.plans) \
            if self.target_kind == "llvm" and entry is None and rows.fmt in ("ell", "hyb") else None
        x = self.visit_expr(gather[0] if gather is not None else conv.args[0] if gate is None else gate[0])
        x = x if pointwise is None else subsampled(self.builder_, x, geo, self.target_kind == "llvm")
        if split is not None:  # the planes it reads: written by the conv before it, or copied from its input
            planes = self.expand_planes(conv, gather, split)
            x = planes if planes is not None else self.phase_input(x, split)
        quantised = quant_conv(self.builder_, x, rows, weight, run, entry, extra, flags, self.target_kind)
        if quantised is not None:
            return self.finish_quantised(quantised, rows, weight, decision, ep)
        lane_geo = row_lane_geometry(ours, rows, self.cost)
        if lane_geo is not ours:  # its offsets count in patches: packed again
            ours, rows = lane_geo, pack_conv_rows(weight, lane_geo, rows.fmt, self.cost)
        if ours.input_is_flat:  # a view, where the pad stage would copy it (on cuda: one kernel fewer)
            x = self.builder_.emit(relax.op.reshape(x, [ours.n, ours.c * ours.h * ours.w]))
        if ours.overlap and flags["has_residual"]:  # the overlapped epilogue is flat (ops.sparse.output_shape)
            extra[-1] = self.builder_.emit(relax.op.reshape(extra[-1], sparse_ops.output_shape(ours)))
        if gate is not None:  # the last operand (ops.sparse.sparse_conv2d)
            extra.append(self.visit_expr(gate[1]))
            flags.update(has_gate=True, gate_sigmoid=gate[2])
        call = self.emit_rows(x, rows, ours, extra, flags)
        record_sparse(decision, rows, ep)
        if gate is not None:
            decision.fused = "+".join(filter(None, ["gate", decision.fused]))
        record_bytes(decision, rows, None, weight)
        if gate is None and self.target_kind == "llvm" and rows.fmt in ("ell", "hyb") and expandable(geo, ep):
            self.expands[ep.last] = (conv, weight, geo, ep, decision)  # its planes may be all a depthwise reads
        if ours.overlap:
            return self.builder_.emit(relax.op.reshape(call, [ours.n, ours.k, ours.oh, ours.ow]))
        return call

    def emit_rows(self, x, rows, ours, extra: list, flags: dict, bounds: np.ndarray | None = None) -> relax.Expr:
        """The sparse conv's call on input x (rows packed for `ours`), marked for the schedules; `bounds`: each
        output channel's rows and columns inside the map (ops.sparse.epilogue_stage), 0 elsewhere."""
        tile = self.interleave(ours, rows)
        order = sorted_rows(rows.data, tile, ours.oh * ours.ow)  # ell, hyb's main rows
        args = [x, *rows_consts(rows, lengths=self.target_kind == "llvm", interleave=tile, order=order)]
        if order is not None:  # the epilogue reads output channel k from stored row row_of[k]
            extra.append(relax.const(inverse_order(order)))
            flags["has_row_order"] = True
        if bounds is not None:  # the last operand
            extra.append(relax.const(bounds))
            flags["has_bounds"] = True
        op = partial(sparse_ops.sparse_conv2d, geo=ours, fmt=rows.fmt, **flags)  # call_te only passes TE-able kwargs
        kind = sparse_op("conv2d", rows)  # grouped rows: their own rules
        call = self.builder_.call_te(op, *args, *extra, primfunc_name_hint=kind)
        mark(self.builder_, call, {"op": kind, "unsparse.fmt": rows.fmt, "unsparse.pad_shape": ours.pad_shape,
                                   **self.kernel_attrs(ours, tile, order is not None)})
        return call

    def kernel_input(self, conv, geo, depthwise: bool) -> tuple:
        """(the strided 1x1's stride-1 geometry or None, the conv as the kernel runs it, the channel gather it
        reads through or None): on llvm a strided 1x1 runs on its input subsampled first (the fallback schedules
        the slice), and a depthwise conv on a channel gather (DropDeadChannels) reads the gathered channels in
        place, its rows' offsets remapped."""
        pointwise = strided_pointwise(geo) if self.target_kind == "llvm" else None
        run = pointwise or geo
        gather = channel_gather(conv.args[0], self.var2val, self.counts) if depthwise else None
        if gather is not None:
            run = dataclasses.replace(run, c=shape_of(gather[0])[1])
        return pointwise, run, gather

    def finish_quantised(self, quantised, rows, weight, decision, ep) -> relax.Expr:
        """The weight-quantised kernel's call (relay_passes/_quant.quant_conv), marked and reported."""
        call, q, qgeo = quantised
        mark(self.builder_, call, {"op": sparse_op("conv2d", rows), "unsparse.fmt": rows.fmt,
                                   "unsparse.pad_shape": qgeo.pad_shape})
        record_sparse(decision, rows, ep)
        record_bytes(decision, rows, q, weight)
        return call

    def kernel_plan(self, run, geo, weight, depthwise: bool, quantised: bool, channels) -> tuple:
        """(the phase split of a strided depthwise conv or None, the conv as the kernel runs it, as the dense
        kernel's price sees it, the packer of its rows): a strided depthwise conv whose nonzeros read few of
        its phase planes runs on those alone (ops.phase_planes), a stride-1 conv over them."""
        ours = self.flat_domain(run, quantised, depthwise)
        split = phase_split(weight, run, channels) if depthwise and self.target_kind == "llvm" else None
        if split is None:
            return None, ours, ours if depthwise else geo, lambda: self.pack(weight, ours, depthwise, channels)
        phased = self.flat_domain(split.geometry(), False, True)
        split = split.with_planes(phased.pad_channels)  # zero planes where the flat domain reads past the last
        return split, phased, ours, lambda: phase_rows(weight, split, phased, channels)

    def expand_planes(self, conv, gather, split) -> relax.Expr | None:
        """Where the split depthwise conv's input is a sparse 1x1 conv's output that nothing else reads, its
        phase planes, [N, P*Hq*Wq], computed by that conv on its own input's phase planes (_expand_planes.py):
        the conv as rewritten before is left unused. None otherwise."""
        src = gather[0] if gather is not None else conv.args[0]
        made = self.expands.get(src) if self.counts.get(src, 0) == 1 else None
        if made is None:
            return None
        expand, weight, geo, ep, decision = made
        plan = planes_expand(weight, ep.bias, geo, split) if geo.h * geo.w >= PLANES_MIN_POSITIONS else None
        if plan is None:
            return None
        rows = pack_conv_rows(plan.weight, plan.geo, self.fmt, self.cost)
        fused_us, unfused_us = planes_pay(plan, rows, decision.sparse_us, self.cost)
        if fused_us >= unfused_us:
            return None
        x = self.phase_input(self.visit_expr(expand.args[0]), plan.inputs)
        extra, flags = self.epilogue_args(dataclasses.replace(ep, bias=plan.bias))
        call = self.builder_.emit(self.emit_rows(x, rows, plan.geo, extra, flags, plan.bounds))
        record_sparse(decision, rows, ep)
        decision.fused = "+".join(filter(None, [decision.fused, "planes"]))
        record_bytes(decision, rows, None, weight)
        return self.builder_.emit(relax.op.reshape(call, [plan.geo.n, plan.geo.k * plan.geo.oh * plan.geo.ow]))

    def phase_input(self, x, split) -> relax.Expr:
        """The used phase planes of x, flat [N, P*Hq*Wq] (ops.phase_planes), an operator of its own."""
        call = self.builder_.call_te(partial(phase_planes, geo=split.source), x, relax.const(split.planes),
                                     primfunc_name_hint=PHASE_PLANES)
        shape = [len(split.planes), split.source.hq, split.source.wq]  # what schedules/phase_planes_cpu splits
        mark(self.builder_, call, {"op": PHASE_PLANES, "unsparse.planes": shape})
        return self.builder_.emit(call)

    def flat_domain(self, run, plane: bool, depthwise: bool = False):
        """The fp32 kernel's flat domain (llvm: whole vectors over a 14x14 or 7x7 map, see with_overlap, its input
        copied at a channel pitch of whole vectors where H*W would split most loads, see with_aligned_channels; a
        strided conv's phase rows at a pitch of whole vectors, see with_aligned_rows; the
        output map itself where its rows are whole vectors, or half of one (8x8 under AVX-512; for depthwise
        rows any row of whole 4-lane vectors), see with_row_domain; a 4x4 map's input as patches, see
        with_patches). `plane` (quantised weights) and `depthwise` keep the padded plane at whole vectors: a
        depthwise conv reads each input position for one row only, so a copy would not pay; quantised rows
        encode offsets into the plane (ops.quant_formats)."""
        return kernel_geometry(run, self.cost, plane, depthwise)

    def kernel_attrs(self, ours, tile: int, row_order: bool) -> dict:
        """The PrimFunc attributes the schedules read: the flat domain (their vectors divide it, see
        schedules/_common.domain_lanes); on llvm the row lengths (schedules/row_extents), a strided pad stage's
        phase planes, the rows' storage tile and order."""
        attrs = ({"unsparse.overlap": ours.overlap} if ours.overlap else {"unsparse.row_domain": ours.ow}
                 if ours.row_domain else {"unsparse.patches": ours.images} if ours.patches else {})
        if ours.row_lanes:
            attrs["unsparse.row_lanes"] = ours.row_lanes
        if self.target_kind == "llvm":
            attrs.update({ROW_LENGTHS: 1}, **({STRIDE: list(ours.stride)} if ours.stride != (1, 1) else {}))
        if tile:
            attrs["unsparse.interleave"] = tile
        if row_order:
            attrs[ROW_ORDER_ATTR] = 1
        return attrs

    def interleave(self, geo, rows) -> int:
        """llvm, ell and hyb rows: the register tile's rows (schedules.sparse_conv2d_cpu.interleave_tile), by
        which their entries are stored side by side; else 0 (row after row)."""
        if self.target_kind != "llvm" or rows.fmt not in ("ell", "hyb") or not INTERLEAVE:
            return 0
        tile = interleave_tile(geo.k, geo.q_extent, self.cost.lanes, geo.overlap, geo.ow if geo.row_domain else 0)
        return tile if tile > 1 else 0  # one row at a time: the rows are already in that order

    def pack(self, weight, geo, depthwise: bool = False, channels=None):
        if depthwise:
            return depthwise_weight_rows(weight, geo, channels)
        return pack_conv_rows(weight, geo, self.fmt, self.cost)


def kernel_geometry(run, cost: CostModel, plane: bool = False, depthwise: bool = False):
    """The conv `run` as the fp32 sparse kernel runs it on cost's target (see _Sparsifier.flat_domain)."""
    if cost.kind != "llvm":
        return run
    run = strided_pointwise(run) or run  # a strided 1x1 runs at stride 1 on the subsampled input (llvm)
    # depthwise rows: a row domain wherever the output rows are whole 4-lane vectors (56 wide under AVX-512: 8
    # lanes; 28 wide: 4), where the pass over sums written and read back would cost more than the narrow FMAs: a
    # depthwise row has one to three of them per position. efficientnet_b0 at 90%, one thread, Xeon: its 144 x
    # 56x56 3x3 0.340 -> 0.225 ms, 5.53 -> 5.38 ms in all; on AVX2 code its 240 x 28x28 5x5 0.228 -> 0.193, 6.04 ->
    # 6.00 ms (AVX-512, 4 lanes: level)
    row_lanes = 4 if depthwise else cost.lanes
    ours = run.with_overlap(cost.lanes).with_row_domain(row_lanes, narrow=not (plane or depthwise))
    if plane or depthwise:
        return ours
    ours = ours.with_patches(cost.lanes, fold_images=True, whole=4)
    return ours.with_aligned_channels(cost.lanes).with_aligned_rows(cost.lanes)


def row_lane_geometry(geo, rows, cost: CostModel):
    """llvm, grouped rows (vellV) on a map smaller than a vector: the conv with row lanes
    (ConvGeometry.with_row_lanes), whose rows must be packed for it; else geo itself."""
    if cost.kind != "llvm" or not rows.fmt.startswith("vell"):
        return geo
    return geo.with_row_lanes(cost.lanes, int(rows.data.shape[2]))


def pack_conv_rows(weight, geo, fmt: str | None, cost: CostModel):
    """A conv layer's sparse rows as the pass packs them: the format asked for, else the one choose_format
    picks by padding, or on llvm ell instead of hyb where ell's fused epilogue (ConvGeometry.flat_output)
    predicts faster, hyb charged its unfused epilogue's passes past L2 (cost.model.unfused_epilogue_us).
    (Also what the speed-target pruner costs a candidate sparsity with.)"""
    rows = conv_weight_rows(weight, geo, fmt, HYB_MIN_SAVING[cost.kind])
    if fmt is None and cost.kind == "llvm" and rows.fmt == "hyb" and geo.flat_output:
        ell = conv_weight_rows(weight, geo, "ell")
        if cost.conv(geo, ell).sparse_us < cost.conv(geo, rows).sparse_us + unfused_epilogue_us(geo, cost.rates):
            return ell
    return rows


@tvm.transform.module_pass(opt_level=0, name="SparsifyConv2d")
class SparsifyConv2d(SparsifyPass):
    """Replace sufficiently sparse conv2d (+ bias/residual/ReLU) by TE sparse direct convolutions."""

    mutator = staticmethod(_Sparsifier)

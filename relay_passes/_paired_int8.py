"""QuantizeInt8Conv2d's paired layers (llvm): a pointwise int8 conv whose residual is the output of another
pointwise int8 conv over the same output domain, read by nothing else (resnet's conv3 and downsample in the first
block of each stage), becomes one kernel (ops.sparse_int8.sparse_conv2d_int8_pair). The residual conv wrote its
fp32 map (3.2 MB at 56x56) and the other read it back; now both sums meet in registers and cache.
"""

from __future__ import annotations

import numpy as np
from tvm import relax

from unsparse_tvm.ops import names
from unsparse_tvm.ops import quad_relay as relay_ops
from unsparse_tvm.ops import sparse_int8 as int8_ops
from unsparse_tvm.ops.formats import compact_offsets, interleave_rows, offsets_with_lengths
from unsparse_tvm.ops.int8_formats import conv_quad_rows, epilogue_consts, quantize_weight
from unsparse_tvm.schedules.sparse_conv2d_int8_cpu import interleave_tile, map_parts

from . import _quad_inputs
from ._conv_match import conv_geometry
from ._util import const_array, dtype_of, mark, shape_of

PAIRED = True  # tests turn it off to compare
PAIR_ATTR = "unsparse.pair"  # the PrimFunc's mark (schedules/sparse_conv2d_int8_cpu)


def plan(rw) -> dict:
    """{consumer chain's last var: the residual conv's chain's last var} for every pair the rewriter `rw` can fuse:
    both convs taken int8 as quads (not gathered), pointwise on flat output domains of one shape, the residual
    conv's chain a bias at most and its output read by the add alone, the consumer's output not wide."""
    out = {}
    for last, (conv, ep) in rw.plans.items():
        res = ep.residual
        if not isinstance(res, relax.Var) or res not in rw.plans or rw.counts.get(res, 0) != 1 or last in rw.wide:
            continue
        pconv, pep = rw.plans[res]
        if pep.residual is not None or pep.relu or pep.silu or res in rw.out_act:
            continue
        runs = [_run(rw, c) for c in (pconv, conv)]
        if None in runs or runs[0].q_extent != runs[1].q_extent or (runs[0].oh, runs[0].ow, runs[0].n) != \
                (runs[1].oh, runs[1].ow, runs[1].n):
            continue
        out[last] = res
    return out


def _run(rw, conv):
    """The kernel geometry of a conv the pair can take (int8 quads, pointwise at stride 1 as run, its output the flat
    domain itself), else None."""
    weight = const_array(conv.args[1])
    geo = conv_geometry(conv, weight)
    if geo is None or rw.act_of(conv, weight, geo) is None or rw.gathered_geometry(weight, geo) is not None:
        return None
    run, _ = rw.kernel_geometry(geo)
    pointwise = (run.r, run.s) == (1, 1) and tuple(run.stride) == (1, 1) and not any(run.padding)
    # a flat output only: on 14x14 (q_extent 224 for 196 outputs) the epilogue after each step ran the pair slower
    # than the two kernels (resnet50 95% layer3.0, its downsample's input subsampled first: 0.323 -> 0.438 ms)
    plain = not (run.row_domain or run.patches or run.overlap or run.align)
    return run if pointwise and run.flat_output and plain else None


def emit(rw, conv, weight: np.ndarray, geo, ep, act, out_act):
    """The pair's kernel (conv: the consumer, its residual the other conv's chain), or None where either input does
    not arrive as relayed quads (the caller then emits the two as before): (call, (the residual conv's name,
    weight, geometry, QuadRows, consts), (this conv's QuadRows, consts)) for the report."""
    pconv, pep = rw.plans[ep.residual]
    pweight = const_array(pconv.args[1])
    pgeo = conv_geometry(pconv, pweight)
    pname, pact = rw.act_of(pconv, pweight, pgeo)
    halves = []
    for c, w, g, a in ((pconv, pweight, pgeo, pact), (conv, weight, geo, act)):
        run, sub = rw.kernel_geometry(g)
        wq, wscale = quantize_weight(w)
        rows = conv_quad_rows(wq, run)
        x = rw.visit_expr(c.args[0])
        if dtype_of(x) != "uint8" or not _quad_inputs.relays(run, g, shape_of(x), sub):
            return None
        halves.append((run, sub, rows, x, epilogue_consts(wq, wscale, a), a, rw.wide.get(c.args[0], 0)))
    (run, psub, prows, px, pconsts, _, ppitch), (_, sub, rows, x, consts, _, pitch) = halves
    # both inputs relayed into one buffer, the residual conv's quads first: the second relay writes in place
    total = prows.pad_quads + rows.pad_quads
    shape = relax.TensorType([geo.n, total * run.channel_plane, 4], "uint8")
    parts = map_parts(run.q_extent, rw.lanes)  # the planes split as the pair's kernel splits its map
    first = relay_ops.quad_relay(tuple(shape_of(px)), run, prows.pad_quads, pact.zero_point, psub, ppitch, (0, total),
                                 parts)
    second = relay_ops.quad_relay(tuple(shape_of(x)), run, rows.pad_quads, act.zero_point, sub, pitch,
                                  (prows.pad_quads, total), parts)
    joined = rw.builder_.emit(relax.call_tir(rw.builder_.add_func(first, "quad_relay"), [px], shape))
    joined = rw.builder_.emit(relax.call_tir_inplace(rw.builder_.add_func(second, "quad_relay"), [x, joined], [1],
                                                     shape))
    k = geo.k
    width = max(prows.data.shape[1], rows.data.shape[1])
    data = np.zeros((2 * k, width, 4), np.int8)
    off = np.zeros((2 * k, width), np.int32)
    data[0::2, : prows.data.shape[1]], off[0::2, : prows.off.shape[1]] = prows.data, prows.off
    # the consumer's quads follow the residual conv's in the joined input
    moved = rows.off + prows.pad_quads * run.channel_plane
    data[1::2, : rows.data.shape[1]], off[1::2, : rows.off.shape[1]] = rows.data, moved
    off = compact_offsets(offsets_with_lengths(data, off))
    comp = np.stack([pconsts[0], consts[0]], axis=1).reshape(-1)         # [2K] by stored row
    out_scale = np.stack([pconsts[1], consts[1]], axis=1).reshape(-1)
    tile = interleave_tile(2 * k, run.q_extent, rw.lanes)
    if tile > 1:
        data, off = interleave_rows(data, tile), interleave_rows(off, tile)
    zeros = np.zeros(k, np.float32)  # a conv without a bias adds 0.0 (the same bytes out of the requantisation)
    biases = [ep.bias if ep.bias is not None else zeros, pep.bias if pep.bias is not None else zeros]
    call = rw.builder_.call_te(
        lambda *a: int8_ops.sparse_conv2d_int8_pair(*a, geo=run, relu=ep.relu, out_act=out_act,
                                                    comp_zero=(pact.zero_point == 0, act.zero_point == 0)),
        joined, *[relax.const(a) for a in (data, off, comp, out_scale, *biases)],
        primfunc_name_hint=names.SPARSE_CONV2D_INT8)
    pad_shape = [total, *run.pad_shape[1:]]
    mark(rw.builder_, call, {"op": names.SPARSE_CONV2D_INT8, "unsparse.fmt": "int8q4", "unsparse.pad_shape": pad_shape,
                             PAIR_ATTR: 1, names.ROW_LENGTHS: 1,
                             **({"unsparse.interleave": tile} if tile > 1 else {})})
    return call, (pname, pweight, pgeo, prows, pconsts), (rows, consts)


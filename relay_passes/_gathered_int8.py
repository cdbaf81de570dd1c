"""QuantizeInt8Conv2d's gathered-quads layers (ops.sparse_int8_gathered, design.md item 38): which layers take them
and the kernels a layer becomes.

The quads hold 4 adjacent input channels of one tap, so on unstructured masks a stored quad carries ~1.15 nonzeros;
gathered quads take any 4 nonzeros of a row per vpdpbusd. A layer becomes two kernels (its input into uint8 patches
or padded planes; the gathered conv with the epilogue in its write-back) or, on the padded planes, whose domain
carries thrown-away columns, three (the epilogue after it, as sparse_int8.int8_epilogue).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from tvm import relax

from unsparse_tvm.ops import sparse_int8 as int8_ops
from unsparse_tvm.ops import gathered_inputs
from unsparse_tvm.ops import sparse_int8_gathered as gathered_ops
from unsparse_tvm.ops.formats import choose_group
from unsparse_tvm.ops.int8_formats import QUAD, ActQuant, epilogue_consts, quantize_weight

from ._conv_match import channel_gate
from ._util import dtype_of, mark, shape_of

# Gathered quads where the stored quads hold fewer nonzeros than this on average: per group of 4 nonzeros and 16
# positions the kernel costs about twice a stored quad's dot product (its 4 loads and the interleave), so it pays
# where a quad holds under 2 (unstructured 90%: 1.16; channel4 pruning: 4).
MAX_FILL = 2.0
# On the padded planes, 3x3s on maps of at least 7x7 (vgg16-cifar's 32x32 layer 0.145 -> 0.087 ms, 16x16 0.126 ->
# 0.102; resnet50 unstructured's 7x7s 0.49-0.51 -> 0.30-0.31, its 14x14s 0.36 -> 0.35); 2x2, 4x4 and 8x8 maps as
# patches (an 8x8 on its padded planes was level with the quads' 8-lane rows, 0.115 -> 0.121 ms; as patches 0.113
# -> 0.091)
MIN_POSITIONS = 49
# 1x1s (stride 1) where the gathered kernel's gain covers the input stage and the epilogue pass it adds (the quads
# write theirs in the write-back): maps up to 28x28 that reduce channels by 2 or more, and maps under 8x8
# (resnet50 unstructured 90%, with pad and epilogue, ms: 1024 -> 256 on 14x14 0.237 -> 0.173, 1024 -> 512 on 14x14
# 0.446 -> 0.328, 512 -> 128 on 28x28 0.180 -> 0.160, 512 -> 2048 on 7x7 0.288 -> 0.227; not 256 -> 1024 on 14x14,
# 0.233 -> 0.282, nor any on 56x56: 64 -> 256 0.297 -> 0.408, 256 -> 128 0.323 -> 0.336). On AVX2 (8 lanes, where
# fp32 runs 8 lanes too and int8 would otherwise stay fp32) every stride-1 1x1 on 7x7 or more
MAX_POINTWISE_POSITIONS = 784
GATE = True  # a squeeze-excitation's gate applied in the 1x1's pad stage (emit); tests turn it off to compare
# AVX2: rows whose nonzeros share columns by groups (vector, block masks: formats.choose_group) run gathered with one
# interleave per tile of such rows (GatheredRows.shared); off, they stay fp32 (per-row interleaves lost: 0.90x)
SHARED_ROWS = True
# a stride-1 1x1's rows written as its output map, a residual added in the write-back (gathered_writes.row_store):
# off, they are written over the domain and cropped after, and a residual add is an epilogue pass over int32 sums
MAP_ROWS = True


def quad_fill(weight: np.ndarray) -> float:
    """Nonzeros per stored int8 quad (4 adjacent input channels of one tap): 4 for channel4 pruning, ~1.15 for
    unstructured 90% (inf for an all-zero weight: nothing to store, nothing to gain)."""
    k, c = weight.shape[:2]
    padded = np.zeros((k, -(-c // QUAD) * QUAD, *weight.shape[2:]), bool)
    padded[:, :c] = weight != 0
    quads = padded.reshape(k, -1, QUAD, *weight.shape[2:]).any(axis=2).sum()
    return float(padded.sum()) / quads if quads else float("inf")


def geometry(weight: np.ndarray, geo, lanes: int = gathered_ops.LANES):
    """The geometry a gathered kernel runs a conv at in vectors of `lanes` (the padded planes, or a 2x2, 4x4 or 8x8
    map's patches), or None where the layer keeps its quads: a strided conv, a 1x1 other than
    MAX_POINTWISE_POSITIONS says, a map under 7x7 other than 2x2 and 4x4, quads that hold MAX_FILL or more
    nonzeros, or (8 lanes, AVX2) rows the fp32 passes store grouped."""
    if tuple(geo.stride) not in ((1, 1), (2, 2)) or quad_fill(weight) >= MAX_FILL:
        return None
    if lanes != gathered_ops.LANES and not SHARED_ROWS and choose_group(weight.reshape(geo.k, -1)) > 1:
        return None  # AVX2: grouped rows with an interleave per row ran slower than fp32 (vgg16-cifar vector-4 0.904x)
    positions = geo.oh * geo.ow
    if tuple(geo.stride) == (2, 2):  # on phase planes (gathered_inputs.pad_phase_planes): resnet's stem and 3x3s
        return geo if geo.r * geo.s > 1 and positions >= MIN_POSITIONS and not (geo.align or geo.pitch) else None
    if positions == gathered_ops.TINY and geo.k % (2 * gathered_ops.TINY):
        return None  # a 2x2 map's tiles of 4 rows run in pairs
    if positions in (gathered_ops.TINY, gathered_ops.LANES, 64):  # 2x2, 4x4 and 8x8 maps as patches
        run = dataclasses.replace(geo, patches=True, images=1)
        return run if geo.r * geo.s > 1 and gathered_inputs.patches_fit(run) else None
    if geo.r * geo.s == 1:  # (not below 7x7: a squeeze-excitation's 1x1s on a 1x1 map stay quads)
        reduces = geo.c >= 2 * geo.k and positions <= MAX_POINTWISE_POSITIONS
        if lanes != gathered_ops.LANES:  # AVX2: every one (resnet50 unstructured 90% int8, 1.041x [1.035-1.113])
            return geo if positions >= MIN_POSITIONS else None
        return geo if positions >= MIN_POSITIONS and (reduces or positions < 64) else None
    return geo if positions >= MIN_POSITIONS else None


def shared_group(weight: np.ndarray, geo, lanes: int) -> int:
    """The rows by which a gathered layer's tiles share their columns (the group V of formats.choose_group: vector
    and block masks), 0 where each row keeps its own: AVX2 (8 lanes) with SHARED_ROWS; AVX-512 VNNI unchanged."""
    if lanes == gathered_ops.LANES or not SHARED_ROWS:
        return 0
    group = choose_group(weight.reshape(geo.k, -1))
    return group if group > 1 else 0


def emit(rw, conv, weight: np.ndarray, geo, run, ep, act: ActQuant, out_act: ActQuant | None,
         res_act: ActQuant | None):
    """The layer's kernels, emitted through the rewriter `rw`: (the output, its GatheredRows, (comp, out_scale))."""
    wq, wscale = quantize_weight(weight)
    comp, out_scale = epilogue_consts(wq, wscale, act)
    extra, flags = rw.epilogue_args(ep)
    group = shared_group(weight, geo, rw.gather)
    shape = gathered_ops.plan(run, rw.gather, group)
    rows = gathered_ops.gathered_rows(wq, run, shape.tile, shared=bool(group) and group % shape.tile == 0)
    # a squeeze-excitation's x * g feeding a 1x1: the pad stage quantises x * g itself (the product's own pass
    # and its fp32 output spared: efficientnet_b0@224's gathered project convs)
    gate = channel_gate(conv.args[0], geo, rw.var2val, rw.counts, rw.plans) if GATE and not run.patches else None
    gate = gate if gate is not None and dtype_of(gate[0]) == "float32" else None
    flat = rw.visit_expr(conv.args[0] if gate is None else gate[0])
    length = shape.input_length(run)
    assert gate is None or len(shape_of(flat)) == 4  # a product is no producer's padded planes
    if len(shape_of(flat)) != 2:  # else the producer wrote these padded planes (into_planes)
        gates = [rw.visit_expr(gate[1])] if gate is not None else []
        if gate is not None and gate[2]:  # x * sigmoid(g): the sigmoid as its own small op ([N or 1, C, 1, 1])
            gates = [rw.builder_.emit(relax.op.sigmoid(gates[0]))]
        pad = (gathered_inputs.pad_patches(tuple(shape_of(flat)), dtype_of(flat), run, act) if run.patches
               else gathered_inputs.pad_planes(tuple(shape_of(flat)), dtype_of(flat), run, act, shape.channels,
                                               int(shape_of(gates[0])[0]) if gates else None))
        flat = rw.builder_.emit(relax.call_tir(rw.builder_.add_func(pad, "pad_planes"), [flat, *gates],
                                               relax.TensorType([geo.n, length], "uint8")))
    assert [int(d) for d in shape_of(flat)] == [geo.n, length]
    bias = extra.pop(0) if flags["has_bias"] else relax.const(np.zeros(geo.k, np.float32))
    residual = extra.pop(0) if flags["has_residual"] else None
    into = rw.planes.get(ep.last)
    # the epilogue in the kernel's write-back: a patches layer's domain is its output map; a stride-1 1x1's rows are
    # written as its map (positions: the domain cut at the map's end), a residual added there; a padded-planes
    # layer's goes into the next one's planes where into_planes found them, else cropped after, and with a residual
    # a pass of its own after the int32 sums
    direct = MAP_ROWS and into is None and not run.patches and run.wq == run.ow and not any(run.padding) and \
        tuple(run.stride) == (1, 1)
    out = gathered_ops.WriteBack(residual is None or direct, flags["relu"], out_act, into, act.zero_point == 0,
                                 run.oh * run.ow if direct else 0, residual is not None and direct, res_act)
    cropped = out.fused and not run.patches and into is None and not direct
    dims = ([geo.n, into.channels * into.plane] if into is not None else
            [geo.n, geo.k, geo.oh, geo.ow] if out.fused and not cropped else [geo.n, geo.k, shape.q])
    kernel = gathered_ops.gathered_conv(geo.n, length, rows, shape.q, shape.unroll, out, tuple(dims), shape.lanes)
    consts = [relax.const(a) for a in (rows.data, rows.off, rows.glen, comp, out_scale)]
    call = rw.builder_.emit(relax.call_tir(rw.builder_.add_func(kernel, "sparse_conv2d_gathered"),
                                           [flat, *consts, bias, *([residual] if out.residual else [])],
                                           relax.TensorType(dims, out.dtype)))
    if cropped:
        crop = gathered_ops.crop_domain(geo.n, geo.k, shape.q, geo.oh, geo.ow, run.wq, out.dtype)
        call = rw.builder_.emit(relax.call_tir(rw.builder_.add_func(crop, "crop_domain"), [call],
                                               relax.TensorType([geo.n, geo.k, geo.oh, geo.ow], out.dtype)))
    if not out.fused:
        call = rw.builder_.call_te(
            lambda s, c, o, b, *r: int8_ops.int8_epilogue(
                s, c, o, b, r[0] if residual is not None else None, None,
                geo=run, relu=flags["relu"], out_act=out_act, res_act=res_act, comp_zero=act.zero_point == 0),
            call, relax.const(comp), relax.const(out_scale), bias, *[a for a in (residual,) if a is not None],
            primfunc_name_hint="epilogue_int8")
        mark(rw.builder_, call, {"op": "epilogue_int8"})  # its own kernel: fused with the next pad it ran scalar
    return call, rows, (comp, out_scale)


def into_planes(rw, readers: dict) -> dict:
    """Chained outputs (uint8) of a padded-planes gathered layer that one padded-planes gathered layer reads, with
    nothing between (vgg's 3x3 pairs on 32x32 and 16x16): the producer writes them into the consumer's planes
    (IntoPlanes), its epilogue in the write-back. {var: IntoPlanes}."""
    from ._conv_match import conv_geometry
    from ._util import const_array

    out = {}
    for src, act in rw.out_act.items():
        convs, producer = readers.get(src, []), rw.plans.get(src)
        if len(convs) != 1 or producer is None or producer[1].residual is not None or src in rw.res_act:
            continue
        pconv, cconv = producer[0], convs[0][0]
        if not cconv.args[0].same_as(src):
            continue
        pw, cw = const_array(pconv.args[1]), const_array(cconv.args[1])
        pgeo, cgeo = conv_geometry(pconv, pw), conv_geometry(cconv, cw)
        prun, crun = (rw.gathered_geometry(w, g) if g is not None else None for w, g in ((pw, pgeo), (cw, cgeo)))
        if (prun is None or crun is None or prun.patches or crun.patches or prun.wq != crun.wq or prun.n != crun.n
                or tuple(prun.stride) != (1, 1) or tuple(crun.stride) != (1, 1)):
            continue
        pt, pl = crun.padding[:2]
        cplan, pplan = (gathered_ops.plan(r, rw.gather, shared_group(w, g, rw.gather))
                        for r, w, g in ((crun, cw, cgeo), (prun, pw, pgeo)))
        into = gathered_ops.IntoPlanes(pt * crun.wq + pl, crun.channel_plane, cplan.channels, prun.oh, prun.ow,
                                       prun.wq)
        if into.fits(pplan.q, prun.k):
            out[src] = into
    return out

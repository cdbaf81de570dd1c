"""TE definition of the int8 sparse direct conv2d (arithmetic and layout: int8_rows).

Three stages, named like te_ops' so the schedules find them:
  "pad_q"     fp32 [N, C, H, W] -> uint8 quads xq[N, Cq4 * channel_plane, 4]: quantised, zero-point padded,
              phase-split and flattened as sparse_ops.pad_flat, 4 channels of one position per 32-bit word
  "conv"      conv[n, k, q] = sum_{j, v} int32(xq[n, off[k, j] + q, v]) * int32(data[k, j, v])   (int32)
  "epilogue"  float32(conv - comp[k]) * out_scale[k] (+ bias) (+ residual) (ReLU), cropped to [N, K, OH, OW]
The "conv" body is written exactly as the x86 tensor intrinsics' description (schedules/x86_int8),
lanes along q and the quad v innermost, so it tensorizes to vpdpbusd / vpmaddubsw.
"""

from __future__ import annotations

import dataclasses

from tvm import te, tirx

from .geometry import ConvGeometry
from .int8_formats import QUAD, ROUNDING_BIAS, ActQuant, quad_channels
from .sparse import flat_offset, read_position, row_entry

F32_ZERO = tirx.const(0.0, "float32")


def _vectorizable_nearbyint() -> None:
    """TVM 0.27 registers floor, round, trunc... as vectorizable but not nearbyint, so its VectorizeLoop turned
    every vectorised loop that quantises (pad stages, uint8 write-backs) back into a scalar loop, and LLVM's
    own vectorizer sometimes picked the wrong loop: resnet50's uint8 stem stored its output one byte at a time
    (vpextrb), 0.36 -> 0.83 ms. LLVM lowers a vector nearbyint to one vrndscaleps (vroundps on AVX2)."""
    import tvm

    if tvm.ir.Op.get("tirx.nearbyint").get_attr("TVectorizable") is None:  # upstream may add it
        tvm.ir.register_op_attr("tirx.nearbyint", "TVectorizable", True)


_vectorizable_nearbyint()


def quantize(value, act: ActQuant, relu: bool = False, lanes: int = 0):
    """uint8 of an fp32 value: round half to even (as torch.round), clamped in float so that huge values cannot
    wrap. relu: of max(value, 0), as the clamp at the zero point instead of a max before (the same bytes: value *
    inv_scale <= 0 rounds to at most 0 and lands at zp or below; one op less). Clamped first (to integers, so the
    rounding commutes), rounded by adding ROUNDING_BIAS (even: the sum's ties go to y's even neighbour), the
    zero point added to the float's bits: their low byte is the result. One add where nearbyint and a
    float-to-int conversion took two instructions a vector (vrndscaleps, vcvttps2dq); the bytes are nearbyint's.
    act.saturating or act.packs with zp 0: see _saturated, _packed. lanes: value is a vector expression of that
    many lanes (a TVMScript kernel's, sparse_int8_gathered.quantize_lanes), 0 a scalar TE one."""
    def typed(dtype: str) -> str:
        return f"{dtype}x{lanes}" if lanes else dtype

    def const(v, dtype: str):
        c = tirx.const(v, dtype)
        return tirx.Broadcast(c, lanes) if lanes else c

    zp = act.zero_point
    y = value * const(act.inv_scale, "float32")
    if act.saturating and not zp:
        return _saturated(y, act.qmax, typed, const)
    if act.packs and not zp:
        return _packed(y, act.qmax, typed, const)
    y = tirx.max(tirx.min(y, const(float(act.qmax - zp), "float32")), const(float(0 if relu else -zp), "float32"))
    bits = tirx.reinterpret(typed("int32"), y + const(ROUNDING_BIAS, "float32"))
    return (bits + const(zp, "int32") if zp else bits).astype(typed("uint8"))


def _saturated(y, qmax: int, typed, const):
    """uint8 of y (value * inv_scale) with a zero point of 0, where the target converts and narrows in one
    instruction each (ActQuant.saturating): max(y, 0), rounded half to even by llvm.lrint (vcvtps2dq), then
    min(qmax) in uint32 and narrowed (vpmovusdb: one instruction for both). A y past int32 converts to INT_MIN,
    which as uint32 is past qmax too, so it saturates as the float clamp does: the same bytes as quantize's other
    path with one vector op less (resnet50's requantising write-backs: benchmarks/epilogue_ops.c). typed, const:
    quantize's, for y's lanes."""
    r = tirx.call_llvm_pure_intrin(typed("int32"), "llvm.lrint", tirx.max(y, const(0.0, "float32")))
    return tirx.min(r.astype(typed("uint32")), const(qmax, "uint32")).astype(typed("uint8"))


def _packed(y, qmax: int, typed, const):
    """uint8 of y (value * inv_scale) with a zero point of 0 where int32 narrows by saturating packs
    (ActQuant.packs: x86 without VNNI): min(y, qmax) in float (a y past int32 would convert to INT_MIN), rounded
    half to even by llvm.lrint (vcvtps2dq), clamped to [0, 255] in int32, which LLVM emits as the packs alone
    (the narrowing every write-back does anyway), so the clamp at 0 (a ReLU's, or round(y) < 0) costs nothing. The
    same bytes as quantize's other path, 3 vector ops fewer a vector (Haswell code: vminps, vcmpltps, vandps,
    vaddps, vandps -> vminps, vcvtps2dq). With zp > 0 LLVM adds zp after narrowing and keeps the clamp (vpmaxsd,
    vpminsd): no fewer ops, so such tensors keep the other path. typed, const: quantize's."""
    y = tirx.min(y, const(float(qmax), "float32"))
    r = tirx.call_llvm_pure_intrin(typed("int32"), "llvm.lrint", y)
    return tirx.max(tirx.min(r, const(255, "int32")), const(0, "int32")).astype(typed("uint8"))


def pad_quantize(x: te.Tensor, geo: ConvGeometry, act: ActQuant, quads: int,
                 subsample: tuple[int, int] = (1, 1)) -> te.Tensor:
    """subsample (sy, sx): geo is a strided 1x1 conv rewritten at stride 1 (relay_passes' strided_pointwise),
    whose input here is every sy-th row and sx-th column of x, read in place (no slice copied first)."""
    (sh, sw), (pt, pl, _, _) = geo.stride, geo.padding
    sy, sx = subsample
    phase_plane = geo.hq * geo.wq

    def value(n, i, v):
        c, rest = i // geo.channel_plane * QUAD + v, i % geo.channel_plane
        if sh == 1 and sw == 1:
            h, w = rest // geo.wq - pt, rest % geo.wq - pl
        else:
            phase, hh, ww = rest // phase_plane, rest % phase_plane // geo.wq, rest % geo.wq
            h, w = hh * sh + phase // sw - pt, ww * sw + phase % sw - pl
        inside = tirx.all(c < geo.c, h >= 0, h < geo.h, w >= 0, w < geo.w)
        # a uint8 input is the previous layer's requantised output, already in this layer's `act`
        q = x[n, c, h * sy, w * sx] if x.dtype == "uint8" else quantize(x[n, c, h * sy, w * sx], act)
        return tirx.if_then_else(inside, q, tirx.const(act.zero_point, "uint8"))

    return te.compute((geo.n, quads * geo.channel_plane, QUAD), value, name="pad_q")


def quantize_channels(x: te.Tensor, act: ActQuant, channels: int) -> te.Tensor:
    """fp32 x [N, C, H, W] -> uint8 [N, channels, H, W] in `act`, channels past C at the zero point: what the pad
    stage computes for a conv with an fp32 input, as planes a quad_relay interleaves (a pad stage that
    quantises gathers its 4 channels lane by lane and ran scalar)."""
    n, c, h, w = (int(d) for d in x.shape)

    def value(b, k, y, i):
        q = quantize(x[b, tirx.min(k, c - 1), y, i], act)
        return q if channels == c else tirx.if_then_else(k < c, q, tirx.const(act.zero_point, "uint8"))

    return te.compute((n, channels, h, w), value, name="quantize_q")


def _quad_patches(plane: te.Tensor, geo: ConvGeometry) -> te.Tensor:
    """The quads of the padded plane (pad_quantize at geo without patches; stride 1) cut into geo's patches
    (ConvGeometry.with_patches): per channel quad and tap, the Q = OH*OW quads it reads, [N, Cq*R*S*Q, 4];
    each output row is a contiguous slice of a plane row (OW words)."""
    (dh, dw), pitch = geo.dilation, geo.wq

    def value(n, i, v):
        c, tap, q = i // geo.channel_plane, i % geo.channel_plane // geo.q_extent, i % geo.q_extent
        row, col = q // geo.ow + tap // geo.s * dh, q % geo.ow + tap % geo.s * dw
        return plane[n, (c * geo.hq + row) * pitch + col, v]

    return te.compute((geo.n, quad_channels(geo.c) * geo.channel_plane, QUAD), value, name="pad_patch")


def quad_sums(xq: te.Tensor, data: te.Tensor, off: te.Tensor, geo: ConvGeometry) -> te.Tensor:
    """The int32 sums conv[n, k, q] of stored quad rows over the quads xq [N, P, 4] (the "conv" stage the
    schedules tensorize). data [K, L, 4] and off [K, L (+1)], or interleaved by row tiles of T ([K/T, L, T, 4],
    [K/T, L (+1), T])."""
    tile = int(data.shape[2]) if len(data.shape) == 4 else 0
    rows, width = int(data.shape[0]) * max(tile, 1), int(data.shape[1])
    j = te.reduce_axis((0, width), name="j")
    v = te.reduce_axis((0, QUAD), name="v")

    def entry(t, k, *quad):
        return row_entry(t, k, j, tile, *quad)

    return te.compute(
        (geo.n, rows, geo.q_extent),
        lambda n, k, q: te.sum(xq[n, flat_offset(geo, entry(off, k)) + read_position(geo, q), v].astype("int32")
                               * entry(data, k, v).astype("int32"), axis=[j, v]),
        name="conv",
    )


def sparse_conv2d_int8(x: te.Tensor, data: te.Tensor, off: te.Tensor, comp: te.Tensor, out_scale: te.Tensor,
                       *rest: te.Tensor, geo: ConvGeometry, act: ActQuant, quads: int, has_bias: bool,
                       has_residual: bool, relu: bool, out_act: ActQuant | None = None,
                       subsample: tuple[int, int] = (1, 1), res_act: ActQuant | None = None,
                       wide: bool = False, has_row_order: bool = False) -> te.Tensor:
    """int8 sparse direct conv2d with a dequantising fp32 epilogue. rest = [bias] + [residual] + [row_of]
    (rows stored in another order, formats.length_order: output channel k is stored row row_of[k]). x is fp32,
    or uint8 already quantised in `act`; out_act: the epilogue requantises its fp32 result to uint8 in the
    next layer's quantisation (that layer's pad-stage arithmetic, so the network's result is the same);
    subsample: see pad_quantize; res_act: the residual is uint8 in this quantisation (a block output that
    its int8 producer requantised), dequantised here. wide (no residual): the output is the flat domain
    itself, [N, K, q_extent], thrown-away columns included, so the epilogue joins the write-back; only
    quad_relay reads it (rows Wq apart)."""
    rest = list(rest)
    bias = rest.pop(0) if has_bias else None
    residual = rest.pop(0) if has_residual else None
    row_of = rest.pop(0) if has_row_order else None
    if len(x.shape) == 3:  # quad_relay's output
        xq = x
    elif geo.patches:
        xq = _quad_patches(pad_quantize(x, dataclasses.replace(geo, patches=False), act, quads, subsample), geo)
    else:
        xq = pad_quantize(x, geo, act, quads, subsample)
    conv = quad_sums(xq, data, off, geo)

    return int8_epilogue(conv, comp, out_scale, bias, residual, row_of, geo=geo, relu=relu, out_act=out_act,
                         res_act=res_act, wide=wide, comp_zero=act.zero_point == 0)


def dequantized(acc, comp: te.Tensor, out_scale: te.Tensor, k, comp_zero: bool = False):
    """float32 of an int32 sum of output channel (or stored row) k: float32(acc - comp[k]) * out_scale[k]; comp_zero:
    the input's zero point is 0 (after a ReLU), so comp is all zeros and not subtracted. Every int8 epilogue
    computes it here, so that two kernels' values (a pair's halves) are the same bits as one's."""
    return (acc if comp_zero else acc - comp[k]).astype("float32") * out_scale[k]


def int8_epilogue(conv: te.Tensor, comp: te.Tensor, out_scale: te.Tensor, bias: te.Tensor | None,
                  residual: te.Tensor | None, row_of: te.Tensor | None, *, geo: ConvGeometry, relu: bool,
                  out_act: ActQuant | None, res_act: ActQuant | None, wide: bool = False,
                  comp_zero: bool = False) -> te.Tensor:
    """The int8 convs' epilogue over their int32 sums conv [N, K, q] (flat domain of geo): float32(conv - comp[k])
    * out_scale[k] (+ bias) (+ residual, uint8 in res_act or fp32) (ReLU), requantised to out_act where given;
    cropped to [N, K, OH, OW], or (wide) the flat domain itself. comp_zero: the input's zero point is 0 (after a
    ReLU), so comp is all zeros and not subtracted."""
    def value(n, k, *yx):  # (y, x), or the flat q of a wide output
        q = yx[0] if wide else yx[0] * (geo.ow if geo.row_domain or geo.patches else geo.wq) + yx[1]
        val = dequantized(conv[n, k if row_of is None else row_of[k], q], comp, out_scale, k, comp_zero)
        if bias is not None:
            val = val + bias[k]
        if residual is not None:
            r = residual[n, k, yx[0], yx[1]]
            val = val + (dequantize(r, res_act) if res_act is not None else r)
        if out_act is not None:
            return quantize(val, out_act, relu)
        return tirx.max(val, F32_ZERO) if relu else val

    shape = (geo.n, geo.k, geo.q_extent) if wide else (geo.n, geo.k, geo.oh, geo.ow)
    return te.compute(shape, value, name="epilogue")


def sparse_conv2d_int8_pair(x: te.Tensor, data: te.Tensor, off: te.Tensor, comp: te.Tensor, out_scale: te.Tensor,
                            bias: te.Tensor, res_bias: te.Tensor, *, geo: ConvGeometry, relu: bool,
                            out_act: ActQuant | None, comp_zero: tuple[bool, bool]) -> te.Tensor:
    """Two int8 pointwise convs over one flat output domain whose outputs a residual add joins (resnet's first
    block of a stage: conv3 + downsample), as one kernel: x holds both inputs' quads, the residual conv's first
    ([N, (QA + QB) * plane, 4]); stored row 2k + h is output channel k of the residual conv (h = 0, offsets into
    the first part) or of this one (h = 1, into the second); conv [N, 2K, Q]. The epilogue computes both
    values as int8_epilogue does (the residual conv's without ReLU, as it wrote its fp32 output before) and adds
    them, then ReLU and requantisation: the same bits as the two kernels, without the residual's fp32 map
    written and read back (3.2 MB each way at 56x56). comp, out_scale [2K] by stored row; comp_zero per half."""
    conv = quad_sums(x, data, off, geo)
    rows = int(conv.shape[1])

    def half(n, k, h, q):  # stored row 2k + h's value, as int8_epilogue computes it
        val = dequantized(conv[n, 2 * k + h, q], comp, out_scale, 2 * k + h, comp_zero[h])
        return val + (bias[k] if h else res_bias[k])

    def value(n, k, y, x_):
        q = y * geo.ow + x_
        val = half(n, k, 1, q) + half(n, k, 0, q)
        if out_act is not None:
            return quantize(val, out_act, relu)
        return tirx.max(val, F32_ZERO) if relu else val

    return te.compute((geo.n, rows // 2, geo.oh, geo.ow), value, name="epilogue")


def dequantize(u, act: ActQuant, lanes: int = 0):
    """float32 of a uint8 value in `act`: (u - zp) * scale. lanes: u is a vector expression of that many lanes (a
    TVMScript kernel's write-back, gathered_writes.WriteBack), 0 a scalar TE one."""
    def const(v: float):
        c = tirx.const(v, "float32")
        return tirx.Broadcast(c, lanes) if lanes else c

    return (u.astype(f"float32x{lanes}" if lanes else "float32") - const(float(act.zero_point))) * const(act.scale)


def sparse_dense_int8(x: te.Tensor, data: te.Tensor, off: te.Tensor, comp: te.Tensor, out_scale: te.Tensor,
                      *rest: te.Tensor, act: ActQuant, quads: int, has_bias: bool, relu: bool) -> te.Tensor:
    """int8 sparse linear layer: x [N, in] fp32 quantised to uint8 quads xq[N, quads, 4] ("pad_q"), then
    conv[n, o] = sum_{j, v} int32(xq[n, off[o, j], v]) * int32(data[o, j, v]) and the same dequantising
    epilogue as the conv (bias, ReLU). rest = [bias]."""
    bias = rest[0] if has_bias else None
    batch, fin = (int(d) for d in x.shape)

    def quantised(n, i, v):
        f = i * QUAD + v
        return tirx.if_then_else(f < fin, quantize(x[n, tirx.min(f, fin - 1)], act),
                                 tirx.const(act.zero_point, "uint8"))

    xq = te.compute((batch, quads, QUAD), quantised, name="pad_q")
    j = te.reduce_axis((0, int(data.shape[1])), name="j")
    v = te.reduce_axis((0, QUAD), name="v")
    conv = te.compute(
        (batch, int(data.shape[0])),
        lambda n, o: te.sum(xq[n, off[o, j], v].astype("int32") * data[o, j, v].astype("int32"), axis=[j, v]),
        name="conv",
    )

    def value(n, o):
        val = dequantized(conv[n, o], comp, out_scale, o)
        if bias is not None:
            val = val + bias[o]
        return tirx.max(val, F32_ZERO) if relu else val

    return te.compute((batch, int(data.shape[0])), value, name="epilogue")

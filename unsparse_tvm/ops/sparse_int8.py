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


def quantize(value, act: ActQuant, relu: bool = False):
    """uint8 of an fp32 value: round half to even (as torch.round), clamped in float so that huge values cannot
    wrap. relu: of max(value, 0), as the clamp at the zero point instead of a max before (the same bytes: value *
    inv_scale <= 0 rounds to at most 0 and lands at zp or below; one op less). Clamped first (to integers, so the
    rounding commutes), rounded by adding ROUNDING_BIAS (even: the sum's ties go to y's even neighbour), the
    zero point added to the float's bits: their low byte is the result. One add where nearbyint and a
    float-to-int conversion took two instructions a vector (vrndscaleps, vcvttps2dq); the bytes are nearbyint's."""
    zp = act.zero_point
    y = value * tirx.const(act.inv_scale, "float32")
    y = tirx.max(tirx.min(y, tirx.const(float(act.qmax - zp), "float32")),
                 tirx.const(float(0 if relu else -zp), "float32"))
    bits = tirx.reinterpret("int32", y + tirx.const(ROUNDING_BIAS, "float32"))
    return (bits + tirx.const(zp, "int32") if zp else bits).astype("uint8")


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


def flat_plane(x_shape: tuple | None, run: ConvGeometry, subsample: tuple[int, int] = (1, 1), pitch: int = 0) -> bool:
    """Whether a uint8 x [N, C, H, W] and the quads of the stride-1 conv `run` lay each channel's positions out
    alike (no padding, no subsampling, no patches, x's rows back to back): quad_relay then runs each plane as
    one row, which needs 16 positions in all rather than in each row."""
    return (x_shape is not None and len(x_shape) == 4 and tuple(subsample) == (1, 1) and pitch in (0, int(x_shape[3]))
            and not run.patches and run.hq * run.wq == run.h * run.w == int(x_shape[2]) * int(x_shape[3])
            and run.wq == run.w and run.h * run.w >= 16)


def quad_relay(x_shape: tuple, run: ConvGeometry, quads: int, zero_point: int,
               subsample: tuple[int, int] = (1, 1), pitch: int = 0, into: tuple[int, int] = (0, 0)) -> tirx.PrimFunc:
    """uint8 x [N, C, H, W] (the previous layer requantised it) -> pad_quantize's quad layout for the
    stride-1 conv `run`: [N, quads * Hq*Wq, 4], padding and trailing quads at the zero point, input row y
    read at x row y*sy, column x at x*sx (a strided 1x1 read in place). Per step 16 positions of 4 channel
    planes, one byte shuffle (LLVM: vpunpck*) into one 64-byte store; a row's last step is shifted back to
    end at the row's end (it rewrites a few positions with the same bytes), so W >= 16, or H*W >= 16 where
    x's plane is laid out as the quads' (flat_plane: then the plane is one row). Each plane is first
    filled with the zero point the same way. The pad stage relays these bytes one vpinsrb at a time (256
    channels on 56x56: ~160 us; this: 41 us). C % 4 == 0. A 3-D x [N, C, P] is a producer's wide output
    (sparse_conv2d_int8's `wide`): its rows `pitch` apart in a plane of P. into (first, total): the quads go to
    quads first.. of an output of `total` quads an image (a pair's joined input, sparse_conv2d_int8_pair), the
    rest of which another relay writes."""
    from tvm.script import tirx as T

    n, c, h, w = x_shape if len(x_shape) == 4 else (*x_shape, 1)  # 3-D: h = P, w = 1; rows at `pitch`
    pitch, x_dims = pitch or w, tuple(int(d) for d in x_shape)
    (sy, sx), cq, (pt, pl) = subsample, c // QUAD, run.padding[:2]
    plane, wq, span = run.hq * run.wq, run.wq, 16 * sx
    pick = [v * span + t * sx for t in range(16) for v in range(QUAD)]  # lane 4t + v <- plane v, position t
    zp, padded = tirx.const(zero_point, "uint8"), plane != run.h * run.w
    rows, cols = run.h, run.w
    if flat_plane(x_shape, run, subsample, pitch):  # x's plane is q's: one row of H*W positions (14x14, 7x7 too)
        rows, cols, wq = 1, run.h * run.w, run.h * run.w
    assert cols >= 16, (x_shape, cols)

    def x0(k):  # a step's first position (the last step shifted back to end at the row's end)
        return tirx.min(k * 16, cols - 16)

    first, total = into if into[1] else (0, quads)

    def dst(b):  # quad b's first output position
        return (b // quads * total + first + b % quads) * plane

    def src(b, y, k):  # its first byte in channel plane 0 of quad b
        return (b // quads * cq + b % quads) * QUAD * h * w + y * sy * pitch + x0(k) * sx

    # (x0 and src as expressions, not names bound in the script: TVMScript makes a bound name a buffer, which
    # the parallel loop allocated from the workspace pool twice per quad: 7x7 relays ran 2-3x slower)
    @T.prim_func(s_tir=True)  # a root block: Relax analyses (AnnotateTIROpPattern) expect one
    def relay(x: T.Buffer(x_dims, "uint8"), q: T.Buffer((n, total * plane, QUAD), "uint8")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})  # opaque: never fused
        with T.sblock("root"):
            qf = T.decl_buffer((n * total * plane * QUAD,), "uint8", data=q.data)
            xf = T.decl_buffer((n * c * h * w,), "uint8", data=x.data)
            for b in T.parallel(n * quads):  # (image, channel quad)
                if padded or b % quads >= cq:  # padding, or a trailing quad: the zero point first
                    for k in range((plane * QUAD + 63) // 64):
                        qf[T.Ramp(dst(b) * QUAD + T.min(k * 64, plane * QUAD - 64), 1, 64)] = T.Broadcast(zp, 64)
                if b % quads < cq:
                    for y, k in T.grid(rows, (cols + 15) // 16):
                        qf[T.Ramp((dst(b) + (y + pt) * wq + pl + x0(k)) * QUAD, 1, 16 * QUAD)] = T.Shuffle(
                            [xf[T.Ramp(src(b, y, k) + v * h * w, 1, span)] for v in range(QUAD)], pick)

    return relay.without_attr("global_symbol")  # the module names each (one per layer shape)


def _phase_rows(run: ConvGeometry, step: int) -> list[tuple] | None:
    """Per phase plane (ph, pw) of a strided conv: (first plane row, rows, first plane column, columns, first
    input row, first input column, lead) of the part that reads the input, or None where a phase has fewer
    columns than one step, or its last step's load would pass the input row's end even starting `lead` <= 1
    bytes early (see quad_relay_strided)."""
    (s, _), (pt, pl) = run.stride, run.padding[:2]
    out = []
    for ph in range(s):
        for pw in range(s):
            h0, w0 = max(0, -(-(pt - ph) // s)), max(0, -(-(pl - pw) // s))
            h1, w1 = min(run.hq - 1, (run.h - 1 + pt - ph) // s), min(run.wq - 1, (run.w - 1 + pl - pw) // s)
            x0 = w0 * s + pw - pl
            lead = max(0, x0 + s * (w1 - w0 + 1) - run.w)
            if w1 - w0 + 1 < step or lead > min(1, x0):
                return None
            out.append((h0, h1 - h0 + 1, w0, w1 - w0 + 1, h0 * s + ph - pt, x0, lead))
    return out


def strided_relay_step(run: ConvGeometry) -> int | None:
    """The positions quad_relay_strided moves per step for `run`: the widest of 16, 8, 4 every phase plane has
    room for, or None where it declines (_phase_rows)."""
    return next((step for step in (16, 8, 4) if _phase_rows(run, step) is not None), None)


def quad_relay_strided(x_shape: tuple, run: ConvGeometry, quads: int, zero_point: int) -> tirx.PrimFunc | None:
    """quad_relay for a strided conv (stride s in both axes, several taps): uint8 x [N, C, H, W] -> its s*s
    phase planes of quads, [N, quads * channel_plane, 4], as pad_quantize lays them out. Each phase plane row
    is every s-th byte of an input row: per step 16 (or 8, or 4) positions, 4 channel rows of 16s bytes in, one
    shuffle picking every s-th byte of each and interleaving them, one store. Where the pad stage inserted
    one byte at a time (resnet50's 128-channel 3x3/2 on 56x56). None where a phase plane is narrower than 4
    positions (_phase_rows); requires C % 4 == 0 and equal strides."""
    from tvm.script import tirx as T

    n, c, h, w = x_shape
    (s, sw), cq, hw = run.stride, c // QUAD, h * w
    step = strided_relay_step(run)
    if s != sw or c % QUAD or step is None:
        return None
    rows = _phase_rows(run, step)
    phase, plane, span = run.hq * run.wq, run.channel_plane, step * s
    picks = [[v * span + t * s + lead for t in range(step) for v in range(QUAD)] for lead in (0, 1)]
    zp = tirx.const(zero_point, "uint8")

    def per_phase(p, i):  # field i of phase p's row (a constant per phase, chosen by p)
        expr = tirx.const(rows[-1][i], "int32")
        for k in range(len(rows) - 2, -1, -1):
            expr = tirx.Select(p == k, tirx.const(rows[k][i], "int32"), expr)
        return expr

    def picked(xf, src, lead: int):  # every s-th byte of 4 channel rows from src, interleaved (lead: see _phase_rows)
        return tirx.Shuffle([tirx.BufferLoad(xf, [tirx.Ramp(src + v * hw, 1, span)]) for v in range(QUAD)],
                            picks[lead])

    def x0(p, k):  # a step's first position in phase p's row (expressions, not bound names: see quad_relay)
        return tirx.min(k * step, per_phase(p, 3) - step)

    def src(b, p, y, k):  # its first input byte in channel plane 0 of quad b
        return ((b // quads * cq + b % quads) * QUAD * hw + (per_phase(p, 4) + y * s) * w + per_phase(p, 5)
                + x0(p, k) * s - per_phase(p, 6))

    def dst(b, p, y, k):  # its first byte in the phase planes
        return (b * plane + p * phase + (per_phase(p, 0) + y) * run.wq + per_phase(p, 2) + x0(p, k)) * QUAD

    @T.prim_func(s_tir=True)
    def relay(x: T.Buffer((n, c, h, w), "uint8"), q: T.Buffer((n, quads * plane, QUAD), "uint8")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})  # opaque: never fused
        with T.sblock("root"):
            qf = T.decl_buffer((n * quads * plane * QUAD,), "uint8", data=q.data)
            xf = T.decl_buffer((n * c * hw,), "uint8", data=x.data)
            for b in T.parallel(n * quads):  # (image, channel quad): the zero point first, then the rows
                for k in range((plane * QUAD + 63) // 64):
                    qf[T.Ramp(b * plane * QUAD + T.min(k * 64, plane * QUAD - 64), 1, 64)] = T.Broadcast(zp, 64)
                if b % quads < cq:
                    for p in range(s * s):
                        for y, k in T.grid(per_phase(p, 1), (per_phase(p, 3) + step - 1) // step):
                            if per_phase(p, 6) == 0:  # the shuffle's picks are constants: one branch per lead
                                qf[T.Ramp(dst(b, p, y, k), 1, step * QUAD)] = picked(xf, src(b, p, y, k), 0)
                            else:
                                qf[T.Ramp(dst(b, p, y, k), 1, step * QUAD)] = picked(xf, src(b, p, y, k), 1)

    return relay.without_attr("global_symbol")


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


def dequantize(u, act: ActQuant):
    """float32 of a uint8 value in `act`: (u - zp) * scale."""
    return (u.astype("float32") - tirx.const(float(act.zero_point), "float32")) * tirx.const(act.scale, "float32")


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

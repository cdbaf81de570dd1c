"""The input stage of the gathered-quads int8 kernels (sparse_int8_gathered): the layer's input as uint8 in its
quantisation, laid out as the gathered conv reads it: the padded planes (pad_planes) or, for a 2x2 or 4x4 map, one
patch per (tap, channel) (pad_patches)."""

from __future__ import annotations

from tvm import tirx

from .geometry import ConvGeometry
from .int8_formats import ActQuant
from .sparse_int8_gathered import LANES, TINY, quantize_lanes


def _as_bytes(v, x_dtype: str, act: ActQuant, lanes: int):
    """`lanes` input values as uint8 in `act`: quantised from float32 in vector arithmetic, or already uint8."""
    return v if x_dtype == "uint8" else quantize_lanes(v, act, lanes)


def _planes(x_shape: tuple, x_dtype: str, act: ActQuant, channels: int, plane: int, put_row,
            gate: int | None = None) -> tirx.PrimFunc:
    """The padded-planes input stage: per (image, channel) its plane of `plane` bytes filled with the zero point
    in vectors (and the channels past C left so), then put_row(of, row, b, y) writes input row y (`row`: its W
    values as bytes in `act`, quantised in vector arithmetic: a TE stage with the padding as a per-byte condition
    ran scalar). gate G: the function takes a second input g [G, C, 1, 1] (G 1 or N) and quantises x * g, a
    squeeze-excitation's product computed here instead of in a pass of its own (a sigmoid of the gate computed
    in here, per row, ran these stages 1.3-1.6x slower than the product alone: its own small op instead)."""
    from tvm.script import tirx as T

    n, c, h, w = (int(d) for d in x_shape)
    zp = T.uint8(act.zero_point)
    pstep = min(64, plane)  # the zero point filled in vectors of up to 64 bytes
    pfill = -(-plane // pstep)

    def row(v, gain):  # an input row as bytes, scaled by the channel's gain first where there is one
        return _as_bytes(v if gain is None else v * tirx.Broadcast(gain, w), x_dtype, act, w)

    @T.macro
    def fill(xf, of, b, gain):  # gain: None, or the channel's scale
        for k in range(pfill):
            of[T.Ramp(b * plane + T.min(k * pstep, plane - pstep), 1, pstep)] = T.Broadcast(zp, pstep)
        if b % channels < c:
            for y in range(h):  # (the row an inline expression: bound to a name, it went through a workspace buffer)
                put_row(of, row(xf[T.Ramp(((b // channels * c + b % channels) * h + y) * w, 1, w)], gain), b, y)

    if gate is None:
        @T.prim_func(s_tir=True)
        def pad(x: T.Buffer((n, c, h, w), x_dtype), out: T.Buffer((n, channels * plane), "uint8")):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})  # opaque: never fused
            with T.sblock("root"):
                xf = T.decl_buffer((n * c * h * w,), x_dtype, data=x.data)
                of = T.decl_buffer((n * channels * plane,), "uint8", data=out.data)
                for b in T.parallel(n * channels):  # (image, channel)
                    fill(xf, of, b, None)

        return pad.without_attr("global_symbol")
    rows = gate

    @T.prim_func(s_tir=True)
    def pad_gated(x: T.Buffer((n, c, h, w), x_dtype), g: T.Buffer((rows, c, 1, 1), "float32"),
                  out: T.Buffer((n, channels * plane), "uint8")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        with T.sblock("root"):
            xf = T.decl_buffer((n * c * h * w,), x_dtype, data=x.data)
            of = T.decl_buffer((n * channels * plane,), "uint8", data=out.data)
            for b in T.parallel(n * channels):
                fill(xf, of, b, g[b // channels % rows, b % channels, 0, 0])

    return pad_gated.without_attr("global_symbol")


def pad_planes(x_shape: tuple, x_dtype: str, geo: ConvGeometry, act: ActQuant, channels: int,
               gate: int | None = None) -> tirx.PrimFunc:
    """x [N, C, H, W] (float32, quantised here; or uint8 already in `act`) -> uint8 [N, channels * plane]: per
    channel its padded plane [Hq, Wq] (a stride-2 conv's: its phase planes, pad_phase_planes), the zero point
    outside the image and in the channels past C (patches: pad_patches); each input row goes in as one vector of W.
    gate: x scaled per channel first (_planes; stride 1)."""
    from tvm.script import tirx as T

    if tuple(geo.stride) != (1, 1):
        assert gate is None  # a gate (channel_gate) scales a stride-1 1x1's input only
        return pad_phase_planes(x_shape, x_dtype, geo, act, channels)
    w, (pt, pl, _, _), plane = int(x_shape[3]), geo.padding, geo.channel_plane

    @T.macro
    def put_row(of, row, b, y):
        of[T.Ramp(b * plane + (y + pt) * geo.wq + pl, 1, w)] = row

    return _planes(x_shape, x_dtype, act, channels, plane, put_row, gate)


def pad_phase_planes(x_shape: tuple, x_dtype: str, geo: ConvGeometry, act: ActQuant, channels: int) -> tirx.PrimFunc:
    """A stride-2 conv's input as pad_planes writes a stride-1 one, in phase planes: x [N, C, H, W] -> uint8
    [N, channels * plane], per channel its 4 planes [Hq, Wq] (ConvGeometry.tap_offset's layout: padded input
    (y, x) at plane (y % 2, x % 2), row y // 2, column x // 2). Each input row, one vector, is split into its two
    column phases by a byte shuffle each."""
    from tvm.script import tirx as T

    w, (sh, sw), (pt, pl, _, _) = int(x_shape[3]), geo.stride, geo.padding
    plane, phase = geo.channel_plane, geo.hq * geo.wq
    assert (sh, sw) == (2, 2) and plane == 4 * phase
    cols = [[x for x in range(w) if (x + pl) % 2 == px] for px in range(2)]  # the input columns of column phase px

    @T.macro
    def put_phase(of, row, b, y, px):  # px a Python int: its columns are a Python list
        of[T.Ramp(b * plane + ((y + pt) % 2 * 2 + px) * phase + (y + pt) // 2 * geo.wq + (cols[px][0] + pl) // 2,
                  1, len(cols[px]))] = T.Shuffle([row], cols[px])

    @T.macro
    def put_row(of, row, b, y):
        put_phase(of, row, b, y, 0)
        put_phase(of, row, b, y, 1)

    return _planes(x_shape, x_dtype, act, channels, plane, put_row)


def patches_fit(geo: ConvGeometry) -> bool:
    """Whether pad_patches takes the layer: a map of Q = OH*OW positions (4, 16 or 64: a 64-byte vector holds whole
    channels) whose input map is the same size (3x3 with padding 1, stride 1), and whole vectors of channels."""
    q = geo.oh * geo.ow
    return q in (TINY, LANES, 64) and geo.h * geo.w == q and geo.c * q % 64 == 0


def pad_patches(x_shape: tuple, x_dtype: str, geo: ConvGeometry, act: ActQuant) -> tirx.PrimFunc:
    """x [N, C, H, W] (float32, quantised here; or uint8 in `act`) -> uint8 [N, R*S*C*Q], the patches tap-major:
    patch (tap, c) at (tap * C + c) * Q, the Q = H*W input bytes tap (r, s) reads for each output position, the
    zero point where it reads padding (patches_fit). Per image and 64 bytes of input (64/Q channels), each tap's
    patches are one byte shuffle of those 64 bytes and the zero point: 9 vector stores, where the padded plane
    cut into channel-major patches ran 16-21 us for 512 channels on a 2x2 or 4x4 map."""
    from tvm.script import tirx as T

    n, c, h, w = (int(d) for d in x_shape)
    (dh, dw), (pt, pl, _, _) = geo.dilation, geo.padding
    q, taps, chunks = h * w, geo.r * geo.s, c * h * w // 64

    def source(tap: int, at: int) -> int:  # byte `at` of a chunk's patch `tap`: its input byte, or 64 (the zero point)
        y, x = divmod(at % q, w)
        yy, xx = y + tap // geo.s * dh - pt, x + tap % geo.s * dw - pl
        return at - at % q + yy * w + xx if 0 <= yy < h and 0 <= xx < w else 64

    patterns = [[source(tap, at) for at in range(64)] for tap in range(taps)]
    zp = T.Broadcast(T.uint8(act.zero_point), 64)

    def patch(v, tap, first: int = 0):  # the shuffle of patch `tap` (a Select chain the loop's unrolling folds)
        shuffled = T.Shuffle([v[T.Ramp(0, 1, 64)], zp], patterns[first])
        return shuffled if first == taps - 1 else T.Select(tap == first, shuffled, patch(v, tap, first + 1))

    @T.prim_func(s_tir=True)
    def pad(x: T.Buffer((n, c, h, w), x_dtype), out: T.Buffer((n, taps * c * q), "uint8")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})  # opaque: never fused
        with T.sblock("root"):
            xf = T.decl_buffer((n * c * q,), x_dtype, data=x.data)
            of = T.decl_buffer((n * taps * c * q,), "uint8", data=out.data)
            for b in T.parallel(n * chunks):  # (image, 64 bytes of channels)
                v = T.decl_buffer((64,), "uint8", scope="local")
                v[T.Ramp(0, 1, 64)] = _as_bytes(xf[T.Ramp(b * 64, 1, 64)], x_dtype, act, 64)
                for tap in T.unroll(taps):
                    of[T.Ramp((b // chunks * taps + tap) * c * q + b % chunks * 64, 1, 64)] = patch(v, tap)

    return pad.without_attr("global_symbol")

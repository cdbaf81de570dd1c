"""How a gathered kernel (sparse_int8_gathered.gathered_conv) writes its rows: the int32 sums, or the epilogue
applied in registers (WriteBack) into the output map itself, into the next gathered layer's padded planes
(IntoPlanes), or over the domain for a crop pass after (crop_domain)."""

from __future__ import annotations

from dataclasses import dataclass

from tvm import tirx

from .int8_formats import ActQuant
from .sparse_int8 import dequantize, quantize


@dataclass(frozen=True)
class WriteBack:
    """What a gathered kernel writes: its int32 sums (`fused` False: sparse_int8.int8_epilogue runs after it), or
    the epilogue applied in registers (a patches layer, or one whose rows are written as its output map):
    float32(sum - comp[k]) * out_scale[k] + bias[k], ReLU, requantised to out_act (uint8) or float32, in the
    epilogue's order of operations, so the outputs are bit for bit its own."""

    fused: bool = False
    relu: bool = False
    out_act: ActQuant | None = None
    into: "IntoPlanes | None" = None  # uint8 straight into the next gathered layer's padded planes
    comp_zero: bool = False  # the input's zero point is 0: comp is all zeros and not subtracted
    # > 0: each row written as the output map of this many positions ([N, K, OH*OW]), the domain cut at its end (a
    # stride-1 1x1, whose domain is the map's positions in order, rounded up to whole tiles): no crop pass after
    positions: int = 0
    residual: bool = False  # (positions > 0) a residual [N, K, OH*OW] added before the ReLU, read as the output
    res_act: ActQuant | None = None  # the residual's quantisation where it is uint8 (else float32)

    @property
    def dtype(self) -> str:
        return "int32" if not self.fused else "uint8" if self.out_act is not None else "float32"

    def value(self, acc, comp, scale, bias, lanes: int, res=None):
        """The `lanes` values written for int32 sums acc, with comp, scale and bias already per lane; res: the
        residual's `lanes` values (uint8 in res_act, or float32) where it has one."""
        from tvm.script import tirx as T

        if not self.fused:
            return acc
        val = T.Cast(f"float32x{lanes}", acc if self.comp_zero else acc - comp) * scale + bias
        if res is not None:  # as sparse_int8.int8_epilogue adds it, before the ReLU or quantisation
            val = val + (res if self.res_act is None else dequantize(res, self.res_act, lanes))
        if self.out_act is not None:  # a ReLU as the clamp at the zero point (sparse_int8.quantize)
            return quantize_lanes(val, self.out_act, lanes, self.relu)
        return T.max(val, T.Broadcast(T.float32(0), lanes)) if self.relu else val


@dataclass(frozen=True)
class IntoPlanes:
    """A padded-planes layer's uint8 outputs written where the next gathered layer's input stage would put them:
    output position p (= y*Wq + x, the two layers' pitch alike) at `shift` + p of its channel's `plane`, then the
    zero point over what is padding there (the thrown-away columns, the rows around the map, the `channels` past
    K). Its epilogue pass and the next layer's pad stage go (design.md item 40)."""

    shift: int     # pt * Wq + pl: where the consumer's plane puts input (0, 0)
    plane: int     # the consumer's channel_plane
    channels: int  # the consumer's padded channels (GatheredPlan.channels)
    oh: int
    ow: int
    wq: int

    def fits(self, q: int, k: int) -> bool:
        """Whether a domain of q positions, K rows, writes within the buffer and spills (thrown-away lanes past
        the plane, shift + q - plane of them) only onto the next plane's leading padding (shift bytes): q <= plane,
        and a plane past K for the last row's spill."""
        return q <= self.plane and self.channels > k


def quantize_lanes(v, act: ActQuant, lanes: int, relu: bool = False):
    """uint8x`lanes` of float32x`lanes` v in `act`: sparse_int8.quantize on a vector expression."""
    return quantize(v, act, relu, lanes)


def row_store(out: WriteBack, q: int, lanes: int):
    """A macro storing one vector of a row's values: store(cf, rf, at, p, acc, comp, scale, bias), at the row's
    first output in cf (and, with a residual, in rf), p the vector's first position in the domain. Where the row
    is the output map (out.positions) and the domain runs past it, a vector past its end is not written and the
    one across it only in part (its residual read in part), so a row never spills into the next."""
    from tvm.script import tirx as T

    size = out.positions
    tail = size % lanes

    def res(rf, at, width):  # the residual's lanes from `at` (width of them, repeated to fill the vector)
        if not out.residual:
            return None
        if width == 1:
            return T.Broadcast(rf[at], lanes)
        part = rf[T.Ramp(at, 1, width)]
        return part if width == lanes else T.Shuffle([part] * -(-lanes // width), list(range(lanes)))

    def cut_lanes(value):  # the tail's lanes of a vector value (one lane: a scalar)
        return T.Shuffle([value], list(range(tail)))

    def whole(rf, at, p, acc, comp, scale, bias):
        return out.value(acc, comp, scale, bias, lanes, res(rf, at + p, lanes))

    @T.macro
    def store(cf, rf, at, p, acc, comp, scale, bias):
        cf[T.Ramp(at + p, 1, lanes)] = whole(rf, at, p, acc, comp, scale, bias)

    @T.macro
    def cut(cf, rf, at, p, acc, comp, scale, bias):
        if p + lanes <= size:
            cf[T.Ramp(at + p, 1, lanes)] = whole(rf, at, p, acc, comp, scale, bias)

    @T.macro
    def cut_tail(cf, rf, at, p, acc, comp, scale, bias):
        if p + lanes <= size:
            cf[T.Ramp(at + p, 1, lanes)] = whole(rf, at, p, acc, comp, scale, bias)
        elif p < size:
            cf[T.Ramp(at + p, 1, tail) if tail > 1 else at + p] = cut_lanes(
                out.value(acc, comp, scale, bias, lanes, res(rf, at + p, tail)))

    return store if not size or size == q else cut_tail if tail else cut


def crop_domain(n: int, k: int, q: int, oh: int, ow: int, wq: int, dtype: str) -> tirx.PrimFunc:
    """[N, K, q] (a padded-planes layer's outputs over its domain, the epilogue applied in the write-back) ->
    [N, K, OH, OW]: row y's OW outputs from y * Wq, one vector copy a row. Where the kernel wrote int32 sums for
    an epilogue pass, that pass moved 4 bytes a position twice (resnet50's stem: 3.3 MB)."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def crop(x: T.Buffer((n, k, q), dtype), out: T.Buffer((n, k, oh, ow), dtype)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})  # opaque: never fused
        with T.sblock("root"):
            xf = T.decl_buffer((n * k * q,), dtype, data=x.data)
            of = T.decl_buffer((n * k * oh * ow,), dtype, data=out.data)
            for b in T.parallel(n * k):  # (image, channel)
                for y in range(oh):
                    of[T.Ramp((b * oh + y) * ow, 1, ow)] = xf[T.Ramp(b * q + y * wq, 1, ow)]

    return crop.without_attr("global_symbol")


def write_layout(out: WriteBack, q: int, k: int, tile: int, tiles: int) -> tuple:
    """(pitch, plane, at0, padding) of gathered_conv's output: row r of image i at (i * pitch + r) * plane + at0;
    padding the macro that writes the zero point where the output is the next layer's padded planes, else None."""
    if out.into is None:
        return k, out.positions or q, 0, None
    return out.into.channels, out.into.plane, out.into.shift, planes_padding(out, q, k, tile, tiles)


def planes_padding(out: WriteBack, q: int, k: int, tile: int, tiles: int):
    """A macro for gathered_conv's write-back into the next layer's planes (cf flat, b the (image, row tile)):
    the zero point over each of the tile's planes' padding, and the image's planes past K after its last tile.
    After the rows' own stores, so that the thrown-away lanes written there are overwritten."""
    from tvm.script import tirx as T

    into = out.into
    assert into.fits(q, k) and out.out_act is not None and tile * tiles == k
    zp, pitch, plane, shift = T.uint8(out.out_act.zero_point), into.channels, into.plane, into.shift
    gap = into.wq - into.ow  # a row's thrown-away columns: its right padding and the next row's left
    tail_at = shift + (into.oh - 1) * into.wq + into.ow  # past the last output: the bottom padding
    tail = max(plane, shift + q) - tail_at  # and the thrown-away lanes, onto the next plane's head
    pstep = min(64, plane)
    pfill = -(-plane // pstep)

    @T.macro
    def padding(cf, b):
        for r in range(tile):
            base = (b // tiles * pitch + b % tiles * tile + r) * plane
            cf[T.Ramp(base, 1, shift)] = T.Broadcast(zp, shift)
            for y in range(into.oh - 1):
                cf[T.Ramp(base + shift + y * into.wq + into.ow, 1, gap)] = T.Broadcast(zp, gap)
            cf[T.Ramp(base + tail_at, 1, tail)] = T.Broadcast(zp, tail)
        if b % tiles == tiles - 1:  # the consumer's channels past K: all zero point
            for c in range(pitch - k):
                for i in range(pfill):
                    cf[T.Ramp((b // tiles * pitch + k + c) * plane + T.min(i * pstep, plane - pstep), 1, pstep)] = \
                        T.Broadcast(zp, pstep)

    return padding

"""How an int8 quads conv's input reaches its quad layout (llvm): in the kernel's pad stage, which writes one
byte at a time, or ahead of the kernel by a byte shuffle (ops.quad_relay.quad_relay, quad_relay_strided)
from uint8 planes [N, C, H, W]: a chained int8 producer's output, or an fp32 input quantised into such planes
first (quantize_channels; a stem: vgg16-cifar's 3-channel 32x32, resnet50's 224x224 7x7/2)."""

from __future__ import annotations

import dataclasses
from functools import partial

from tvm import relax

from unsparse_tvm.ops import quad_relay as relay_ops
from unsparse_tvm.ops import sparse_int8 as int8_ops
from unsparse_tvm.ops.int8_formats import QUAD, quad_channels
from unsparse_tvm.schedules.sparse_conv2d_int8_cpu import map_parts

from ._util import dtype_of, shape_of

QUAD_RELAY_STRIDED = True  # a strided conv's uint8 input into phase planes of quads by a byte shuffle
# an fp32 input quantised to uint8 planes, then relayed: its pad stage gathered 4 channels lane by lane and
# quantised them one at a time (scalar): resnet50 95% channel4's stem 0.35 -> 0.26 ms with the two new kernels
QUANTIZE_FIRST = True
# a uint8 4x4 map's patches (a 4x4 3x3's input) by one byte permute per channel quad and tap (VBMI), where the pad
# stages built each quad byte by byte (vgg16-cifar channel4's 512-channel 4x4 layers: 7.9 us each, one thread)
QUAD_RELAY_PATCHES = True
# a 2x2 map's padded plane of 16 quads by one byte shuffle per channel quad (any x86): its pad stage ran 2064
# statements, a two-thread launch for 0.4 us of work (vgg16-cifar channel4's 2x2 layers)
QUAD_RELAY_SMALL = True


def relays(run, geo, x_shape=None, sub=(1, 1)) -> bool:
    """Whether a conv's uint8 input goes into quads through relay_ops.quad_relay (a byte shuffle) instead of
    its pad stage (llvm): a conv computed at stride 1 (a stride-1 conv, padded or not, or a strided 1x1 on its
    subsampled input), C a multiple of 4, input rows of at least one 16-position step; a subsampled row's
    last step loads up to column s*OW - 1, so the row must be whole steps of s (else it reads past the end).
    Given x's shape, also a plane laid out as the quads' of 16 positions or more in all (relay_ops.flat_plane:
    14x14 and 7x7 1x1s; never a wide 3-D input)."""
    if tuple(run.stride) != (1, 1) or geo.c % QUAD:
        return False
    return ((run.w >= 16 and (tuple(geo.stride) == (1, 1) or run.w * geo.stride[1] == geo.w))
            or relay_ops.flat_plane(x_shape, run, sub))


def relays_strided(run, geo, sub, x_shape) -> bool:
    """Whether a strided conv's uint8 input [N, C, H, W] goes into its phase planes of quads through
    relay_ops.quad_relay_strided (it may still decline: phase planes under 4 positions wide): equal strides,
    several taps, read at its own stride (not a subsampled 1x1), C a multiple of 4. QUAD_RELAY_STRIDED off:
    the pad stage, which inserts one byte at a time (tests compare the two)."""
    return (QUAD_RELAY_STRIDED and tuple(run.stride) == tuple(geo.stride) and geo.stride[0] == geo.stride[1] > 1
            and tuple(sub) == (1, 1) and geo.r * geo.s > 1 and geo.c % QUAD == 0 and not run.patches
            and x_shape is not None and len(x_shape) == 4)


def quantized_first(run, geo, sub, x_shape) -> bool:
    """Whether an fp32 input [N, C, H, W] is quantised to uint8 planes (C padded to whole quads) and relayed:
    where a relay takes such planes (patches, cut from a padded plane by the kernel, keep the pad stage)."""
    if not QUANTIZE_FIRST or run.patches or x_shape is None or len(x_shape) != 4:
        return False
    qgeo, ushape = _padded(geo, x_shape)
    return relays(run, qgeo, ushape, sub) or (relays_strided(run, qgeo, sub, ushape)
                                              and relay_ops.strided_relay_step(run) is not None)


def _padded(geo, x_shape) -> tuple:
    c4 = quad_channels(geo.c) * QUAD
    return dataclasses.replace(geo, c=c4), (int(x_shape[0]), c4, int(x_shape[2]), int(x_shape[3]))


def conv_input(builder: relax.BlockBuilder, x: relax.Expr, geo, run, sub, act, quads: int, pitch: int,
               lanes: int, vbmi: bool = False) -> relax.Expr:
    """x as the int8 conv reads it (llvm): its quads [N, quads * channel_plane, 4] by a relay where one takes
    it (an fp32 x quantised first), else x itself for the kernel's pad stage. pitch: a wide producer's row
    pitch (0: x's own rows); lanes: the target's int8 lanes (a relay splits its planes as the conv its map);
    vbmi: the target permutes bytes across a 64-byte vector (a 4x4 map's patches in one vpermt2b a tap)."""
    if dtype_of(x) == "float32" and quantized_first(run, geo, sub, shape_of(x)):
        geo, _ = _padded(geo, shape_of(x))
        x = builder.emit_te(partial(int8_ops.quantize_channels, act=act, channels=geo.c), x,
                            primfunc_name_hint="quantize_q")
    if dtype_of(x) != "uint8":
        return x
    args, name = [x], "quad_relay"
    if QUAD_RELAY_PATCHES and vbmi and relay_ops.relays_patches(shape_of(x), run):
        relay = relay_ops.quad_relay_patches(tuple(shape_of(x)), run, quads, act.zero_point)
        picks = relay_ops.patch_picks(run, *(int(d) for d in shape_of(x)[2:]))  # its byte permutes, an argument
        args, name = [x, relax.const(picks)], "quad_relay_patches"
    elif QUAD_RELAY_SMALL and relay_ops.relays_small_plane(shape_of(x), run):
        relay = relay_ops.quad_relay_small_plane(tuple(shape_of(x)), run, quads, act.zero_point)
    elif relays(run, geo, shape_of(x), sub):
        relay = relay_ops.quad_relay(tuple(shape_of(x)), run, quads, act.zero_point, sub, pitch,
                                     parts=map_parts(run.q_extent, lanes))
    elif relays_strided(run, geo, sub, shape_of(x)):
        relay = relay_ops.quad_relay_strided(tuple(shape_of(x)), run, quads, act.zero_point)
    else:
        return x
    if relay is None:
        return x
    shape = [geo.n, quads * run.channel_plane, QUAD]
    return builder.emit(relax.call_tir(builder.add_func(relay, name), args, relax.TensorType(shape, "uint8")))

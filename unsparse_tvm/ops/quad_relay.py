"""The byte relays: uint8 planes [N, C, H, W] (a previous int8 layer's requantised output, or an fp32 input
quantised to planes first) into the quad layout an int8 conv reads (sparse_int8.pad_quantize's, [N, quads *
channel_plane, 4]), by byte shuffles, ahead of the conv instead of in its pad stage (one byte at a time).
TVMScript kernels, opaque to Relax's fusion (op_pattern 8); relay_passes._quad_inputs decides which conv takes one.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from tvm import tirx

from .geometry import ConvGeometry
from .int8_formats import QUAD


def flat_plane(x_shape: tuple | None, run: ConvGeometry, subsample: tuple[int, int] = (1, 1), pitch: int = 0) -> bool:
    """Whether a uint8 x [N, C, H, W] and the quads of the stride-1 conv `run` lay each channel's positions out
    alike (no padding, no subsampling, no patches, x's rows back to back): quad_relay then runs each plane as
    one row, which needs 16 positions in all rather than in each row."""
    return (x_shape is not None and len(x_shape) == 4 and tuple(subsample) == (1, 1) and pitch in (0, int(x_shape[3]))
            and not run.patches and run.hq * run.wq == run.h * run.w == int(x_shape[2]) * int(x_shape[3])
            and run.wq == run.w and run.h * run.w >= 16)


@dataclasses.dataclass(frozen=True)
class _Parts:
    """A relay's map in `count` parts, thread t taking part t of every plane as the conv reading it does
    (sparse_conv2d_int8_cpu.map_parts decides): a plane's rows (each part's map rows, and the padding rows above
    them for its zero-point fill), or a flat plane's 16-position steps. Expressions of the task index t (part
    t // tasks), as quad_relay's script needs them."""
    count: int
    tasks: int     # (image, channel quad) tasks of one part
    rows: int      # map rows a part covers (flat: the one row)
    steps: int     # 16-position steps a part covers in a row
    edges: tuple   # each part's first plane row (flat: position), then the plane's end
    unit: int      # positions a plane row (flat: 1)
    flat: bool
    map_rows: int

    @classmethod
    def of(cls, run: ConvGeometry, rows: int, cols: int, wq: int, tasks: int, count: int) -> "_Parts":
        steps, pt, plane = (cols + 15) // 16, run.padding[0], run.hq * run.wq
        if rows == 1:  # flat: the steps in parts
            per = -(-steps // count)
            edges = (*(min(i * per * 16, plane) for i in range(count)), plane)
            return cls(count, tasks, 1, per, edges, 1, True, 1)
        per = -(-rows // count)
        edges = (0, *(pt + i * per for i in range(1, count)), plane // wq)
        return cls(count, tasks, per, steps, edges, wq, False, rows)

    @property
    def widest(self) -> int:  # bytes of the largest part of a plane
        return max(b - a for a, b in zip(self.edges, self.edges[1:])) * self.unit * QUAD

    def edge(self, i):  # part i's first byte in a plane
        expr = tirx.const(self.edges[-1], "int32")
        for e in range(self.count - 1, -1, -1):
            expr = tirx.Select(i == e, tirx.const(self.edges[e], "int32"), expr)
        return expr * self.unit * QUAD

    def row(self, t, y):  # task t's map row y (the last part's surplus rows rewrite its last row)
        return y if self.flat else tirx.min(t // self.tasks * self.rows + y, self.map_rows - 1)

    def step(self, t, k):  # task t's k-th step in a row (past the row's end: its last step again, x0 clamps)
        return t // self.tasks * self.steps + k if self.flat else k


def quad_relay(x_shape: tuple, run: ConvGeometry, quads: int, zero_point: int,
               subsample: tuple[int, int] = (1, 1), pitch: int = 0, into: tuple[int, int] = (0, 0),
               parts: int = 1) -> tirx.PrimFunc:
    """uint8 x [N, C, H, W] (the previous layer requantised it) -> pad_quantize's quad layout for the stride-1
    conv `run`: [N, quads * Hq*Wq, 4], padding and trailing quads at the zero point, input row y read at x row
    y*sy, column x at x*sx (a strided 1x1 read in place). Per step 16 positions of 4 channel planes, one byte
    shuffle (LLVM: vpunpck*) into one 64-byte store; a row's last step shifted back to end at the row's end, so
    W >= 16, or H*W >= 16 where x's plane is laid out as the quads' (flat_plane: one row). Zero point first the
    same way. (The pad stage: one vpinsrb a byte, 256 channels on 56x56 ~160 us; this 41.) C % 4 == 0. A 3-D x
    [N, C, P]: a producer's wide output, rows `pitch` apart. into (first, total): into quads first.. of `total`
    an image (a pair's joined input; another relay writes the rest). parts: a large map in parts, thread t
    writing part t (_Parts), as the conv reading it splits its map (sparse_conv2d_int8_cpu.map_parts)."""
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

    (first, total), part = into if into[1] else (0, quads), _Parts.of(run, rows, cols, wq, n * quads, parts)

    def dst(b):  # quad b's first output position
        return (b // quads * total + first + b % quads) * plane

    def src(b, y, k):  # its first byte in channel plane 0 of quad b
        return (b // quads * cq + b % quads) * QUAD * h * w + y * sy * pitch + x0(k) * sx

    def fill(t, k):  # task t's k-th 64 bytes of zero point in its part of its plane (the last shifted back)
        first_byte, end = part.edge(t // part.tasks), part.edge(t // part.tasks + 1)
        return dst(t % part.tasks) * QUAD + tirx.min(first_byte + k * 64, end - 64)

    # (x0 and src as expressions, not names bound in the script: TVMScript makes a bound name a buffer, which
    # the parallel loop allocated from the workspace pool twice per quad: 7x7 relays ran 2-3x slower)
    @T.prim_func(s_tir=True)  # a root block: Relax analyses (AnnotateTIROpPattern) expect one
    def relay(x: T.Buffer(x_dims, "uint8"), q: T.Buffer((n, total * plane, QUAD), "uint8")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})  # opaque: never fused
        with T.sblock("root"):
            qf = T.decl_buffer((n * total * plane * QUAD,), "uint8", data=q.data)
            xf = T.decl_buffer((n * c * h * w,), "uint8", data=x.data)
            for t in T.parallel(part.count * part.tasks):  # (part of the map, image, channel quad)
                if padded or t % quads >= cq:  # padding, or a trailing quad: the zero point first (this part's)
                    for k in range((part.widest + 63) // 64):
                        qf[T.Ramp(fill(t, k), 1, 64)] = T.Broadcast(zp, 64)
                if t % quads < cq:
                    for y, k in T.grid(part.rows, part.steps):
                        qf[T.Ramp((dst(t % part.tasks) + (part.row(t, y) + pt) * wq + pl + x0(part.step(t, k))) * QUAD,
                                  1, 16 * QUAD)] = T.Shuffle(
                            [xf[T.Ramp(src(t % part.tasks, part.row(t, y), part.step(t, k)) + v * h * w, 1, span)]
                             for v in range(QUAD)], pick)

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


PATCH_PLANE = 16  # quad_relay_patches: a channel's input plane and its patches' positions (a 4x4 map)


def relays_patches(x_shape: tuple | None, run: ConvGeometry) -> bool:
    """Whether quad_relay_patches writes the patches of the stride-1 conv `run` (ConvGeometry.with_patches, one
    image a patch) from uint8 x [N, C, H, W]: H*W and OH*OW both 16 (4 channels' planes in one 64-byte load, a
    tap's 16 positions of them in one 64-byte store), C % 4 == 0."""
    return (x_shape is not None and len(x_shape) == 4 and run.patches and run.images == 1
            and tuple(run.stride) == (1, 1) and int(x_shape[2]) * int(x_shape[3]) == PATCH_PLANE
            and run.oh * run.ow == run.q_extent == PATCH_PLANE and int(x_shape[1]) % QUAD == 0)


def patch_picks(run: ConvGeometry, h: int, w: int) -> np.ndarray:
    """[R*S, 64] uint8: per tap, the byte each of its 64 (position q, channel v) lanes takes from 4 channel planes
    of h*w bytes side by side (v * 16 + y * w + x), or 64 (the zero point's vector) where the tap reads padding."""
    (dh, dw), (pt, pl) = run.dilation, run.padding[:2]
    picks = []
    for tap in range(run.r * run.s):
        lanes = []
        for q in range(run.q_extent):
            y, x = q // run.ow + tap // run.s * dh - pt, q % run.ow + tap % run.s * dw - pl
            lanes += [v * PATCH_PLANE + y * w + x if 0 <= y < h and 0 <= x < w else QUAD * PATCH_PLANE
                      for v in range(QUAD)]
        picks.append(lanes)
    return np.array(picks, np.uint8)


def quad_relay_patches(x_shape: tuple, run: ConvGeometry, quads: int, zero_point: int) -> tirx.PrimFunc:
    """uint8 x [N, C, H, W], H*W = 16 -> the patches of the stride-1 conv `run` as sparse_int8._quad_patches lays
    them out ([N, quads * R*S*16, 4]: per channel quad and tap, the 16 output positions' input quads, the zero
    point where the tap reads padding and in quads past C). Per channel quad one 64-byte load (4 channels' whole
    planes) and per tap one byte permute of it and the zero point (AVX-512 VBMI's vpermt2b, its indices
    patch_picks: the kernel's second argument, [R*S, 64]) and one 64-byte store, where the kernel's pad stage built
    each quad byte by byte into a padded plane and cut the patches from it (vgg16-cifar's 512-channel 4x4 layers:
    7.9 us each on one thread). relays_patches says where; VBMI targets only."""
    from tvm.script import tirx as T

    n, c, h, w = (int(d) for d in x_shape)
    cq, taps, span = c // QUAD, run.r * run.s, QUAD * PATCH_PLANE
    zp = tirx.const(zero_point, "uint8")
    permute = T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpermi2var.qi.512")

    @T.prim_func(s_tir=True)
    def relay(x: T.Buffer((n, c, h, w), "uint8"), picks: T.Buffer((taps, span), "uint8"),
              q: T.Buffer((n, quads * taps * PATCH_PLANE, QUAD), "uint8")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})  # opaque: never fused
        with T.sblock("root"):
            qf = T.decl_buffer((n * quads * taps * span,), "uint8", data=q.data)
            xf = T.decl_buffer((n * c * h * w,), "uint8", data=x.data)
            pf = T.decl_buffer((taps * span,), "uint8", data=picks.data)
            for b in T.parallel(n * quads):  # (image, channel quad)
                for tap in range(taps):
                    if b % quads < cq:
                        qf[T.Ramp((b * taps + tap) * span, 1, span)] = T.call_llvm_pure_intrin(
                            permute, xf[T.Ramp((b // quads * cq + b % quads) * span, 1, span)],
                            pf[T.Ramp(tap * span, 1, span)], T.Broadcast(zp, span), dtype=f"uint8x{span}")
                    else:  # a trailing quad: the zero point
                        qf[T.Ramp((b * taps + tap) * span, 1, span)] = T.Broadcast(zp, span)

    return relay.without_attr("global_symbol")


def relays_small_plane(x_shape: tuple | None, run: ConvGeometry) -> bool:
    """Whether quad_relay_small_plane writes the padded plane of the stride-1 conv `run` from uint8 x [N, C, H, W]:
    a plane of 16 positions (a 2x2 map padded to 4x4), 4 channels' maps in at most 16 bytes, C % 4 == 0."""
    return (x_shape is not None and len(x_shape) == 4 and not run.patches and tuple(run.stride) == (1, 1)
            and run.channel_plane == run.hq * run.wq == PATCH_PLANE and int(x_shape[1]) % QUAD == 0
            and QUAD * int(x_shape[2]) * int(x_shape[3]) <= PATCH_PLANE and not run.row_domain)


def quad_relay_small_plane(x_shape: tuple, run: ConvGeometry, quads: int, zero_point: int) -> tirx.PrimFunc:
    """uint8 x [N, C, H, W] -> the padded plane of quads the stride-1 conv `run` reads, where it is 16 positions
    (pad_quantize's layout, [N, quads * 16, 4]): per channel quad one load of its 4 channels' maps (4*H*W <= 16
    bytes) and one byte shuffle of it and the zero point into the 64-byte plane, one store; trailing quads the zero
    point. vgg16-cifar's 2x2 layers' pad stages built each quad byte by byte, 2064 statements: over the small-loop
    limit, so a two-thread launch (1.4-3.6 us) for 0.4 us of work; this one runs serial (129 stores)."""
    from tvm.script import tirx as T

    n, c, h, w = (int(d) for d in x_shape)
    cq, span, hw = c // QUAD, QUAD * PATCH_PLANE, h * w
    (pt, pl), zp = run.padding[:2], tirx.const(zero_point, "uint8")
    picks = []
    for p in range(PATCH_PLANE):  # lane 4p + v: plane position p of channel v (past the input: the zero point)
        y, x = p // run.wq - pt, p % run.wq - pl
        picks += [v * hw + y * w + x if 0 <= y < h and 0 <= x < w else QUAD * hw for v in range(QUAD)]

    @T.prim_func(s_tir=True)
    def relay(x: T.Buffer((n, c, h, w), "uint8"), q: T.Buffer((n, quads * PATCH_PLANE, QUAD), "uint8")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})  # opaque: never fused
        with T.sblock("root"):
            qf = T.decl_buffer((n * quads * span,), "uint8", data=q.data)
            xf = T.decl_buffer((n * c * hw,), "uint8", data=x.data)
            for b in T.parallel(n * quads):  # (image, channel quad)
                if b % quads < cq:
                    qf[T.Ramp(b * span, 1, span)] = T.Shuffle(
                        [xf[T.Ramp((b // quads * cq + b % quads) * QUAD * hw, 1, QUAD * hw)],
                         T.Broadcast(zp, span)], picks)  # (a shuffle picks at most the lanes it is given)
                else:  # a trailing quad: the zero point
                    qf[T.Ramp(b * span, 1, span)] = T.Broadcast(zp, span)

    return relay.without_attr("global_symbol")

"""TE definitions of the operators the passes substitute: sparse direct conv2d, sparse dense (linear),
and, for llvm, a dense direct conv2d sharing the same flat-input formulation.

Every operator is three stages, named so that schedules can find them:
  "pad_flat"   zero-padded input, split into stride phases and flattened to [N, Cx*sh*sw*Hq*Wq]
               (Cx >= C: trailing zero channels keep the extended reads of the flat domain in bounds)
  "conv"       the reduction ([N, K, Q]; [N, G, V, Q] for grouped rows); "conv_ovf" is hyb's overflow
  "epilogue"   output cropping, hyb gather, bias, residual add and activation, fused in one elementwise stage
"conv" is computed over the flat extended domain q = y*Wq + x ([N, K, Q]), strided convs included (their
input is stored phase by phase). See formats.ConvGeometry.
"""

from __future__ import annotations

from tvm import te, tirx

from .geometry import ConvGeometry
from .fast_math import fast_sigmoid, fast_silu

F32_ZERO = tirx.const(0.0, "float32")


def pad_flat(x: te.Tensor, geo: ConvGeometry) -> te.Tensor:
    """[N, C, H, W] -> [N, Cx*sh*sw*Hq*Wq], zero padded, phase planes of each channel in (ph, pw) order;
    schedules split the flat axis back into (c, phase*Hq + row, column)."""
    (sh, sw), (pt, pl, _, _) = geo.stride, geo.padding
    phase_plane = geo.hq * geo.wq
    if geo.patches:
        return _patches(x, geo)

    def value(n, i):
        c, rest = i // geo.channel_plane, i % geo.channel_plane
        if sh == 1 and sw == 1:  # one phase: no phase div/mod in the index (as in ConvGeometry.tap_offset)
            h, w = rest // geo.wq - pt, rest % geo.wq - pl
        else:
            phase, hh, ww = rest // phase_plane, rest % phase_plane // geo.wq, rest % geo.wq
            h, w = hh * sh + phase // sw - pt, ww * sw + phase % sw - pl
        inside = tirx.all(c < geo.c, h >= 0, h < geo.h, w >= 0, w < geo.w)
        return tirx.if_then_else(inside, x[n, c, h, w], F32_ZERO)

    return te.compute((geo.n, geo.pad_channels * geo.channel_plane), value, name="pad_flat")


def _patches(x: te.Tensor, geo: ConvGeometry) -> te.Tensor:
    """[N, C, H, W] -> [N, C*R*S*Q]: per input channel and tap, the Q = OH*OW input values that tap reads for
    outputs q = y*OW + x, zero where it reads padding (ConvGeometry.with_patches). Cut from the zero-padded
    plane ("pad_plane"), so the copy has no bounds test and each output row is one contiguous slice."""
    (sh, sw), (dh, dw), (pt, pl, _, _) = geo.stride, geo.dilation, geo.padding

    def padded(n, c, h, w):
        inside = tirx.all(h >= pt, h < geo.h + pt, w >= pl, w < geo.w + pl)
        return tirx.if_then_else(inside, x[n, c, h - pt, w - pl], F32_ZERO)

    plane = te.compute((geo.n, geo.c, geo.hp, geo.wp), padded, name="pad_plane")
    per_image = geo.oh * geo.ow

    def value(n, i):
        c, tap, q = i // geo.channel_plane, i % geo.channel_plane // geo.q_extent, i % geo.q_extent
        if geo.images > 1:  # images side by side (ConvGeometry.images): patch position q of image n*m + q // OH*OW
            n, q = n * geo.images + q // per_image, q % per_image
        return plane[n, c, q // geo.ow * sh + tap // geo.s * dh, q % geo.ow * sw + tap % geo.s * dw]

    return te.compute((geo.batch, geo.c * geo.channel_plane), value, name="pad_flat")


def widen_offset(offset: tirx.PrimExpr) -> tirx.PrimExpr:
    """A stored offset as int32 (formats.compact_offsets may have stored it as uint16)."""
    return offset if offset.dtype == "int32" else offset.astype("int32")


def row_entry(t: te.Tensor, k, j, tile: int, *rest):
    """Entry j of row k of sparse rows stored in order ([K, L, ...], tile 0) or by row tiles of `tile` rows
    ([K/T, L, T, ...], formats.interleave_rows); `rest` indexes trailing axes (an int8 quad's weight)."""
    return t[(k // tile, j, k % tile, *rest) if tile else (k, j, *rest)]


def flat_offset(geo: ConvGeometry, offset: tirx.PrimExpr) -> tirx.PrimExpr:
    """A stored offset as a flat input position (ConvGeometry.offset_unit: patches store patch numbers)."""
    unit = geo.offset_unit
    return widen_offset(offset) * unit if unit > 1 else widen_offset(offset)


def read_position(geo: ConvGeometry, q):
    """The input position flat index q reads: q itself; in a row domain (ConvGeometry.with_row_domain) output
    row q // OW at input pitch Wq; in an overlapped domain (with_overlap) a vector past the map's last whole
    one shifted back to end at its last position. Each vector stays one contiguous load."""
    if geo.row_domain:  # output row y at input pitch Wq (ConvGeometry.with_row_domain)
        return tirx.floordiv(q, geo.ow) * geo.wq + tirx.floormod(q, geo.ow)
    if not geo.overlap:
        return q
    lane = tirx.floormod(q, geo.overlap)
    return tirx.min(q - lane, geo.oh * geo.ow - geo.overlap) + lane


def _read_flat(geo: ConvGeometry, idx, read):
    """read(n, q) at the conv stage's image and flat index of output idx: (n, k, y, x) -> n, y*Wq + x (images
    side by side in patches: n // m, (n % m)*OH*OW + y*OW + x); in an overlapped domain, whose epilogue is
    flat, (n, k, p) -> the first flat index that computed p (ConvGeometry.read_split; both reads stay in
    bounds, so the select vectorises)."""
    n = idx[0]
    if not geo.overlap:
        q = idx[2] * (geo.ow if geo.row_domain or geo.patches else geo.wq) + idx[3]
        if geo.images > 1:
            n, q = n // geo.images, n % geo.images * (geo.oh * geo.ow) + q
        return read(n, q)
    split, shift = geo.read_split
    p = idx[2]
    return tirx.Select(p < split, read(n, p), read(n, p + shift))


def output_shape(geo: ConvGeometry) -> tuple:
    """[N, K, OH, OW], or [N, K, OH*OW] for an overlapped domain (the pass reshapes it back, a view): a flat
    epilogue indexes without the division by OW that vectorised badly."""
    if geo.overlap:
        return (geo.n, geo.k, geo.oh * geo.ow)
    return (geo.n, geo.k, geo.oh, geo.ow)


def gate_stage(g: te.Tensor, sigmoid: bool) -> te.Tensor:
    """[N, C] per-image channel scales from a gate g [N or 1, C, 1, 1] (squeeze-excitation's), through the
    sigmoid where the graph had one: computed once per call, before the rows read it."""
    return te.compute((g.shape[0], g.shape[1]),
                      lambda n, c: fast_sigmoid(g[n, c, 0, 0]) if sigmoid else g[n, c, 0, 0], name="gate")


def _row_conv(xf: te.Tensor, data: te.Tensor, off: te.Tensor, geo: ConvGeometry, name: str,
              gate: te.Tensor | None = None) -> te.Tensor:
    """conv[n, k, q] = sum_j data[k, j] * xf[n, off[k, j] + q]; data and off [K, L], or interleaved by
    row tiles of T rows ([K/T, L, T], formats.interleave_rows): entry j of row k at [k // T, j, k % T]."""
    tile = int(data.shape[2]) if len(data.shape) == 3 else 0
    rows, width = int(data.shape[0]) * max(tile, 1), int(data.shape[1])
    j = te.reduce_axis((0, width), name="j")

    def at(t, k):
        return row_entry(t, k, j, tile)

    def weight(n, k):
        """The weight of entry j of row k; with a gate (a 1x1 conv's input scaled per channel, x * g), the
        weight times its input channel's scale: W (g x) = (W diag(g)) x, one multiply per stored weight
        instead of a pass over the whole input."""
        if gate is None:
            return at(data, k)
        channel = tirx.min(tirx.floordiv(widen_offset(at(off, k)), geo.channel_plane), geo.c - 1)
        return at(data, k) * gate[n if int(gate.shape[0]) > 1 else 0, channel]

    return te.compute(
        (geo.batch, rows, geo.q_extent),
        lambda n, k, q: te.sum(weight(n, k) * xf[n, flat_offset(geo, at(off, k)) + read_position(geo, q)], axis=j),
        name=name,
    )


def _grouped_conv(xf: te.Tensor, data: te.Tensor, off: te.Tensor, geo: ConvGeometry) -> te.Tensor:
    """Grouped rows (vellV): conv[n, g, v, q] = sum_j data[g, j, v] * xf[n, off[g, j] + q]; the V rows of a
    group share each offset, so one input load feeds V products. With row lanes conv[n, g, q, v]."""
    groups, width, v = data.shape
    j = te.reduce_axis((0, width), name="j")
    if geo.row_lanes:  # [N, G, Q, V]: a vector spans positions x the group's rows (ConvGeometry.with_row_lanes)
        return te.compute(
            (geo.batch, groups, geo.q_extent, v),
            lambda n, g, q, r: te.sum(data[g, j, r] * xf[n, flat_offset(geo, off[g, j]) + q], axis=j),
            name="conv",
        )
    return te.compute(
        (geo.batch, groups, v, geo.q_extent),
        lambda n, g, r, q: te.sum(data[g, j, r] * xf[n, flat_offset(geo, off[g, j]) + read_position(geo, q)],
                                  axis=j),
        name="conv",
    )


def _at(t: te.Tensor, geo: ConvGeometry, idx, k=None):
    """Element idx (output index, see _read_flat) of a "conv" stage, at row k if given."""
    row = idx[1] if k is None else k
    return _read_flat(geo, idx, lambda n, q: t[n, row, q])


def epilogue_stage(acc, shape, bias, residual, relu: bool, relu_max: float | None = None,
              silu: bool = False, bounds: te.Tensor | None = None) -> te.Tensor:
    """Bias, residual, then the activation: ReLU, capped at relu_max where set (clip(0, M), ReLU6), or
    SiLU (x * sigmoid(x), on te_math's vectorising exp); with bounds [K, 4] (an expand conv computing phase
    planes, relay_passes/_expand_planes.py) 0 outside output channel k's rows [b0, b1) and columns [b2, b3)."""
    def value(*idx):
        v = _activated(acc, idx, bias, residual, relu, relu_max, silu)
        if bounds is None:
            return v
        k, y, x = idx[1], idx[2], idx[3]
        inside = tirx.all(y >= bounds[k, 0], y < bounds[k, 1], x >= bounds[k, 2], x < bounds[k, 3])
        return tirx.Select(inside, v, F32_ZERO)  # a select: if_then_else with a vector condition scalarises

    return te.compute(shape, value, name="epilogue")


def _activated(acc, idx, bias, residual, relu: bool, relu_max: float | None, silu: bool):
    """Output idx's sum plus bias and residual, through the activation."""
    v = acc(*idx)
    if bias is not None:
        v = v + bias[idx[1]]
    if residual is not None:
        v = v + residual[idx]
    if relu:
        v = tirx.max(v, F32_ZERO)
    if relu_max is not None:
        v = tirx.min(v, tirx.const(relu_max, "float32"))
    if silu:
        v = fast_silu(v)
    return v


def sparse_conv2d(x: te.Tensor, data: te.Tensor, off: te.Tensor, *rest: te.Tensor, geo: ConvGeometry,
                  fmt: str, has_bias: bool, has_residual: bool, relu: bool, relu_max: float | None = None,
                  silu: bool = False, has_gate: bool = False, gate_sigmoid: bool = False,
                  has_row_order: bool = False, has_bounds: bool = False) -> te.Tensor:
    """Direct sparse conv2d. rest = [ovf_data, ovf_off, ovf_slot] (hyb) + [bias] + [residual] + [gate] + [row_of]
    (ell rows stored in another order, formats.length_order: output channel k is stored row row_of[k]) + [bounds]
    (output channel k's rows and columns inside the map, 0 elsewhere: see epilogue_stage);
    fmt "vellV" takes grouped data [G, L, V] and off [G, L] (its "conv" stage is [N, G, V, Q]). A gate
    [N or 1, C, 1, 1] (ell/hyb 1x1 stride-1 convs) scales the input's channels, through a sigmoid with
    gate_sigmoid: the conv of x * sigmoid(g), squeeze-excitation's output, without that product."""
    rest = list(rest)
    ovf = [rest.pop(0) for _ in range(3)] if fmt == "hyb" else None
    bias = rest.pop(0) if has_bias else None
    residual = rest.pop(0) if has_residual else None
    gate = gate_stage(rest.pop(0), gate_sigmoid) if has_gate else None
    row_of = rest.pop(0) if has_row_order else None
    bounds = rest.pop(0) if has_bounds else None
    if bounds is not None and geo.overlap:
        raise ValueError("output bounds need the [N, K, OH, OW] epilogue, not an overlapped domain's flat one")

    def stored(idx):
        """The stored row of output idx's channel (None: rows in order)."""
        return None if row_of is None else row_of[idx[1]]
    xf = x if len(x.shape) == 2 else pad_flat(x, geo)  # 2-D: the pass gave the flat view (geo.input_is_flat)
    if fmt.startswith("vell"):
        if gate is not None:
            raise ValueError("a channel gate is folded into ell/hyb rows only, not grouped (vell) ones")
        conv = _grouped_conv(xf, data, off, geo)
        v = int(data.shape[2])

        def acc(*idx):
            if geo.row_lanes:
                return _read_flat(geo, idx, lambda n, q: conv[n, idx[1] // v, q, idx[1] % v])
            return _read_flat(geo, idx, lambda n, q: conv[n, idx[1] // v, idx[1] % v, q])

        return epilogue_stage(acc, output_shape(geo), bias, residual, relu, relu_max, silu, bounds)
    conv = _row_conv(xf, data, off, geo, "conv", gate)
    if ovf is not None:
        ovf_data, ovf_off, slot = ovf
        conv_ovf = _row_conv(xf, ovf_data, ovf_off, geo, "conv_ovf", gate)

        def acc(*idx):  # the overflow rows stay in output-channel order (slot[k]); the main rows may be sorted
            extra = _at(conv_ovf, geo, idx, tirx.max(slot[idx[1]], 0))
            return _at(conv, geo, idx, stored(idx)) + tirx.if_then_else(slot[idx[1]] >= 0, extra, F32_ZERO)
    else:
        def acc(*idx):
            return _at(conv, geo, idx, stored(idx))

    return epilogue_stage(acc, output_shape(geo), bias, residual, relu, relu_max, silu, bounds)


def dense_conv2d(x: te.Tensor, weight: te.Tensor, *rest: te.Tensor, geo: ConvGeometry,
                 has_bias: bool, has_residual: bool, relu: bool, relu_max: float | None = None,
                 silu: bool = False) -> te.Tensor:
    """Dense direct conv2d over the same flat padded input (llvm's dense layers)."""
    rest = list(rest)
    bias = rest.pop(0) if has_bias else None
    residual = rest.pop(0) if has_residual else None
    xf = pad_flat(x, geo)
    rc = te.reduce_axis((0, geo.c), name="rc")
    rr = te.reduce_axis((0, geo.r), name="rr")
    rs = te.reduce_axis((0, geo.s), name="rs")
    conv = te.compute(
        (geo.n, geo.k, geo.q_extent),
        lambda n, k, q: te.sum(weight[k, rc, rr, rs] * xf[n, geo.tap_offset(rc, rr, rs) + q], axis=[rc, rr, rs]),
        name="conv",
    )
    return epilogue_stage(lambda *idx: _at(conv, geo, idx),
                     (geo.n, geo.k, geo.oh, geo.ow), bias, residual, relu, relu_max, silu)


def sparse_dense(x: te.Tensor, data: te.Tensor, off: te.Tensor, *rest: te.Tensor, fmt: str,
                 has_bias: bool, relu: bool) -> te.Tensor:
    """y[n, o] = sum_j data[o, j] * x[n, off[o, j]] (+ bias, ReLU); x is [N, in]. fmt "vellV": grouped
    rows, data [G, L, V] and off [G, L] (its "conv" stage is [N, G, V])."""
    rest = list(rest)
    ovf = [rest.pop(0) for _ in range(3)] if fmt == "hyb" else None
    bias = rest.pop(0) if has_bias else None
    batch, rows = x.shape[0], data.shape[0]
    if fmt.startswith("vell"):  # grouped rows: mm[n, g, v] over data [G, L, V], off [G, L]
        groups, width, v = data.shape
        j = te.reduce_axis((0, width), name="j")
        mm = te.compute((batch, groups, v), lambda n, g, r: te.sum(data[g, j, r] * x[n, widen_offset(off[g, j])], axis=j),
                        name="conv")
        return epilogue_stage(lambda n, k: mm[n, k // v, k % v], (batch, groups * v), bias, None, relu)

    def rows_mm(d, o, name):
        j = te.reduce_axis((0, d.shape[1]), name="j")
        return te.compute((batch, d.shape[0]), lambda n, k: te.sum(d[k, j] * x[n, widen_offset(o[k, j])], axis=j),
                          name=name)

    mm = rows_mm(data, off, "conv")
    if ovf is not None:
        ovf_data, ovf_off, slot = ovf
        mm_ovf = rows_mm(ovf_data, ovf_off, "conv_ovf")

        def acc(n, k):
            return mm[n, k] + tirx.if_then_else(slot[k] >= 0, mm_ovf[n, tirx.max(slot[k], 0)], F32_ZERO)
    else:
        def acc(n, k):
            return mm[n, k]

    return epilogue_stage(acc, (batch, rows), bias, None, relu)

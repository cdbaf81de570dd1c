"""A vectorised 3x3 stride-2 max pool (padding 1), NCHW: ResNet's stem pool, the one pool that takes time.

TVM's pool is one scalar window per output (schedules/fallback_cpu: 0.28 ms for resnet50's 64 x 112x112 on
one thread with AVX-512 code, 0.47 with AVX2 code; on uint8 LLVM turned the window's maxima into branches,
1.1 ms). Here each output row is two vector passes over data in L1: the max of the three input rows it
reads, `lanes` columns at a time, into a row buffer padded with the lowest value; then the max of each
output column's three neighbours in that buffer, read as two consecutive vectors whose even and odd lanes
a byte shuffle separates (stride-2 loads would be gathers). A vector's last step is shifted back to end at
the row's end (it rewrites a few values with the same result), so rows must be at least `lanes` wide.
"""

from __future__ import annotations

from tvm import tirx


def max_pool_3x3s2(shape: tuple[int, int, int, int], dtype: str, lanes: int, parts: int = 1) -> tirx.PrimFunc:
    """x [N, C, H, W] -> [N, C, OH, OW], OH = (H - 1) // 2 + 1 (padding 1 on each side, -inf / 0 for uint8,
    as max_pool2d pads); W >= lanes and OW >= lanes. parts: the output map in parts of its rows, thread t
    writing part t of every channel, as the kernels after it split theirs (relay_passes.vector_max_pool decides)."""
    from tvm.script import tirx as T

    n, c, h, w = shape
    oh, ow = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    assert w >= lanes and ow >= lanes, (shape, lanes)
    span = 2 * ow + 2 + lanes  # row buffer: [lowest, the row's maxima..., lowest...]; last read ends at 2*ow+2
    low = tirx.min_value(dtype)
    even = [2 * i for i in range(lanes)]
    odd = [2 * i + 1 for i in range(lanes)]

    # every quantity below an expression, not a name bound in the script: TVMScript makes a bound name a buffer,
    # which the parallel loop allocated from the workspace pool (one scalar or vector each, every iteration)
    def x0(k):  # the first column of a row pass's k-th vector (the last one shifted back to end at the row's end)
        return tirx.min(k * lanes, w - lanes)

    def row(xf, b, y, k):  # `lanes` columns of input row y (a row inside the image) of channel b
        return xf[T.Ramp(b * h * w + x0(k) + y * w, 1, lanes)]

    def o0(k):  # the first output column of the column pass's k-th vector
        return tirx.min(k * lanes, ow - lanes)

    def picks(rows, b, k, start: int, pick: list):  # lanes `pick` of the two vectors at row-buffer column 2*o0 + start
        return T.Shuffle([rows[T.Ramp(b * span + 2 * o0(k) + start, 1, 2 * lanes)]], pick)

    tasks = n * c
    part = -(-oh // parts)

    def out_row(t, r):  # task t's r-th output row (the last part's surplus rows recompute its last row)
        return T.min(t // tasks * part + r, oh - 1)

    @T.prim_func(s_tir=True)  # a root block: Relax analyses (AnnotateTIROpPattern) expect one
    def pool(x: T.Buffer((n, c, h, w), dtype), y: T.Buffer((n, c, oh, ow), dtype)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        with T.sblock("root"):
            xf = T.decl_buffer((n * c * h * w,), dtype, data=x.data)
            yf = T.decl_buffer((n * c * oh * ow,), dtype, data=y.data)
            rows = T.sblock_alloc_buffer((parts * tasks * span,), dtype)  # a row buffer per (part, image, channel)
            for t in T.parallel(parts * tasks):
                for r in range(part):
                    for k in range((span + lanes - 1) // lanes):  # all lowest first (padding columns)
                        rows[T.Ramp(t * span + T.min(k * lanes, span - lanes), 1, lanes)] = T.Broadcast(low, lanes)
                    for k in range((w + lanes - 1) // lanes):  # the rows inside the image (padding rows add nothing)
                        rows[T.Ramp(t * span + 1 + x0(k), 1, lanes)] = T.max(
                            T.max(row(xf, t % tasks, T.max(2 * out_row(t, r) - 1, 0), k),
                                  row(xf, t % tasks, 2 * out_row(t, r), k)),
                            row(xf, t % tasks, T.min(2 * out_row(t, r) + 1, h - 1), k))
                    for k in range((ow + lanes - 1) // lanes):  # columns 2*o0 - 1, 2*o0, 2*o0 + 1 (shifted by 1)
                        yf[T.Ramp((t % tasks) * oh * ow + out_row(t, r) * ow + o0(k), 1, lanes)] = T.max(
                            T.max(picks(rows, t, k, 0, even), picks(rows, t, k, 0, odd)), picks(rows, t, k, 2, even))

    return pool.without_attr("global_symbol")

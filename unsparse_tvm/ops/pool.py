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


def max_pool_3x3s2(shape: tuple[int, int, int, int], dtype: str, lanes: int) -> tirx.PrimFunc:
    """x [N, C, H, W] -> [N, C, OH, OW], OH = (H - 1) // 2 + 1 (padding 1 on each side, -inf / 0 for uint8,
    as max_pool2d pads); W >= lanes and OW >= lanes."""
    from tvm.script import tirx as T

    n, c, h, w = shape
    oh, ow = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    assert w >= lanes and ow >= lanes, (shape, lanes)
    span = 2 * ow + 2 + lanes  # row buffer: [lowest, the row's maxima..., lowest...]; last read ends at 2*ow+2
    low = tirx.min_value(dtype)
    even = [2 * i for i in range(lanes)]
    odd = [2 * i + 1 for i in range(lanes)]

    @T.prim_func(s_tir=True)  # a root block: Relax analyses (AnnotateTIROpPattern) expect one
    def pool(x: T.Buffer((n, c, h, w), dtype), y: T.Buffer((n, c, oh, ow), dtype)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        with T.sblock("root"):
            xf = T.decl_buffer((n * c * h * w,), dtype, data=x.data)
            yf = T.decl_buffer((n * c * oh * ow,), dtype, data=y.data)
            rows = T.sblock_alloc_buffer((n * c * span,), dtype)  # one row buffer per (image, channel) task
            for b in T.parallel(n * c):
                r = b * span
                for oy in range(oh):
                    for k in range((span + lanes - 1) // lanes):  # all lowest first (padding columns)
                        rows[T.Ramp(r + T.min(k * lanes, span - lanes), 1, lanes)] = T.Broadcast(low, lanes)
                    top = T.max(2 * oy - 1, 0)  # the rows inside the image (padding rows add nothing)
                    bottom = T.min(2 * oy + 1, h - 1)
                    for k in range((w + lanes - 1) // lanes):
                        x0 = T.min(k * lanes, w - lanes)
                        base = b * h * w + x0
                        m = T.max(xf[T.Ramp(base + top * w, 1, lanes)], xf[T.Ramp(base + (2 * oy) * w, 1, lanes)])
                        rows[T.Ramp(r + 1 + x0, 1, lanes)] = T.max(m, xf[T.Ramp(base + bottom * w, 1, lanes)])
                    for k in range((ow + lanes - 1) // lanes):
                        o0 = T.min(k * lanes, ow - lanes)
                        a = rows[T.Ramp(r + 2 * o0, 1, 2 * lanes)]      # columns 2*o0 - 1 ... (shifted by 1)
                        nxt = rows[T.Ramp(r + 2 * o0 + 2, 1, 2 * lanes)]
                        best = T.max(T.max(T.Shuffle([a], even), T.Shuffle([a], odd)), T.Shuffle([nxt], even))
                        yf[T.Ramp(b * oh * ow + oy * ow + o0, 1, lanes)] = best

    return pool.without_attr("global_symbol")

"""The contract between the rewrite passes and the schedules: which operator a PrimFunc implements.

The passes mark each PrimFunc they emit with `unsparse.op` = one of the names below (`mark` in
relay_passes/_util.py); each schedule rule serves some of these names on one target kind; tuning extracts
tasks by them. Names only, no TVM import beyond the PrimFunc type check."""

from __future__ import annotations

OP_ATTR = "unsparse.op"      # the PrimFunc attribute that carries the name
SCHEDULED = "tirx.is_scheduled"  # TVM's own mark: a scheduled PrimFunc (dlight and our rules leave it alone)
ROW_LENGTHS = "unsparse.row_lengths"  # int8 conv: its offsets off[K, L + 1] end with each row's stored quads
ROW_ORDER = "unsparse.row_order"  # llvm conv (ell, hyb's main rows, int8 quads): rows stored sorted by length,
                                  # output channel k at stored row row_of[k]
STRIDE = "unsparse.stride"   # llvm, a strided conv: [sh, sw], the phase planes its pad stage builds

SPARSE_CONV2D = "sparse_conv2d"
SPARSE_CONV2D_GROUPED = "sparse_conv2d_grouped"   # grouped rows (vellV): rules of their own on x86
SPARSE_CONV2D_INT8 = "sparse_conv2d_int8"
SPARSE_DENSE = "sparse_dense"
SPARSE_DENSE_GROUPED = "sparse_dense_grouped"
SPARSE_DENSE_INT8 = "sparse_dense_int8"
DENSE_CONV2D = "dense_conv2d"                     # the layers left dense: our direct conv
DEPTHWISE_CONV2D = "depthwise_conv2d"             # TVM's grouped/depthwise convs, tagged for our rule
PHASE_PLANES = "phase_planes"                     # a strided depthwise conv's used phase planes (ops/phase_planes)

# the operators `tune` searches (tuning/tasks; the dense conv only with --include-dense), and the ones a tuning
# log's records can schedule (relay_passes/apply_tuning_records counts those); a copy or TVM's own depthwise
# conv is neither
TUNED_OPS = (SPARSE_CONV2D, SPARSE_CONV2D_GROUPED, SPARSE_DENSE, SPARSE_DENSE_GROUPED)
DENSE_TUNED_OPS = (DENSE_CONV2D,)


def sparse_op(kind: str, rows) -> str:
    """The operator name for a conv2d or dense layer packed as `rows` (formats.SparseRows): grouped rows
    (group > 1) have operators of their own."""
    base = {"conv2d": SPARSE_CONV2D, "dense": SPARSE_DENSE}[kind]
    return f"{base}_grouped" if rows.group > 1 else base


def op_of(func) -> str | None:
    """The unsparse operator a PrimFunc implements, or None for anything else."""
    from tvm import tirx

    if not isinstance(func, tirx.PrimFunc) or func.attrs is None or OP_ATTR not in func.attrs:
        return None
    return str(func.attrs[OP_ATTR])


def is_scheduled(func) -> bool:
    return func.attrs is not None and SCHEDULED in func.attrs and bool(func.attrs[SCHEDULED])

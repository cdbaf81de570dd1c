"""Sparse weight formats for the TE operators, built in numpy from a dense (pruned) weight.

Both formats store, for each output row k (an output channel, or a linear layer's output feature),
the row's nonzero values and, instead of column numbers, *offsets into the operator's flat input*:
for a convolution the offset of (c, r, s) in the zero-padded input image (c*Hp*Wp + r*dh*Wp + s*dw),
so the kernel's inner loop is one add and one contiguous load (Park et al., "Faster CNNs with direct
sparse convolutions", ICLR 2017).

- "ell": padded ELLPACK, data[K, L], off[K, L], L = the longest row. Rows shorter than L are padded
  with zero values at offset 0 (a valid address), so no bounds checks are needed.
- "hyb": ELL of width L1 for every row plus an overflow ELL of width L2 holding only the rows longer
  than L1, gathered back by slot[K] (-1 for rows without overflow). Chosen when a few long rows would
  make plain ELL mostly padding; L1 minimises the total padded size.
- "vellV" (V = 2, 4, 8): grouped ELL. Rows k = g*V .. g*V+V-1 share one list of offsets (the union of
  their nonzero columns), off[G, L]; their weights are stored V-contiguous, data[G, L, V] (explicit zeros
  where a row lacks a column). A kernel loads one input vector per stored offset and feeds V
  accumulators with it. What `prune --method vector|block|mixed` produces has no fill-in; chosen where
  the fill-in stays under GROUP_MAX_FILL.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .geometry import ConvGeometry

# hyb only where it saves at least this share of ell's padded size, per target kind. x86: its overflow
# stage is a short second loop, and going from 25% to 5% made vgg16-cifar and ResNet-18 ~9% faster end to
# end (at 90% magnitude pruning ELL pads 12-27%). CUDA: a second kernel launch per layer, so only for
# real outliers (a guess: not yet measured on a GPU).
HYB_MIN_SAVING = {"llvm": 0.05, "cuda": 0.25}
OVF_ROW_MULTIPLE = 8  # hyb's overflow ELL has a multiple of this many rows (padded with empty ones)
GROUPS = (8, 4, 2)    # row group sizes of the grouped format, largest (most reuse) first
# grouped where its stored entries are at most this multiple of the ungrouped format's (ell or hyb): each
# stored entry costs an FMA either way, but ungrouped rows pay ~1.5 loads per FMA and groups of 4 ~0.6
# (x86, 4 vectors per offset), so a little fill-in still wins; unstructured 90% masks fill 1.9x at V = 2
GROUP_MAX_FILL = 1.5


@dataclass
class SparseRows:
    """A sparse matrix in ell or hyb form; offsets already mapped into the operator's input space."""

    fmt: str                      # "ell", "hyb" or "vellV"
    data: np.ndarray              # [K, L] float32 ([G, L, V] for vellV)
    off: np.ndarray               # [K, L] int32 ([G, L] for vellV)
    nnz: int
    shape: tuple[int, int]        # (K, columns) of the logical matrix
    ovf_data: np.ndarray | None = None   # [K2, L2] float32, hyb only
    ovf_off: np.ndarray | None = None    # [K2, L2] int32
    ovf_slot: np.ndarray | None = None   # [K] int32: row of the overflow part, or -1
    row_nnz: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def group(self) -> int:
        """Rows per group: V for "vellV", 1 for ell and hyb."""
        return int(self.fmt[4:]) if self.fmt.startswith("vell") else 1

    @property
    def padded_size(self) -> int:
        size = self.data.size
        if self.ovf_data is not None:
            size += self.ovf_data.size
        return int(size)

    def off_with_lengths(self) -> np.ndarray:
        """offsets_with_lengths of these rows (hyb: of its main ELL part; vellV: per row group)."""
        return offsets_with_lengths(self.data, self.off)

    @property
    def sparsity(self) -> float:
        total = self.shape[0] * self.shape[1]
        return 1.0 - self.nnz / total if total else 0.0


def best_split(row_nnz: np.ndarray) -> tuple[int, int]:
    """(L1, padded size) minimising K*L1 + (#rows longer than L1) * (max - L1)."""
    k, longest = len(row_nnz), int(row_nnz.max(initial=0))
    best = (longest, k * longest)
    for l1 in np.unique(row_nnz):
        l1 = int(l1)
        size = k * l1 + int((row_nnz > l1).sum()) * (longest - l1)
        if size < best[1]:
            best = (l1, size)
    return best


def choose_format(row_nnz: np.ndarray, min_saving: float = HYB_MIN_SAVING["cuda"]) -> str:
    """ell where rows are balanced; hyb where long rows would blow up ell's padding by min_saving."""
    k, longest = len(row_nnz), int(row_nnz.max(initial=0))
    l1, size = best_split(row_nnz)
    if 0 < l1 < longest and size <= (1.0 - min_saving) * k * longest:
        return "hyb"
    return "ell"


def _pack(rows: list[np.ndarray], vals: list[np.ndarray], width: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(width, 1)  # a zero-width reduction is not expressible; one zero entry is harmless
    data = np.zeros((len(rows), width), np.float32)
    off = np.zeros((len(rows), width), np.int32)
    for i, (r, v) in enumerate(zip(rows, vals)):
        data[i, : len(v)] = v
        off[i, : len(r)] = r
    return data, off


def group_width(matrix: np.ndarray, v: int) -> int:
    """Longest union of nonzero columns over the groups of v consecutive rows (the grouped format's L)."""
    k, ncols = matrix.shape
    return int((matrix.reshape(k // v, v, ncols) != 0).any(axis=1).sum(axis=1).max(initial=0))


def choose_group(matrix: np.ndarray, max_fill: float = GROUP_MAX_FILL) -> int:
    """The largest V in GROUPS dividing the rows whose grouped size (K * L_V) stays within max_fill of the
    smaller of ell's and hyb's; 1 where none does."""
    k = matrix.shape[0]
    ungrouped = max(best_split((matrix != 0).sum(axis=1))[1], 1)
    for v in GROUPS:
        if k % v == 0 and k > v and k * max(group_width(matrix, v), 1) <= max_fill * ungrouped:
            return v
    return 1


def _to_grouped_rows(matrix: np.ndarray, col_offset: np.ndarray, v: int, row_nnz: np.ndarray) -> SparseRows:
    k, ncols = matrix.shape
    if k % v:
        raise ValueError(f"grouped format vell{v} needs a multiple of {v} rows, not {k}")
    groups = matrix.reshape(k // v, v, ncols)                    # [G, V, cols]
    width = max(group_width(matrix, v), 1)
    data = np.zeros((k // v, width, v), np.float32)              # [G, L, V]: a group's V weights contiguous
    off = np.zeros((k // v, width), np.int32)                    # [G, L]
    for g in range(k // v):
        cols = np.flatnonzero((groups[g] != 0).any(axis=0))
        data[g, : len(cols)] = groups[g][:, cols].T
        off[g, : len(cols)] = col_offset[cols]
    return SparseRows(f"vell{v}", data, off, int(row_nnz.sum()), (k, ncols), row_nnz=row_nnz)


def to_sparse_rows(matrix: np.ndarray, col_offset: np.ndarray, fmt: str | None = None,
                   min_saving: float = HYB_MIN_SAVING["cuda"]) -> SparseRows:
    """Pack a [K, cols] matrix, mapping column j to input offset col_offset[j]; fmt None: grouped rows
    where choose_group finds groups, else choose_format's ell or hyb."""
    matrix = np.asarray(matrix, np.float32)
    k, ncols = matrix.shape
    assert col_offset.shape == (ncols,)
    row_nnz = (matrix != 0).sum(axis=1).astype(np.int64)
    if fmt is None and (v := choose_group(matrix)) > 1:
        fmt = f"vell{v}"
    if fmt is not None and fmt.startswith("vell"):
        return _to_grouped_rows(matrix, col_offset, int(fmt[4:]), row_nnz)
    cols = [np.flatnonzero(matrix[i]) for i in range(k)]
    offs = [col_offset[c].astype(np.int32) for c in cols]
    vals = [matrix[i, c] for i, c in enumerate(cols)]
    fmt = fmt or choose_format(row_nnz, min_saving)
    longest = int(row_nnz.max(initial=0))
    if fmt == "ell":
        data, off = _pack(offs, vals, longest)
        return SparseRows("ell", data, off, int(row_nnz.sum()), (k, ncols), row_nnz=row_nnz)
    if fmt != "hyb":
        raise ValueError(f"unknown sparse format {fmt}")
    l1, _ = best_split(row_nnz)
    l1 = max(l1, 1)
    data, off = _pack([o[:l1] for o in offs], [v[:l1] for v in vals], l1)
    long_rows = np.flatnonzero(row_nnz > l1)
    slot = np.full(k, -1, np.int32)
    slot[long_rows] = np.arange(len(long_rows), dtype=np.int32)
    tails = [(offs[i][l1:], vals[i][l1:]) for i in long_rows]
    # empty overflow rows up to a multiple of OVF_ROW_MULTIPLE (at least one row: a forced hyb on balanced
    # rows keeps valid shapes): the overflow stage's row loop then splits into register tiles of several
    # rows, where a prime row count would leave one FMA chain per task
    rows = max(len(tails), 1)
    rows += -rows % OVF_ROW_MULTIPLE
    tails += [(np.zeros(0, np.int32), np.zeros(0, np.float32))] * (rows - len(tails))
    ovf_data, ovf_off = _pack([t[0] for t in tails], [t[1] for t in tails], longest - l1)
    return SparseRows("hyb", data, off, int(row_nnz.sum()), (k, ncols), ovf_data, ovf_off, slot, row_nnz)


def stored_lengths(data: np.ndarray) -> np.ndarray:
    """Each row's stored entries, where its zero padding starts. data is [K, L] (ell, hyb), [G, L, V] (vellV's
    row groups) or [K, L, 4] (int8 quads): a stored entry is nonzero somewhere along the last axis."""
    nonzero = data != 0
    return (nonzero.any(axis=2) if nonzero.ndim == 3 else nonzero).sum(axis=1)


def offsets_with_lengths(data: np.ndarray, off: np.ndarray) -> np.ndarray:
    """off [K, L + 1]: the offsets and, last, each row's stored entries (stored_lengths);
    schedules/row_extents ends the kernels' row loops there."""
    return np.concatenate([off, stored_lengths(data).astype(off.dtype)[:, None]], axis=1)


def conv_weight_rows(weight: np.ndarray, geo: ConvGeometry, fmt: str | None = None,
                     min_saving: float = HYB_MIN_SAVING["cuda"]) -> SparseRows:
    """Sparse rows of an OIHW conv weight, offsets into the flat padded input of `geo`."""
    k = weight.shape[0]
    return to_sparse_rows(weight.reshape(k, -1), geo.column_offsets(), fmt, min_saving)


def depthwise_weight_rows(weight: np.ndarray, geo: ConvGeometry, channels: np.ndarray | None = None) -> SparseRows:
    """ELL rows of a depthwise conv's weight [C, 1, R, S] (groups == C == K): row k holds channel k's
    nonzero taps, offsets into channel k's plane of `geo`'s padded input (or into channel channels[k]'s: the
    input gathered, its channels remapped, DropDeadChannels). It is the block-diagonal [C, C*R*S] matrix the
    sparse conv takes, packed without building it (efficientnet's 1152-channel 5x5: 133 MB dense)."""
    k = weight.shape[0]
    taps = weight.reshape(k, -1)                                  # [K, R*S]
    cols = geo.column_offsets().reshape(geo.c, -1)                # [C, R*S] offsets of channel c's taps
    src = np.arange(k) if channels is None else np.asarray(channels)  # the input channel row k reads
    nz = [np.flatnonzero(taps[i]) for i in range(k)]
    return pack_rows([cols[src[i], z].astype(np.int32) for i, z in enumerate(nz)],
                     [taps[i, z] for i, z in enumerate(nz)], (k, geo.c * taps.shape[1]))


def pack_rows(offs: list[np.ndarray], vals: list[np.ndarray], shape: tuple[int, int]) -> SparseRows:
    """ELL rows from each row's offsets and values (the rows' lengths as they are)."""
    row_nnz = np.array([len(v) for v in vals], np.int64)
    data, off = _pack(offs, vals, int(row_nnz.max(initial=0)))
    return SparseRows("ell", data, off, int(row_nnz.sum()), shape, row_nnz=row_nnz)


def dense_weight_rows(weight: np.ndarray, fmt: str | None = None,
                      min_saving: float = HYB_MIN_SAVING["cuda"]) -> SparseRows:
    """Sparse rows of a [out, in] linear weight; offsets are plain column numbers."""
    return to_sparse_rows(weight, np.arange(weight.shape[1]), fmt, min_saving)


def interleave_rows(a: np.ndarray, tile: int) -> np.ndarray:
    """[K, L, ...] -> [K/tile, L, tile, ...]: a row tile's entries j side by side, so that a kernel stepping
    through its rows' entries together (the register tile's rows) reads two streams (weights, offsets)
    instead of two per row (trailing axes, an int8 quad's 4 weights, stay together)."""
    k, width, *rest = a.shape
    return np.ascontiguousarray(np.swapaxes(a.reshape(k // tile, tile, width, *rest), 1, 2))


ROW_ORDER_MIN_SAVING = 0.02  # length_order: sort only where the tiles then run at least 2% fewer entries
# length_order sorts within each of this many contiguous parts of the rows, so that the threads of a parallel row
# loop (TVM hands thread t the t-th contiguous share of its tasks) compute their own output channels: the epilogue
# pass reading output channel k at row_of[k] (and the next layer's pad stage, split by channel) then reads sums
# its own core wrote, not half of them from the other core's cache (vgg16-cifar channel4 int8's 4x4 and 2x2
# layers, two threads; item 58). Two: exact for one and two threads; there the tiles ran 0.2-0.9% more entries
# than with the rows sorted whole
ROW_ORDER_PARTS = 2


def length_order(lengths: np.ndarray, tile: int, min_saving: float = ROW_ORDER_MIN_SAVING,
                 parts: int = ROW_ORDER_PARTS) -> np.ndarray | None:
    """The rows sorted by stored length (stable) within each of `parts` contiguous parts of whole tiles (the rows
    whole where they do not split so), for tiles of `tile` rows that each run to their longest row
    (schedules/row_extents): None unless that saves at least `min_saving` of the entries the tiles run.
    vgg16-cifar at 90%, 16-row tiles: 7-12% of the entries were padding in row order, 0.3-1.2% sorted."""
    def entries(lens: np.ndarray) -> int:
        return int(lens.reshape(-1, tile).max(axis=1).sum()) * tile

    if not len(lengths):
        return None
    size = len(lengths) // parts if parts > 1 and len(lengths) % (parts * tile) == 0 else len(lengths)
    order = np.concatenate([start + np.argsort(lengths[start:start + size], kind="stable")
                            for start in range(0, len(lengths), size)])
    before = entries(lengths)
    return order if before and before - entries(lengths[order]) >= min_saving * before else None


def inverse_order(order: np.ndarray) -> np.ndarray:
    """row_of[k]: the stored row that holds row k of a permutation `order` (stored row i is row order[i])."""
    row_of = np.empty(len(order), np.int32)
    row_of[order] = np.arange(len(order), dtype=np.int32)
    return row_of


def offsets_fit_16_bits(off: np.ndarray) -> bool:
    """Whether every offset of an array fits a uint16 (what compact_offsets stores)."""
    return bool(off.size) and off.min() >= 0 and off.max() < 1 << 16


def compact_offsets(off: np.ndarray) -> np.ndarray:
    """An offset array as uint16 where every offset fits (< 65536), else unchanged: 6 instead of 8 bytes
    per stored entry. The kernels re-read their weights from memory every inference (vgg16-cifar's 12.8 MB
    do not stay in this machine's shared L3 between calls), so index bytes are time; the TE operators
    widen each offset as they load it."""
    return off.astype(np.uint16) if offsets_fit_16_bits(off) else off

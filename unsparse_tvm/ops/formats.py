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

import dataclasses
from dataclasses import dataclass, field

import numpy as np

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


def offsets_with_lengths(data: np.ndarray, off: np.ndarray) -> np.ndarray:
    """off [K, L + 1]: the offsets and, last, each row's stored entries, where its zero padding starts;
    schedules/row_extents ends the kernels' row loops there. data is [K, L] (ell, hyb), [G, L, V] (vellV's row
    groups) or [K, L, 4] (int8 quads): a stored entry is nonzero somewhere along the last axis, padding last."""
    nonzero = data != 0
    lengths = (nonzero.any(axis=2) if nonzero.ndim == 3 else nonzero).sum(axis=1).astype(off.dtype)
    return np.concatenate([off, lengths[:, None]], axis=1)


@dataclass(frozen=True)
class ConvGeometry:
    """Static shape facts of one NCHW/OIHW conv2d, and the flat padded-input layout the kernel reads.

    The padded input is stored split into its sh x sw *phases* (space-to-depth: padded row h' goes to
    phase h' % sh, row h' // sh; columns likewise), each phase a plane of Hq x Wq. Tap (c, r, s) of
    output (y, x) then reads phase ((r*dh) % sh, (s*dw) % sw) at row y + (r*dh) // sh, column
    x + (s*dw) // sw: every conv, strided or not, is a stride-1 walk over a phase plane, so outputs
    q = y*Wq + x read contiguous input (one vector load, not a strided gather). Stride 1 is the
    plain padded image (one phase, Hq = Hp, Wq = Wp)."""

    n: int
    c: int
    h: int
    w: int
    k: int
    r: int
    s: int
    stride: tuple[int, int]
    padding: tuple[int, int, int, int]  # top, left, bottom, right
    dilation: tuple[int, int]
    overlap: int = 0  # lanes L: the flat domain's last vectors read the map's last L positions (with_overlap)
    row_domain: bool = False  # the flat domain is the output map itself, q = y*OW + x (with_row_domain)

    @property
    def hp(self) -> int:
        return self.h + self.padding[0] + self.padding[2]

    @property
    def wp(self) -> int:
        return self.w + self.padding[1] + self.padding[3]

    @property
    def oh(self) -> int:
        return (self.hp - self.dilation[0] * (self.r - 1) - 1) // self.stride[0] + 1

    @property
    def ow(self) -> int:
        return (self.wp - self.dilation[1] * (self.s - 1) - 1) // self.stride[1] + 1

    @property
    def hq(self) -> int:
        """Rows of one phase plane."""
        return -(-self.hp // self.stride[0])

    @property
    def wq(self) -> int:
        """Columns of one phase plane: the row pitch of the flat output domain."""
        return -(-self.wp // self.stride[1])

    @property
    def channel_plane(self) -> int:
        """Flat size of one input channel: its sh*sw phase planes."""
        return self.stride[0] * self.stride[1] * self.hq * self.wq

    @property
    def pad_shape(self) -> list[int]:
        """[channels, rows, columns] the flat padded input splits into (for the pad stage's schedule)."""
        return [self.pad_channels, self.stride[0] * self.stride[1] * self.hq, self.wq]

    def with_overlap(self, lanes: int) -> "ConvGeometry":
        """For a pointwise stride-1 conv whose map is not whole vectors of `lanes` (14x14 = 12.25 vectors of 16):
        the same conv with its flat domain in whole vectors whose last ones are shifted back to end at the
        map's last position, so that they overlap the one before instead of reading past the input. Its
        input is then read in place, not copied with a trailing zero channel. resnet50 at 90%, one thread,
        in the whole model: 256x1024 on 14x14 307 -> 257 us, 1024x256 333 -> 315, 512x2048 on 7x7 323 ->
        300; 0.6 ms of 21.5 in all. The positions covered twice are computed twice and read once
        (read_split). Unchanged otherwise."""
        positions = self.oh * self.ow
        pointwise = (self.r, self.s) == (1, 1) and self.stride == (1, 1) and not any(self.padding)
        if not pointwise or positions % lanes == 0 or positions < lanes:
            return self
        return dataclasses.replace(self, overlap=lanes)

    def with_row_domain(self, lanes: int) -> "ConvGeometry":
        """A conv whose rows carry thrown-away columns (Wq > OW: padding, or the stem's phase planes) but whose
        output rows are whole vectors of `lanes` (the stem's 112, vgg's 32 and 224): the same conv with its
        flat domain the output map itself, row y read at pitch Wq (each vector stays inside one row: one
        contiguous load). Nothing is computed to be thrown away, and the output is the flat domain
        (flat_output), so the epilogue joins the accumulators' write-back instead of a pass over sums
        written out and read back. Unchanged otherwise."""
        if self.overlap or self.wq == self.ow or self.ow % lanes:
            return self
        return dataclasses.replace(self, row_domain=True)

    @property
    def read_split(self) -> tuple[int, int]:
        """(S, D) of an overlapped domain: output position p < S is flat index p, a later one p + D."""
        lanes, positions = self.overlap, self.oh * self.ow
        split = ((positions - lanes) // lanes + 1) * lanes  # the first vector that would run past the map
        return split, split - (positions - lanes)

    @property
    def q_extent(self) -> int:
        """Size of the flat extended output domain q = y*Wq + x (columns x >= OW are computed and thrown
        away, so that small images still fill whole vectors), rounded up to 8 lanes (an AVX2 register;
        AVX-512 schedules use 16 where it divides). Not 16: a 2x2 map's 8 positions would pay for 16.
        Past 8 vectors of 16, rounded up further (by at most 56 lanes) until the vector count has a
        divisor in 2..6, so that register tiles of several vectors fit it exactly (56x56: 3248 -> 3264,
        whose 204 vectors split by 4, where 203 = 7 x 29 would leave one vector per tile). Except a map
        with no thrown-away columns of 7k whole vectors (a 1x1 on 28x28: 784, 49 vectors): rounded up it
        lost its fused epilogue and its input view, and with tiles of 7 vectors it ran 15-35% faster
        (one thread, 90%: 128x512 389 -> 252 us, 512x128 367 -> 272, 512x256 635 -> 540)."""
        if self.row_domain:
            return self.oh * self.ow
        if self.overlap:  # whole vectors over the map, rounded as below for tiles of several vectors
            v = -(-self.oh * self.ow // self.overlap)
            while v > 8 and not any(v % u == 0 for u in range(2, 7)):
                v += 1
            return v * self.overlap
        q = -(-self.oh * self.wq // 8) * 8
        if self.wq == self.ow and q == self.oh * self.ow and q % (7 * 16) == 0:
            return q  # a map of exactly 7k whole vectors (28x28): tiles of 7, and the epilogue fuses (flat_output)
        while q > 128 and not (q % 16 == 0 and any((q // 16) % u == 0 for u in range(2, 7))):
            q += 8
        return q

    @property
    def flat_output(self) -> bool:
        """Whether the output is exactly the flat domain (no thrown-away columns, Wq == OW, and q_extent ==
        OH*OW: pointwise convs, strided ones included, whose maps fill whole vectors): the x86 schedules
        then fuse the epilogue into the accumulators' write-back (schedules/_common.flat_epilogue tests
        the same on the PrimFunc)."""
        return self.row_domain or (self.wq == self.ow and self.q_extent == self.oh * self.ow)

    @property
    def input_is_flat(self) -> bool:
        """Whether the flat padded input is the input itself, [N, C*H*W] (stride 1, no padding, no extended
        read past the last channel): the operator then takes that view of it instead of copying it."""
        return self.stride == (1, 1) and not any(self.padding) and self.pad_channels == self.c

    @property
    def pad_channels(self) -> int:
        """Channels of the flat padded input: C, plus zero channels so extended reads stay in bounds."""
        # how far past a column offset the domain reads: an overlapped one no further than the map, a row
        # domain to its last row's last output column
        reach = self.oh * self.ow if self.overlap else (self.oh - 1) * self.wq + self.ow if self.row_domain \
            else self.q_extent
        last = int(self.column_offsets().max()) + reach - 1
        return max(self.c, last // self.channel_plane + 1)

    def tap_offset(self, c, r, s):
        """Flat offset of tap (c, r, s) for output q = 0; ints or TE expressions."""
        (sh, sw), (dh, dw) = self.stride, self.dilation
        row, col = r * dh, s * dw
        if sh == 1 and sw == 1:  # keep the stride-1 index free of div/mod
            return c * self.channel_plane + row * self.wq + col
        phase = (row % sh) * sw + col % sw
        return (c * (sh * sw) + phase) * (self.hq * self.wq) + (row // sh) * self.wq + col // sw

    def column_offsets(self) -> np.ndarray:
        """Flat padded-input offset of every weight column (c, r, s) in OIHW order."""
        c, r, s = np.meshgrid(np.arange(self.c), np.arange(self.r), np.arange(self.s), indexing="ij")
        return self.tap_offset(c, r, s).reshape(-1).astype(np.int64)


def conv_weight_rows(weight: np.ndarray, geo: ConvGeometry, fmt: str | None = None,
                     min_saving: float = HYB_MIN_SAVING["cuda"]) -> SparseRows:
    """Sparse rows of an OIHW conv weight, offsets into the flat padded input of `geo`."""
    k = weight.shape[0]
    return to_sparse_rows(weight.reshape(k, -1), geo.column_offsets(), fmt, min_saving)


def depthwise_weight_rows(weight: np.ndarray, geo: ConvGeometry) -> SparseRows:
    """ELL rows of a depthwise conv's weight [C, 1, R, S] (groups == C == K): row k holds channel k's
    nonzero taps, offsets into channel k's plane of `geo`'s padded input. It is the block-diagonal
    [C, C*R*S] matrix the sparse conv takes, packed without building it (efficientnet's 1152-channel 5x5:
    133 MB dense)."""
    k = weight.shape[0]
    taps = weight.reshape(k, -1)                                  # [K, R*S]
    cols = geo.column_offsets().reshape(geo.c, -1)                # [C, R*S] offsets of channel c's taps
    nz = [np.flatnonzero(taps[i]) for i in range(k)]
    row_nnz = np.array([len(z) for z in nz], np.int64)
    data, off = _pack([cols[i, z].astype(np.int32) for i, z in enumerate(nz)], [taps[i, z] for i, z in enumerate(nz)],
                      int(row_nnz.max(initial=0)))
    return SparseRows("ell", data, off, int(row_nnz.sum()), (k, geo.c * taps.shape[1]), row_nnz=row_nnz)


def dense_weight_rows(weight: np.ndarray, fmt: str | None = None,
                      min_saving: float = HYB_MIN_SAVING["cuda"]) -> SparseRows:
    """Sparse rows of a [out, in] linear weight; offsets are plain column numbers."""
    return to_sparse_rows(weight, np.arange(weight.shape[1]), fmt, min_saving)


def offsets_fit_16_bits(off: np.ndarray) -> bool:
    """Whether every offset of an array fits a uint16 (what compact_offsets stores)."""
    return bool(off.size) and off.min() >= 0 and off.max() < 1 << 16


def compact_offsets(off: np.ndarray) -> np.ndarray:
    """An offset array as uint16 where every offset fits (< 65536), else unchanged: 6 instead of 8 bytes
    per stored entry. The kernels re-read their weights from memory every inference (vgg16-cifar's 12.8 MB
    do not stay in this machine's shared L3 between calls), so index bytes are time; the TE operators
    widen each offset as they load it."""
    return off.astype(np.uint16) if offsets_fit_16_bits(off) else off

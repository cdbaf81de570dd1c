"""ConvGeometry: the static shape facts of one conv2d and the flat input layout its sparse kernels read
(the padded plane split into stride phases, or patches); formats.py maps weight columns into it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

PATCH_MAX_POSITIONS = 16  # ConvGeometry.with_patches: maps up to 4x4
PATCH_MAX_BATCH_POSITIONS = 32  # with_patches(fold_images=True): 8 images of a 2x2 map in one patch, 2 of a 4x4


# Maps of at least this many positions are split across threads by position (the map's first half to the first
# thread...), not by channel, in the int8 kernels, the byte relays and the 3x3/2 max pool: on the 2-vCPU Zen 4
# VM a store to a line the other core had read cost ~9x one to a line only this core held (800 KB written in
# halves: 40 us against 4.5; benchmarks/shared_writes.c), and a channel split makes every input shared (each
# output channel reads all of them), so each later write into that memory paid it (resnet50 95% channel4 int8,
# two threads: relays 2.6x their one-thread time in CPU time). 56x56 maps and up: a 28x28's 49 vectors do not
# halve, nor do vgg16-cifar's 32x32 convs' 17 steps (its relay split alone ran 1-2% slower on two threads).
MAP_SPLIT_POSITIONS = 2048
SPLIT_LOADS = 0.4  # ConvGeometry.with_aligned_channels: the share of split vector loads that pays for a copy
CACHE_LINE = 64


def _round_up(n: int, m: int) -> int:
    """n rounded up to a multiple of m (m = 0: n)."""
    return -(-n // m) * m if m else n


def row_lanes_fit(positions: int, lanes: int, v: int) -> bool:
    """Whether vectors of `lanes` split into whole lanes / V positions x V rows over a map of fewer positions
    than a vector (ConvGeometry.with_row_lanes)."""
    return lanes % v == 0 and positions < lanes and positions % (lanes // v) == 0


def split_loads(pitch: int, lanes: int) -> float:
    """The share of channels c whose vector load of `lanes` floats at c * pitch crosses a cache line."""
    starts = [c * pitch * 4 % CACHE_LINE for c in range(CACHE_LINE)]
    return sum(s + 4 * lanes > CACHE_LINE for s in starts) / len(starts)


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
    patches: bool = False  # the input is stored as one patch per tap, q = y*OW + x (with_patches)
    images: int = 1  # patches of this many images side by side, q = i*OH*OW + y*OW + x (with_patches)
    align: int = 0  # lanes L: an overlapped domain's channel pitch rounded up to whole vectors (with_aligned_channels)
    pitch: int = 0  # lanes L: a strided conv's phase rows at a pitch of whole vectors (with_aligned_rows)
    row_lanes: int = 0  # V: grouped rows' vectors span positions x the group's V rows (with_row_lanes)

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
    def batch(self) -> int:
        """Extent of the conv stage's batch axis: N, or N / images where images share one patch."""
        return self.n // self.images

    @property
    def hq(self) -> int:
        """Rows of one phase plane."""
        return -(-self.hp // self.stride[0])

    @property
    def wq(self) -> int:
        """Columns of one phase plane: the row pitch of the flat output domain (with_aligned_rows: whole vectors)."""
        return _round_up(-(-self.wp // self.stride[1]), self.pitch)

    @property
    def channel_plane(self) -> int:
        """Flat size of one input channel: its sh*sw phase planes (with_patches: its R*S patches)."""
        if self.patches:
            return self.r * self.s * self.q_extent
        return _round_up(self.stride[0] * self.stride[1] * self.hq * self.wq, self.align)

    @property
    def pad_shape(self) -> list[int]:
        """[channels, rows, columns] the flat padded input splits into (for the pad stage's schedule)."""
        if self.patches:  # q_extent == OH*OW: one row per output row and tap
            return [self.pad_channels, self.r * self.s * self.images * self.oh, self.ow]
        if self.align:  # a channel's plane and the zeros that round it up to whole vectors
            return [self.pad_channels, 1, self.channel_plane]
        return [self.pad_channels, self.stride[0] * self.stride[1] * self.hq, self.wq]

    @property
    def pointwise(self) -> bool:
        """A 1x1 conv at stride 1 without padding: output position q reads input position q of each channel."""
        return (self.r, self.s) == (1, 1) and self.stride == (1, 1) and not any(self.padding)

    def with_overlap(self, lanes: int) -> "ConvGeometry":
        """For a pointwise stride-1 conv whose map is not whole vectors of `lanes` (14x14 = 12.25 vectors of 16):
        the same conv with its flat domain in whole vectors whose last ones are shifted back to end at the
        map's last position, so that they overlap the one before instead of reading past the input. Its
        input is then read in place, not copied with a trailing zero channel (but see with_aligned_channels).
        resnet50 at 90%, one thread, in the whole model: 256x1024 on 14x14 307 -> 257 us, 1024x256 333 -> 315,
        512x2048 on 7x7 323 -> 300; 0.6 ms of 21.5 in all. The positions covered twice are computed twice and
        read once (read_split). Unchanged otherwise."""
        positions = self.oh * self.ow
        if not self.pointwise or positions % lanes == 0 or positions < lanes:
            return self
        return dataclasses.replace(self, overlap=lanes)

    def with_row_domain(self, lanes: int, narrow: bool = False) -> "ConvGeometry":
        """A conv whose rows carry thrown-away columns (Wq > OW: padding, or the stem's phase planes) but whose
        output rows are whole vectors of `lanes` (the stem's 112, vgg's 32 and 224): the same conv with its
        flat domain the output map itself, row y read at pitch Wq (each vector stays inside one row: one
        contiguous load). Nothing is computed to be thrown away, and the output is the flat domain
        (flat_output), so the epilogue joins the accumulators' write-back instead of a pass over sums
        written out and read back. narrow: also rows of half a vector (8 wide under AVX-512; the schedules
        then use 8-lane vectors, schedules/_common.domain_lanes): an 8x8 map's 80 padded-plane positions were
        5 vectors of 16, its 8 rows are 8 of 8, 256 instead of 320 bytes from L2 per stored weight (vgg16-cifar's
        256x256 3x3 at 90%, one thread: 163 -> 142 us). Unchanged otherwise."""
        if self.overlap or self.wq == self.ow or (self.ow % lanes and not (narrow and 2 * self.ow == lanes == 16)):
            return self
        return dataclasses.replace(self, row_domain=True)

    def with_patches(self, lanes: int, fold_images: bool = False, whole: int = 8) -> "ConvGeometry":
        """A small map (at most PATCH_MAX_POSITIONS outputs, OH*OW a multiple of `whole`) of a conv with several taps:
        the same conv with its input stored as one patch per (c, r, s), the OH*OW input positions that tap
        reads, zero where it reads padding (im2col without the matrix product). Each stored weight then reads
        whole aligned vectors over exactly the map, where the padded plane's rows carried thrown-away
        columns (a 4x4 map: 24 positions in 3 unaligned 8-lane loads, now one aligned 16-lane load; Zen 4
        runs unaligned 64-byte loads at about half speed). The copy is R*S times the input, paid once and
        read by every row; written to L2 it costs ~13 us for 512 channels, so larger maps (8x8: 590 KB for
        256 channels) keep their plane. vgg16-cifar's 512x512 3x3 on 4x4 at 90%, one thread: 214 -> 159 us.
        fold_images (batch > 1): the patches of several images side by side (`images`, the largest divisor
        of N up to PATCH_MAX_BATCH_POSITIONS positions), so that a 2x2 map, 4 positions, fills whole vectors
        (8 images: 32 lanes) and each loaded weight and offset feeds several images. whole = 4 (the fp32
        kernels): a 2x2 map's 4 positions too, one aligned 4-lane vector per stored weight where the padded
        plane's 8 lanes held 4 thrown away (512x512 3x3 at 90%, one thread: 0.103 -> 0.087 ms, AVX2 code
        0.107 -> 0.098). Unchanged otherwise."""
        positions = self.oh * self.ow
        if self.overlap or self.row_domain or self.r * self.s == 1 or positions > PATCH_MAX_POSITIONS:
            return self
        fits = [m for m in range(1, self.n + 1) if self.n % m == 0 and m * positions <= PATCH_MAX_BATCH_POSITIONS]
        images = max(fits, default=1) if fold_images else 1
        if images * positions % whole:
            return self
        return dataclasses.replace(self, patches=True, images=images)

    def with_row_lanes(self, lanes: int, v: int) -> "ConvGeometry":
        """Grouped rows (vellV) on a map of fewer positions than a vector (a 2x2 map, 4 positions): the same
        conv with its input as patches (with_patches) and each vector of `lanes` spanning lanes / V positions
        x the group's V rows (ops.sparse._grouped_conv's [N, G, Q, V] stage): per stored entry and vector one
        16-byte weight load, one input load, one shuffle and one FMA whose lanes are all useful, where a
        vector of positions took V broadcast weights and V FMAs of 8 lanes over the padded plane, half of them
        thrown away. vgg16-cifar's 512x512 3x3 on 2x2 at 90% vector-4, one thread, alone: 0.053 -> 0.038 ms
        (AVX2 code 0.055 -> 0.049). Unchanged where the map fills a vector, has one tap, or does not split into
        whole vectors this way."""
        if (self.images > 1 or self.overlap or self.row_domain or self.r * self.s == 1
                or not row_lanes_fit(self.oh * self.ow, lanes, v)):
            return self
        return dataclasses.replace(self, patches=True, images=1, row_lanes=v)

    def with_aligned_channels(self, lanes: int) -> "ConvGeometry":
        """An overlapped domain (with_overlap) whose channel pitch, the map's H*W, splits most vector loads across
        two cache lines: the same conv with its input copied at a pitch of whole vectors (zeros between
        channels), so that every stored weight's loads but the overlapping last vector are aligned. Unaligned
        64-byte loads run at about half speed on a Xeon and on Zen 4 (7 FMAs per broadcast weight, from L2:
        1.8x slower, benchmarks/split_loads.c). resnet50's 1x1s at 90%, one thread, copy included (Xeon,
        AVX-512): 256x1024 on 14x14 284 -> 260 us, 1024x256 356 -> 301, 512x2048 on 7x7 307 -> 269, 2048x512
        313 -> 274. Under AVX2 a 32-byte load splits only where it starts in a line's last 32 bytes: a 14x14
        map's pitch splits a quarter of them, and the copy did not pay (256x1024: 269 -> 291 us), a 7x7's 7 of
        16 (294 -> 239), so the copy is made where at least SPLIT_LOADS of the loads split. Unchanged otherwise."""
        if not self.overlap or split_loads(self.oh * self.ow, lanes) < SPLIT_LOADS:
            return self
        return dataclasses.replace(self, align=lanes)

    def with_aligned_rows(self, lanes: int) -> "ConvGeometry":
        """A strided conv with several taps on its phase planes (not pointwise: those run subsampled) whose row
        pitch Wq is not whole vectors of `lanes`: the same conv with Wq rounded up to them where that adds at
        most an eighth (the extra columns are zero and computed to be thrown away). A stride-2 3x3's taps then
        start at column 0 of their phase row for s = 0, 1 (aligned) and at column 1 for s = 2, where with a
        pitch of 29 or 15 nearly every vector load split across two cache lines. One thread, 90%, Xeon
        (AVX-512): 128x128 on 56x56 (planes 29 -> 32 wide) 0.804 -> 0.748 ms, 256x256 on 28x28 (15 -> 16) 0.698 ->
        0.553; 512x512 on 14x14 keeps its 8 (16 would double the domain). Stride-1 convs gained nothing from
        it (a third of their taps aligned: 64x64 on 56x56 0.590 -> 0.588). Unchanged otherwise."""
        wq, wide = self.wq, _round_up(self.wq, lanes)
        if self.stride == (1, 1) or (self.r, self.s) == (1, 1) or self.overlap or self.row_domain or self.patches \
                or wide == wq or 8 * (wide - wq) > wq:
            return self
        return dataclasses.replace(self, pitch=lanes)

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
        if self.row_domain or self.patches:
            return self.images * self.oh * self.ow
        if self.overlap:  # whole vectors over the map, rounded as below for tiles of several vectors
            v = -(-self.oh * self.ow // self.overlap)
            while v > 8 and not any(v % u == 0 for u in range(2, 7)):
                v += 1
            return v * self.overlap
        q = _round_up(self.oh * self.wq, 8)
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
        return self.row_domain or self.patches or (self.wq == self.ow and self.q_extent == self.oh * self.ow)

    @property
    def input_is_flat(self) -> bool:
        """Whether the flat padded input is the input itself, [N, C*H*W] (stride 1, no padding, no extended
        read past the last channel): the operator then takes that view of it instead of copying it."""
        return (self.stride == (1, 1) and not any(self.padding) and self.pad_channels == self.c and not self.patches
                and not self.align)

    @property
    def pad_channels(self) -> int:
        """Channels of the flat padded input: C, plus zero channels so extended reads stay in bounds."""
        # how far past a column offset the domain reads: an overlapped one no further than the map, a row
        # domain to its last row's last output column
        reach = self.oh * self.ow if self.overlap else (self.oh - 1) * self.wq + self.ow if self.row_domain \
            else self.q_extent
        last = int(self.column_offsets().max()) * self.offset_unit + reach - 1
        return max(self.c, last // self.channel_plane + 1)

    @property
    def offset_unit(self) -> int:
        """Flat input positions per unit of a stored offset: a patch (Q positions, always whole patches apart,
        so 512 channels' 4608 patches still fit 16-bit offsets, where 73728 positions would not); else 1.
        (Positions where they fit 16 bits, scaled by 4 bytes in the load's address instead of by a shift, were
        slower on a 2x2 map's 512x512 3x3 at 90%: the shift made LLVM load a row tile's 8 offsets as one vector
        and extract them, 17 loads per 8 stored weights instead of 24, the loads being the bound: 0.087 ->
        0.091-0.103 ms native, level on AVX2 code.)"""
        return self.q_extent if self.patches else 1

    def tap_offset(self, c, r, s):
        """Offset of tap (c, r, s) for output q = 0, in offset_unit positions of the flat input; ints or TE
        expressions."""
        (sh, sw), (dh, dw) = self.stride, self.dilation
        if self.patches:
            return (c * self.r + r) * self.s + s
        row, col = r * dh, s * dw
        if sh == 1 and sw == 1:  # keep the stride-1 index free of div/mod
            return c * self.channel_plane + row * self.wq + col
        phase = (row % sh) * sw + col % sw
        return (c * (sh * sw) + phase) * (self.hq * self.wq) + (row // sh) * self.wq + col // sw

    def column_offsets(self) -> np.ndarray:
        """Flat padded-input offset of every weight column (c, r, s) in OIHW order."""
        c, r, s = np.meshgrid(np.arange(self.c), np.arange(self.r), np.arange(self.s), indexing="ij")
        return self.tap_offset(c, r, s).reshape(-1).astype(np.int64)

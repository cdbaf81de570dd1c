"""Per-layer choice by cost: for each conv/linear layer, the predicted time of its dense kernel and of
its sparse kernel in the chosen format; the passes keep the layer sparse only where that is faster (so
no layer is slower than its dense version), unless --threshold overrides.

x86: time = work / rate, where work counts one FMA per stored entry (padding included) per output
position, and the rates are per kernel family, measured per layer by `bench` on the 2-vCPU machines
(docs/results.md): the dense direct conv ~55 GFMA/s, ungrouped sparse rows ~26 G/s (an input load and a
weight broadcast per FMA), grouped rows ~2x that (one input load per V FMAs). Linear layers at batch 1 are
memory-bound GEMVs on both sides. Every layer's weights stream in once per inference: a floor at DRAM speed.
CUDA: unsparse_tvm.cost.gpu (the dense direct conv as a grouped kernel whose groups are its tile_k
channels, with no fill-in).
The x86 rates are X86Rates: built-in ones, or those `unsparse-tvm calibrate` measured on this CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..ops.formats import SparseRows
from ..ops.geometry import ConvGeometry
from ..ops.quant_formats import fp32_nbytes
from .gpu import H200_FITTED, Knobs, predict_sparse

CUDA_GPU = H200_FITTED  # cuda costs: the constants fitted to the H200's measurements (benchmarks/results/2026-12-04-h200)

@dataclass(frozen=True)
class X86Rates:
    """The x86 cost model's rates: FMAs per second per kernel family, all threads (`calibrate` measures them
    per CPU model and thread count, unsparse_tvm.cost.calibration; these defaults were measured per layer by
    `bench` on the 2-vCPU machines, both threads: docs/results.md)."""

    dense_conv: float = 55e9     # the dense direct conv
    # ... of a 1x1 conv: no taps to reuse each input load across, and the reducing ones (resnet50's 256->64 on
    # 56x56, measured 33 GFMA/s against 110 for its 3x3s, both threads of the Xeon) re-read inputs past L2
    dense_pointwise: float = 55e9
    ell: float = 26e9            # ungrouped sparse rows: an input load and a weight broadcast per FMA
    hyb: float = 26e9
    vell: float = 52e9           # grouped rows: one input load per V FMAs
    # linear layers at batch 1, memory-bound GEMVs: the fallback's output-vectorised dense GEMV and the sparse
    # rows, measured by `calibrate` on both threads of the 2-vCPU Xeon (2026-12-03; a 1024x1024 layer)
    dense_linear: float = 8.5e9
    sparse_linear: float = 5.1e9
    # output elements per second per pass over the [N, K, ...] output: the epilogue is 3 passes (sums written,
    # read back, output written) or 1 where it joins the write-back (ConvGeometry.flat_output; not hyb, whose
    # epilogue also reads the overflow sums). Fitted to mobilenet's 96x16 1x1 on a 64x64 map, one thread:
    # hyb unfused 0.118 ms, ell fused 0.095 ms, where the FMA term alone predicts 0.042 and 0.075.
    output: float = 16e9
    # A pass over an output larger than cache_bytes streams through DRAM at dram_bytes_s, whatever the kernel:
    # a roofline floor under both predictions. Fitted to vgg16's 3->64 first layer at 224x224 (three passes
    # of 13 MB): TVM dense 3.07 ms, ell 2.95, hyb 3.3-4.1, where the FMA and output terms predict 2.2 and
    # 1.1 ms, so it stayed sparse and ran slower than dense. Below 4 MB (the resnet stems' 3.3 MB) no floor
    # is applied: those passes partly hit the caches, and their sparse kernels are measured faster.
    dram_bytes_s: float = 12e9
    cache_bytes: int = 4 << 20
    source: str = "built-in"     # where the rates come from: "built-in" or a calibration file

    def fma_rate(self, fmt: str) -> float:
        return self.vell if fmt.startswith("vell") else getattr(self, fmt)

    def dense_rate(self, geo: ConvGeometry) -> float:
        return self.dense_pointwise if geo.r * geo.s == 1 else self.dense_conv


BUILTIN = X86Rates()


@dataclass
class LayerCost:
    dense_us: float
    sparse_us: float

    @property
    def sparse_wins(self) -> bool:
        return self.sparse_us < self.dense_us


def conv_cost(geo: ConvGeometry, rows: SparseRows, target_kind: str, rates: X86Rates = BUILTIN,
              depthwise: bool = False, dense_geo: ConvGeometry | None = None, lanes: int = 0) -> LayerCost:
    """Predicted dense and sparse time (us) of one conv layer (x86: at `rates`); `depthwise` (x86): the
    conv is depthwise (depthwise_cost). `geo` is the conv as the sparse kernel runs it (its flat domain:
    patches, row domain, overlap), `dense_geo` as the dense kernel runs it (the plain padded plane; default
    `geo`); `lanes` (x86): the target's float32 vector lanes, the least a stored weight's FMA costs."""
    if target_kind == "cuda":
        dense = predict_sparse(geo, np.full(geo.k // 8 if geo.k % 8 == 0 else geo.k, geo.c * geo.r * geo.s),
                               Knobs(group=8 if geo.k % 8 == 0 else 1), CUDA_GPU).seconds * CUDA_GPU.grouped_rows_factor
        # stored entries per group of V rows, or per row (hyb's overflow spread over all rows)
        width = rows.data.shape[1] if rows.group > 1 else int(np.ceil(rows.padded_size / rows.shape[0]))
        sparse = predict_sparse(geo, np.full(rows.data.shape[0], width), Knobs(group=rows.group), CUDA_GPU).seconds
        sparse *= CUDA_GPU.grouped_rows_factor if rows.group > 1 else 1.0  # the dense side's measured shortfall
        return LayerCost(dense * 1e6, sparse * 1e6)
    if depthwise:
        return depthwise_cost(geo, rows, rates, dense_geo)
    dgeo = dense_geo or geo
    out, dense_out = geo.batch * geo.k * geo.q_extent, dgeo.batch * dgeo.k * dgeo.q_extent
    dense = (geo.k * geo.c * geo.r * geo.s * dgeo.batch * dgeo.q_extent / rates.dense_rate(dgeo)
             + output_passes(dgeo, "dense") * dense_out / rates.output)
    # each stored weight's FMA is a whole vector however few lanes the domain fills: a 2x2 map's positions (4 in
    # patches, 8 over the padded plane) under AVX-512 cost a 16-lane FMA per weight (vgg16-cifar's 512x512 3x3 at
    # 50%, two threads, Xeon: 0.385 ms sparse against 0.286 dense, where 8 positions per weight predicted sparse);
    # row lanes fill every lane (a vector holds lanes / V positions of V rows, ConvGeometry.with_row_lanes).
    # Images side by side in patches share one domain.
    per_weight = geo.batch * (geo.q_extent if geo.row_lanes else max(geo.q_extent, lanes))
    sparse = (rows.padded_size * per_weight / rates.fma_rate(rows.fmt)
              + output_passes(geo, rows.fmt) * out / rates.output)
    if 4 * dense_out > rates.cache_bytes:  # memory-bound floor; a tie goes to dense (sparse_wins is strict)
        dense = max(dense, output_passes(dgeo, "dense") * 4 * dense_out / rates.dram_bytes_s)
    if 4 * out > rates.cache_bytes:
        sparse = max(sparse, output_passes(geo, rows.fmt) * 4 * out / rates.dram_bytes_s)
    # the weights stream in once per inference (a model's weights outgrow the caches): on small maps, where
    # each weight meets few outputs, that is the floor. vgg16-cifar's 512x512 3x3 on a 2x2 map, one thread:
    # 9.4 MB, 470-500 us measured, 280 us from the FMA rate, 460 us at the calibrated 20 GB/s
    dense = max(dense, 4 * geo.k * geo.c * geo.r * geo.s / rates.dram_bytes_s)
    sparse = max(sparse, fp32_nbytes(rows) / rates.dram_bytes_s)
    return LayerCost(dense * 1e6, sparse * 1e6)


# Depthwise convs (x86): both kernels' time is mostly per element (the padded input copied, the epilogue's
# BN + SiLU on every output) and per channel, not per multiply-add. Fitted (non-negative least squares) to
# efficientnet_b0@128's 12 depthwise shapes at 90%, each with BN + SiLU, both kernels timed per layer
# (benchmarks/so_profile.py --layers, one thread, a 2-vCPU Zen 4): seconds per padded input element, per
# output element and per channel, and the dense kernel's multiply-add rate. Not yet measured by `calibrate`.
DW_SPARSE_INPUT_S, DW_SPARSE_OUTPUT_S, DW_SPARSE_CHANNEL_S = 0.24e-9, 0.23e-9, 7e-9
DW_DENSE_FMA_S, DW_DENSE_OUTPUT_S, DW_DENSE_CHANNEL_S = 1 / 54e9, 0.42e-9, 55e-9
# the dense kernel's strided convs: their residuals over that fit, per padded input element (its phase planes;
# 0.06-0.27 ns on the four stride-2 shapes, measured after the 3x3s on small maps went to the fallback)
DW_DENSE_STRIDED_INPUT_S = 0.1e-9


def depthwise_cost(geo: ConvGeometry, rows: SparseRows, rates: X86Rates = BUILTIN,
                   dense_geo: ConvGeometry | None = None) -> LayerCost:
    """Predicted time (us) of a depthwise conv (one input channel per output channel) on the dense depthwise
    kernel and on the sparse one (its rows: ops.formats.depthwise_weight_rows). geo.c < geo.k: the input is
    gathered from geo.c channels (DropDeadChannels), which the sparse kernel reads in place and the dense one
    gets copied out to all geo.k first. dense_geo (default geo): the conv as the dense kernel sees it, where
    the sparse one runs on the phase planes its nonzeros read (ops.phase_planes: geo is then the stride-1
    conv over them, and its copy is of those planes)."""
    d = dense_geo or geo
    channels = d.n * d.k
    inp, out = channels * d.hp * d.wp, channels * d.oh * d.ow  # padded input, output elements
    dense = d.r * d.s * out * DW_DENSE_FMA_S + out * DW_DENSE_OUTPUT_S + channels * DW_DENSE_CHANNEL_S
    if d.stride != (1, 1):
        dense += inp * DW_DENSE_STRIDED_INPUT_S
    if d.c < d.k:  # the gather's copy, at the sparse kernel's cost of copying an input element
        dense += channels * d.h * d.w * DW_SPARSE_INPUT_S
    read = geo.n * geo.c * geo.hp * geo.wp  # the padded input the sparse kernel copies: its own channels
    sparse = (read * DW_SPARSE_INPUT_S + out * DW_SPARSE_OUTPUT_S + channels * DW_SPARSE_CHANNEL_S
              + rows.nnz * geo.n * geo.oh * geo.ow / rates.ell)
    return LayerCost(dense * 1e6, sparse * 1e6)


# An output larger than this (a quarter of a 2 MB L2, which the input and the weights share) is read back and
# written again from beyond L2 by an unfused epilogue: see unfused_epilogue_us.
L2_OUTPUT_BYTES = 512 << 10


def unfused_epilogue_us(geo: ConvGeometry, rates: X86Rates = BUILTIN) -> float:
    """What an unfused epilogue's two extra passes (sums read back, output written) cost beyond conv_cost's
    output term where the output outgrows L2: they run at DRAM speed, after the FMAs, not beside them.
    Where the epilogue could fuse (ConvGeometry.flat_output), this is what hyb pays over ell. resnet50's
    1x1 convs on 56x56 (0.8-3.2 MB of output), one thread: hyb 206 / 678 us, ell 126 / 391 us for 64x64 /
    256x64, where conv_cost alone predicted hyb the faster (87 / 348 against 109 / 497 us)."""
    out = geo.batch * geo.k * geo.q_extent
    if 4 * out <= L2_OUTPUT_BYTES:
        return 0.0
    return 2 * (4 * out / rates.dram_bytes_s - out / rates.output) * 1e6


def output_passes(geo: ConvGeometry, fmt: str) -> int:
    """Passes over the output the x86 epilogue makes (see X86Rates.output)."""
    return 1 if geo.flat_output and fmt != "hyb" else 3


def linear_cost(batch: int, shape: tuple[int, int], rows: SparseRows, target_kind: str,
                rates: X86Rates = BUILTIN) -> LayerCost:
    """Predicted dense and sparse time (us) of one linear layer ([out, in] weight)."""
    dense = batch * shape[0] * shape[1] / rates.dense_linear
    sparse = batch * rows.padded_size / rates.sparse_linear * (0.5 if rows.group > 1 else 1.0)
    if target_kind == "cuda":  # both memory-bound GEMVs at batch 1: bytes at DRAM speed, plus a launch
        dense = 4 * shape[0] * shape[1] / CUDA_GPU.dram_bytes_s + CUDA_GPU.launch_s
        sparse = (4 + 4 / rows.group) * rows.padded_size / CUDA_GPU.dram_bytes_s + 2 * CUDA_GPU.launch_s
    return LayerCost(dense * 1e6, sparse * 1e6)


@dataclass(frozen=True)
class CostModel:
    """What the sparsify passes ask: a layer's predicted dense and sparse time on one target kind (x86: at
    `rates`, the built-in ones or a calibration of this CPU)."""

    kind: str                      # "llvm" or "cuda"
    rates: X86Rates = BUILTIN
    lanes: int = 16                # float32 lanes of the llvm target's vector register (16 AVX-512, 8 AVX2)

    def conv(self, geo: ConvGeometry, rows: SparseRows, depthwise: bool = False,
             dense_geo: ConvGeometry | None = None) -> LayerCost:
        """geo: the conv as the sparse kernel runs it; dense_geo: as the dense one does (default geo)."""
        return conv_cost(geo, rows, self.kind, self.rates, depthwise, dense_geo, self.lanes)  # cuda: lanes unused

    def linear(self, batch: int, shape: tuple[int, int], rows: SparseRows) -> LayerCost:
        return linear_cost(batch, shape, rows, self.kind, self.rates)

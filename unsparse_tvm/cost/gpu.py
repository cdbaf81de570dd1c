"""A small roofline-style performance model of one conv layer on a GPU: our sparse direct conv (the CUDA
schedule in schedules/sparse_conv2d_cuda.py, at its knobs) against cuDNN's dense conv in FP32, TF32 and
FP16. It predicts; the GPU kit measures, and the GPU issue puts the two side by side.

Our kernel, per warp and per nonzero j of a row: one (weight, offset) pair loaded as two uniform loads
(the same address in every lane), then per_thread x batch_per_thread input loads (32 consecutive floats
at an arbitrary offset: two 128-byte lines, so two L1 wavefronts) and as many FMAs. Its time is the
largest of
  - the FP32 pipe: every FMA, ELL padding and the thrown-away columns of the flat domain included;
  - L1 wavefronts (~1 per clock per SM): 2 + 2 * per_thread * batch_per_thread per warp and nonzero;
  - DRAM/L2 bytes: weights and offsets re-read by every block over q, the padded input, the conv output
    written and read back by the epilogue (where it is a kernel of its own);
divided by an occupancy factor (latency is hidden only with enough warps per SM), plus one launch per
kernel (pad, conv, [overflow], [epilogue]: pointwise convs whose output is the flat domain, ell/vell, write
bias, residual and activation from the conv's accumulators, with no epilogue kernel and no [N, K, Q] pass).
cuDNN: dense FLOPs at a realistic share of the peak, scaled by wave quantisation over 128x64 GEMM tiles
(split along the reduction where a layer has too few tiles to fill the GPU), or its bytes at DRAM speed,
whichever is slower, plus one launch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from ..ops.formats import HYB_MIN_SAVING, best_split, choose_format, offsets_fit_16_bits
from ..ops.geometry import ConvGeometry


@dataclass(frozen=True)
class GPU:
    name: str = "NVIDIA H200 (SXM)"
    sms: int = 132
    clock_hz: float = 1.98e9
    fp32_flops: float = 66.9e12       # 132 SMs x 128 lanes x 2 x 1.98 GHz (no tensor cores)
    tf32_flops: float = 494.7e12      # dense tensor-core peak
    fp16_flops: float = 989.4e12
    dram_bytes_s: float = 4.8e12      # HBM3e
    l2_bytes_s: float = 10e12         # assumption: ~2x DRAM, not a datasheet figure
    l1_wavefronts_per_clk: float = 1.0  # 128 B per clock per SM
    l2_bytes: int = 50 * 2**20
    warps_to_hide_latency: int = 16   # warps per SM below which the throughput bounds are not reached
    launch_s: float = 3e-6            # back-to-back launches from the Relax VM, per kernel
    # shares of peak cuDNN reaches on large layers (assumptions, to be replaced by the kit's numbers)
    cudnn_fp32_eff: float = 0.65
    cudnn_tf32_eff: float = 0.45
    cudnn_fp16_eff: float = 0.50
    # per call, besides the work: one launch (fitted: PyTorch's dispatch and cuDNN's extra kernels too)
    cudnn_fp32_fixed_s: float = 3e-6
    cudnn_tf32_fixed_s: float = 3e-6
    cudnn_fp16_fixed_s: float = 3e-6
    grouped_rows_factor: float = 1.0  # measured over modelled time of grouped rows (cost.model models the dense conv so)


H200 = GPU()
# The same model with its constants fitted to the first GPU kit run (benchmarks/gpu_report.py --fit on
# benchmarks/results/2026-12-04-h200: 792 conv rows, default knobs, batch 1 and 8, sparsity 0.5-0.98). Ours:
# median 1.16x off (1.53x with H200's). (Fitted first with the report reading some resnet50 layers' rows from
# the wrong layer; re-fitted on the right rows: launch 7.0 us, 0.95 wavefronts, 47 warps, median 1.157x
# against these constants' 1.159x, so these stay.) cuDNN through PyTorch: FP32 reaches 28% of its peak past ~2.5 us
# per call; TF32 and FP16 channels-last ~10% past ~35 us per call (PyTorch's dispatch and cuDNN's extra
# kernels): median 1.51x / 1.36x / 1.32x off (2.06x / 6.2x / 8.6x). TVM's dense whole models ran 1.44-3.4x
# slower than this model of their convs (vgg16 6.17 / 24.1 ms at batch 1 / 8, resnet50 9.48 / 11.5 ms):
# grouped_rows_factor is the smallest of those: cost.model models that dense conv as grouped rows (V = 8), so
# it applies the factor to grouped sparse rows too (none timed on a GPU yet). The choice on cuda uses these.
H200_FITTED = replace(H200, name="NVIDIA H200 (SXM), fitted 2026-12-04", launch_s=6.6e-6, grouped_rows_factor=1.44,
                      l1_wavefronts_per_clk=1.05, warps_to_hide_latency=50, l2_bytes_s=11.8e12,
                      cudnn_fp32_eff=0.28, cudnn_tf32_eff=0.095, cudnn_fp16_eff=0.106,
                      cudnn_fp32_fixed_s=2.5e-6, cudnn_tf32_fixed_s=35e-6, cudnn_fp16_fixed_s=37e-6)


LONG_ROW = 64  # stored entries per row from which one image runs on one-warp blocks (auto_threads_q)


def auto_threads_q(batch: int, width: float) -> int:
    """The CUDA conv's threads_q where its Config leaves it 0 (schedules/sparse_conv2d_cuda and this model
    both ask here): one warp (32) for one image whose rows hold >= LONG_ROW stored entries (ELL width), else
    two (64). Fitted on the H200 knob grid (benchmarks/results/2026-12-04-h200): on one image with long
    rows, 32 threads were faster than 64 on 28 of 33 workloads (geomean 0.83x the time; twice as many
    blocks for 132 SMs); with short rows or 8 images, 32 was no better (geomean 1.00-1.01x)."""
    return 32 if batch == 1 and width >= LONG_ROW else 64


@dataclass(frozen=True)
class Knobs:  # sparse_conv2d_cuda.Config, as the model needs it
    threads_q: int = 0  # 0: auto_threads_q
    threads_k: int = 2
    per_thread: int = 2
    batch_per_thread: int = 2
    group: int = 1    # V output channels sharing their offsets (vector-grouped format): one input load, V FMAs


@dataclass
class Prediction:
    seconds: float
    bound: str        # which term decided: fp32, l1, memory, or launch
    terms: dict       # every term, in seconds


def ell_width(row_nnz: np.ndarray, fmt: str) -> float:
    """Padded entries per row of `fmt` (ell, or hyb for outliers) for these rows."""
    k, longest = len(row_nnz), int(row_nnz.max(initial=0))
    if fmt == "hyb":
        return best_split(row_nnz)[1] / k
    return float(max(longest, 1))


def magnitude_row_nnz(k: int, fan_in: int, sparsity: float, seed: int = 0) -> np.ndarray:
    """Nonzeros per output row after layer-wise magnitude pruning of a random normal weight (what
    `prune --method unstructured` does to the built-in models)."""
    w = np.abs(np.random.default_rng(seed).standard_normal((k, fan_in), dtype=np.float32))
    cut = np.quantile(w, sparsity) if sparsity > 0 else -1.0
    return (w > cut).sum(axis=1)


def offset_bytes(geo: ConvGeometry) -> int:
    """Bytes per stored offset: 2 where every offset of the layer fits 16 bits (formats.compact_offsets
    stores them so), else 4."""
    return 2 if offsets_fit_16_bits(geo.column_offsets()) else 4


def predict_sparse(geo: ConvGeometry, row_nnz: np.ndarray, knobs: Knobs = Knobs(), gpu: GPU = H200) -> Prediction:
    n, k, q = geo.n, geo.k, geo.q_extent
    fmt = choose_format(row_nnz, HYB_MIN_SAVING["cuda"])  # as the CUDA pass would
    width, hyb = ell_width(row_nnz, fmt), fmt == "hyb"
    if not knobs.threads_q:
        knobs = replace(knobs, threads_q=auto_threads_q(n, width))
    pt = knobs.per_thread if q % (knobs.per_thread * knobs.threads_q) == 0 else 1  # as the schedule clamps
    bt = math.gcd(n, knobs.batch_per_thread)
    tk = math.gcd(k, knobs.threads_k)
    v = knobs.group  # row_nnz is then per group of V rows (their union)
    fmas = n * k * q * width
    warp_iters = fmas / (32 * pt * bt * v)
    fp32 = 2 * fmas / gpu.fp32_flops
    # per warp and stored offset: the offset and the V weights (contiguous: one wavefront each), then the
    # input loads at two wavefronts each
    l1 = warp_iters * (2 + 2 * pt * bt) / (gpu.sms * gpu.clock_hz * gpu.l1_wavefronts_per_clk)
    blocks = (n // bt) * (k // (tk * v) or 1) * math.ceil(q / (knobs.threads_q * pt))
    off_bytes = offset_bytes(geo)
    weight_bytes = k * width * (4 + off_bytes / v) * math.ceil(q / (knobs.threads_q * pt)) * (n // bt)  # per block
    copy = not geo.input_is_flat  # else the conv reads a view of its input: no pad kernel, no copy
    pad_bytes = n * geo.pad_channels * geo.channel_plane * 4 if copy else 0
    fused = geo.flat_output and not hyb  # the epilogue in the conv's write-back (sparse_conv2d_cuda)
    sums_bytes = 0 if fused else 2 * 4 * n * k * q  # the [N, K, Q] sums written, read back by the epilogue
    io_bytes = 4 * n * geo.c * geo.h * geo.w + 2 * pad_bytes + sums_bytes + 4 * n * k * geo.oh * geo.ow
    memory = weight_bytes / gpu.l2_bytes_s + io_bytes / gpu.dram_bytes_s
    warps = blocks * knobs.threads_q * tk / 32
    occupancy = min(1.0, warps / (gpu.sms * gpu.warps_to_hide_latency))
    launches = (1 + copy + hyb + (not fused)) * gpu.launch_s  # [pad], conv, [overflow], [epilogue]
    terms = {"fp32": fp32 / occupancy, "l1": l1 / occupancy, "memory": memory, "launch": launches}
    body = max(terms["fp32"], terms["l1"], terms["memory"])
    bound = max(("fp32", "l1", "memory"), key=lambda t: terms[t])
    return Prediction(body + launches, bound if body > launches else "launch", terms)


def predict_cudnn(geo: ConvGeometry, mode: str = "fp32", gpu: GPU = H200) -> Prediction:
    """cuDNN's dense conv (implicit GEMM view: M = N*OH*OW, N = K, K = C*R*S)."""
    peak, eff, size = {"fp32": (gpu.fp32_flops, gpu.cudnn_fp32_eff, 4), "tf32": (gpu.tf32_flops, gpu.cudnn_tf32_eff, 4),
                       "fp16": (gpu.fp16_flops, gpu.cudnn_fp16_eff, 2)}[mode]
    m, cols = geo.n * geo.oh * geo.ow, geo.k
    flops = 2 * m * cols * geo.c * geo.r * geo.s
    slots = gpu.sms * 2  # two 128x64 tiles resident per SM
    tiles = math.ceil(m / 128) * math.ceil(cols / 64)
    # small layers: the reduction (C*R*S) split into slices of >= 256 until the GPU is full (split-K)
    tiles *= min(max(1, geo.c * geo.r * geo.s // 256), math.ceil(slots / tiles))
    waves = tiles / (math.ceil(tiles / slots) * slots)  # share of the last wave's slots doing work
    compute = flops / (peak * eff * waves)
    memory = size * (geo.n * geo.c * geo.h * geo.w + geo.k * geo.c * geo.r * geo.s + m * cols) / gpu.dram_bytes_s
    fixed = getattr(gpu, f"cudnn_{mode}_fixed_s")
    terms = {"compute": compute, "memory": memory, "launch": fixed}
    bound = "compute" if compute >= memory else "memory"
    return Prediction(max(compute, memory) + fixed, bound, terms)


def layer_table(geos: list[tuple[str, ConvGeometry]], sparsities=(0.5, 0.7, 0.8, 0.9, 0.95, 0.98),
                knobs: Knobs = Knobs(), gpu: GPU = H200, vector: int = 4) -> list[dict]:
    """One row per (layer, sparsity): predicted seconds of ours (unstructured, and vector-pruned with
    groups of `vector` rows in the grouped format) and of cuDNN's three modes."""
    rows = []
    for name, geo in geos:
        cudnn = {m: predict_cudnn(geo, m, gpu) for m in ("fp32", "tf32", "fp16")}
        for sp in sparsities:
            ours = predict_sparse(geo, magnitude_row_nnz(geo.k, geo.c * geo.r * geo.s, sp), knobs, gpu)
            grouped = predict_sparse(geo, magnitude_row_nnz(geo.k // vector, geo.c * geo.r * geo.s, sp),
                                     replace(knobs, group=vector), gpu)
            rows.append({"layer": name, "geometry": asdict(geo), "sparsity": sp, "batch": geo.n,
                         "ours_s": ours.seconds, "ours_bound": ours.bound, "ours_terms": ours.terms,
                         f"ours_vector{vector}_s": grouped.seconds, f"ours_vector{vector}_bound": grouped.bound,
                         **{f"cudnn_{m}_s": p.seconds for m, p in cudnn.items()},
                         **{f"speedup_vs_{m}": p.seconds / ours.seconds for m, p in cudnn.items()}})
    return rows

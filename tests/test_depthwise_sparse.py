"""Pruned depthwise convs on the sparse kernel (llvm): a channel's nonzero taps as one ELL row of the
block-diagonal weight (ops.formats.depthwise_weight_rows), BN, activation and residual fused as for any
sparse conv; checked against PyTorch over strides, dilation, 3x3/5x5/7x7, odd sizes, batch > 1, an empty
and a dense channel. Priced against the dense depthwise kernel, and kept dense on cuda."""

import numpy as np
import pytest
import torch
from torch import nn

from conftest import rel_err


class DWBlock(nn.Module):
    def __init__(self, c: int, k: int, stride: int, dilation: int, act: nn.Module, residual: bool):
        super().__init__()
        self.conv = nn.Conv2d(c, c, k, stride, dilation * (k // 2), dilation, groups=c, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.act, self.residual = act, residual

    def forward(self, x):
        y = self.act(self.bn(self.conv(x)))  # [N, C, OH, OW]
        return y + x if self.residual else y


def _pruned(c, k, stride, dilation, act, residual, sparsity, seed) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    m = DWBlock(c, k, stride, dilation, act, residual).eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.2, 0.2, generator=g)
        m.bn.running_var.uniform_(0.5, 1.5, generator=g)
        m.conv.weight.mul_((torch.rand(m.conv.weight.shape, generator=g) >= sparsity).float())
        m.conv.weight[0].zero_()            # an empty channel: its output is the epilogue of the bias alone
        m.conv.weight[1].normal_(generator=g)  # a dense channel: every tap stored
    return m


def _compile(model: nn.Module, x: torch.Tensor, target, threshold: float | None):
    """(output, the conv's LayerDecision) of the model through our pipeline (threshold None: by cost)."""
    import tvm
    from tvm import relax

    from unsparse_tvm.frontend import import_program
    from unsparse_tvm.relay_passes import build_pipeline

    mod, names = import_program(torch.export.export(model, (x,)))
    report: list = []
    ex = tvm.compile(mod, target=target, relax_pipeline=build_pipeline(target, threshold=threshold, names=names,
                                                                       report=report))
    y = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
    (decision,) = [d for d in report if d.op == "conv2d"]
    return (y if hasattr(y, "numpy") else y[0]).numpy(), decision


CASES = [  # channels, kernel, stride, dilation, activation, residual, input size, batch
    (16, 3, 1, 1, nn.SiLU(), False, 29, 1),     # odd size
    (24, 3, 2, 1, nn.ReLU6(), False, 32, 2),    # stride 2 (phase planes), batch 2
    (32, 5, 2, 1, nn.SiLU(), False, 17, 1),     # 5x5 stride 2 on an odd map
    (16, 3, 1, 2, nn.ReLU(), True, 14, 1),      # dilation 2, residual
    (8, 7, 1, 1, nn.Identity(), False, 9, 3),   # 7x7, no activation, batch 3
]


@pytest.mark.parametrize("case", CASES, ids=[f"c{c[0]}k{c[1]}s{c[2]}d{c[3]}n{c[6]}b{c[7]}" for c in CASES])
def test_pruned_depthwise_runs_sparse_and_matches_torch(case, llvm):
    c, k, stride, dilation, act, residual, size, batch = case
    seed = int(np.random.default_rng().integers(1 << 30))
    model = _pruned(c, k, stride, dilation, act, residual, 0.9, seed)
    x = torch.randn(batch, c, size, size)
    y, decision = _compile(model, x, llvm, threshold=0.5)
    assert (decision.decision, decision.format) == ("sparse", "ell"), decision.label
    assert decision.nnz == int((model.conv.weight != 0).sum())
    with torch.no_grad():
        ref = model(x).numpy()
    assert rel_err(y, ref) < 1e-5, f"seed {seed}"


def test_depthwise_is_priced_against_the_depthwise_kernel(llvm):
    """By predicted time (no threshold): 95% pruned goes sparse, and the dense side is the depthwise
    kernel's (cost.model.depthwise_cost: R*S multiply-adds per output), not a full conv's C*R*S, which
    would make every depthwise conv look worth running sparse."""
    from unsparse_tvm.cost.model import BUILTIN

    x = torch.randn(1, 96, 32, 32)
    _, d = _compile(_pruned(96, 3, 1, 1, nn.SiLU(), False, 0.95, 0), x, llvm, threshold=None)
    assert d.decision == "sparse" and d.sparse_us < d.dense_us, d
    full_conv_us = 96 * 96 * 9 * 32 * 32 / BUILTIN.dense_conv * 1e6
    assert d.dense_us < full_conv_us / 10, d
    # strided: the dense kernel's phase planes are charged (efficientnet's 240-channel 3x3/2 on 16x16 ran
    # 43 us dense, 19 sparse), and the 96-channel one on 64x64 at 50%, whose nonzeros read every phase plane,
    # stays dense (Xeon: 50 us either way); at 90% it reads a third of them (ops.phase_planes), priced so
    _, strided = _compile(_pruned(240, 3, 2, 1, nn.SiLU(), False, 0.9, 0), torch.randn(1, 240, 16, 16), llvm, None)
    assert strided.decision == "sparse", strided
    x = torch.randn(1, 96, 64, 64)
    _, half = _compile(_pruned(96, 3, 2, 1, nn.SiLU(), False, 0.5, 0), x, llvm, None)
    assert half.decision == "dense", half
    _, most = _compile(_pruned(96, 3, 2, 1, nn.SiLU(), False, 0.9, 0), x, llvm, None)
    assert most.sparse_us < half.sparse_us / 2, (most, half)


def _phase_plane_counts(model: nn.Module, x: torch.Tensor, target) -> list[int]:
    """The planes each phase-plane copy (ops.phase_planes) of the model's scheduled module makes."""
    from unsparse_tvm.frontend import import_program
    from unsparse_tvm.ops.names import PHASE_PLANES, op_of
    from unsparse_tvm.relay_passes import build_pipeline

    mod, names = import_program(torch.export.export(model, (x,)))
    out = build_pipeline(target, threshold=0.0, names=names, stop_after="schedule")(mod)
    return [int(f.attrs["unsparse.planes"][0]) for f in out.functions.values() if op_of(f) == PHASE_PLANES]


def _planes_read(weight: torch.Tensor, stride: int) -> int:
    """(channel, row phase, column phase) triples some nonzero tap of a depthwise weight [C, 1, R, S] reads."""
    c, r, s = torch.nonzero(weight[:, 0]).T
    return len({(int(a), int(b) % stride, int(d) % stride) for a, b, d in zip(c, r, s)})


def test_strided_depthwise_copies_only_the_planes_it_reads(llvm):
    """A stride-2 depthwise conv at 90% copies the phase planes its nonzeros read (a zero plane may follow, for
    the flat domain's reads past the last), and matches PyTorch; with every tap kept it reads every plane and
    keeps the pad stage's copy (no phase-plane operator)."""
    x = torch.randn(2, 24, 31, 31)
    for sparsity, split in ((0.9, True), (0.0, False)):
        model = _pruned(24, 3, 2, 1, nn.ReLU6(), False, sparsity, int(np.random.default_rng().integers(1 << 30)))
        if not split:
            model.conv.weight.data[0].normal_()  # every channel dense
        counts = _phase_plane_counts(model, x, llvm)
        used = _planes_read(model.conv.weight, 2)
        if split:
            assert len(counts) == 1 and used <= counts[0] <= used + 1 and used < 24 * 4 * 0.6, (counts, used)
        else:
            assert counts == [] and used == 24 * 4
        y, decision = _compile(model, x, llvm, threshold=0.0)
        with torch.no_grad():
            assert decision.decision == "sparse" and rel_err(y, model(x).numpy()) < 1e-5


def test_cuda_keeps_depthwise_dense(cuda):
    from unsparse_tvm.cost.model import CostModel
    from unsparse_tvm.frontend import import_program
    from unsparse_tvm.relay_passes.fold_batchnorm import FoldBatchNormIntoConv
    from unsparse_tvm.relay_passes.sparsify_conv2d import SparsifyConv2d

    model = _pruned(16, 3, 1, 1, nn.ReLU(), False, 0.9, 0)
    mod, names = import_program(torch.export.export(model, (torch.randn(1, 16, 8, 8),)))
    report: list = []
    with cuda:
        SparsifyConv2d(0.5, names, report, None, CostModel("cuda"))(FoldBatchNormIntoConv(names)(mod))
    (decision,) = report
    assert decision.label == "dense (grouped conv, groups=16)"


@pytest.mark.parametrize("mcpu, size, joined", [("skylake-avx512", 56, True), ("skylake-avx512", 28, True),
                                                ("haswell", 28, True), ("skylake-avx512", 14, False)])
def test_depthwise_rows_of_part_of_a_vector_join_the_write_back(mcpu, size, joined):
    """A depthwise conv's output rows of whole 4-lane vectors (56 wide under AVX-512: 3.5 vectors of 16; 28 wide:
    1.75) run as vectors of 8 or 4 lanes over the output map itself (ConvGeometry.with_row_domain), so the epilogue
    (BN, SiLU) joins the accumulators' write-back instead of a pass over sums written out and read back
    (efficientnet_b0's 144 x 56x56 3x3 at 90%, one thread, Xeon: 0.340 -> 0.225 ms). Rows of 14 would take
    2-lane vectors and keep the pass. Compiled only (the scheduled IR), for any host."""
    from conftest import cpu_target
    from unsparse_tvm.frontend import import_program
    from unsparse_tvm.ops.names import SPARSE_CONV2D, op_of
    from unsparse_tvm.relay_passes import build_pipeline

    x = torch.randn(1, 16, size, size)
    mod, names = import_program(torch.export.export(_pruned(16, 3, 1, 1, nn.SiLU(), False, 0.9, 0), (x,)))
    out = build_pipeline(cpu_target(mcpu), threshold=0.0, names=names, stop_after="schedule")(mod)
    (func,) = [f for f in out.functions.values() if op_of(f) == SPARSE_CONV2D]
    assert ("unsparse.row_domain" in func.attrs) == joined
    assert ('sblock("epilogue' in func.script()) != joined  # a pass of its own (maybe partitioned: epilogue_i30)


def test_a_tuning_log_counts_no_phase_plane_copy(tmp_path, llvm):
    """`compile --tuning-log` reports how many tunable layers its records scheduled: the phase-plane copy before
    a strided depthwise conv (no knobs, never tuned) is not one of them, so a log covering the conv says 1 of 1
    (it said 1 of 2: every unsparse operator was counted)."""
    import unsparse_tvm
    from unsparse_tvm.tuning import open_database

    x = torch.randn(1, 48, 40, 40)
    model = _pruned(48, 3, 2, 1, nn.SiLU(), False, 0.9, 0)
    assert len(_phase_plane_counts(model, x, llvm)) == 1
    unsparse_tvm.tune(model, str(tmp_path), 2, example_input=x, threshold=0.0)
    db = open_database(str(tmp_path), llvm)
    from unsparse_tvm.frontend import import_program
    from unsparse_tvm.relay_passes import build_pipeline

    mod, names = import_program(torch.export.export(model, (x,)))
    build_pipeline(llvm, threshold=0.0, names=names, database=db, stop_after="schedule")(mod)
    assert (db.stats["layers"], db.stats["layers_applied"]) == (1, 1), db.summary()

"""The Relax passes: batch-norm folding, per-layer decisions, epilogue fusion (incl. residual), and
that nothing is left unscheduled on llvm."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import rel_err


class ResBlock(nn.Module):
    """conv-bn-relu, conv-bn + identity, relu: the ResNet pattern, with conv biases before BN too."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        return torch.relu(self.b2(self.c2(y)) + x)


def _prepared(model, shape, sparsity=0.9, seed=0):
    from unsparse_tvm.compress.masks import magnitude_prune

    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    magnitude_prune(model.eval(), sparsity)
    x = torch.randn(*shape)
    return torch.export.export(model, (x,)), x


def test_batchnorm_folded_residual_and_relu_fused(llvm):
    import tvm
    from tvm import relax

    from unsparse_tvm.build import compile_program

    ep, x = _prepared(ResBlock(), (2, 8, 6, 6))
    compiled = compile_program(ep, llvm, threshold=0.7)
    fused = {r.name: r.fused for r in compiled.report}
    assert fused == {"c1": "bias+relu", "c2": "bias+residual+relu"}
    vm = relax.VirtualMachine(compiled.executable, tvm.cpu())
    y = vm["main"](tvm.runtime.tensor(x.numpy()))[0].numpy()
    assert rel_err(y, ep.module()(x).detach().numpy()) < 1e-5


def test_bn_fold_keeps_pruned_zeros_zero():
    import tvm
    from tvm import relax

    from unsparse_tvm.frontend import import_program
    from unsparse_tvm.relay_passes import FoldBatchNormIntoConv
    from unsparse_tvm.relay_passes._util import const_array, is_op

    ep, _ = _prepared(ResBlock(), (1, 8, 6, 6))
    mod, names = import_program(ep)
    mod = tvm.transform.Sequential([FoldBatchNormIntoConv(names), relax.transform.FoldConstant()])(mod)
    text = mod.script()
    assert "batch_norm" not in text
    convs = [b.value for blk in mod["main"].body.blocks for b in blk.bindings if is_op(b.value, "relax.nn.conv2d")]
    original = [ep.state_dict["c1.weight"].detach().numpy(), ep.state_dict["c2.weight"].detach().numpy()]
    for call, w in zip(convs, original):
        folded = const_array(call.args[1])
        np.testing.assert_array_equal(folded == 0, w == 0)


@pytest.mark.parametrize("threshold,expected", [(0.95, "dense (below threshold)"), (0.85, "sparse"), (0.0, "sparse")])
def test_threshold_decides_per_layer(threshold, expected, llvm):
    from unsparse_tvm.build import compile_program

    ep, _ = _prepared(ResBlock(), (1, 8, 6, 6), sparsity=0.9)
    compiled = compile_program(ep, llvm, threshold=threshold)
    assert {r.label for r in compiled.report} == {expected}
    for r in compiled.report:
        assert r.shape == [8, 8, 3, 3] and r.nnz == round(8 * 72 * (1 - r.sparsity))
        if expected == "sparse":
            assert r.format in ("ell", "hyb") and r.padded >= r.nnz


@pytest.mark.parametrize("sparse", [True, False])
def test_nothing_left_unscheduled_on_llvm(sparse, llvm, monkeypatch):
    """Every PrimFunc leaving the schedule phase is scheduled, sparse or dense (pool, linear, add too)."""
    from tvm import tirx

    from unsparse_tvm.frontend import import_program
    from unsparse_tvm.relay_passes import build_pipeline
    from unsparse_tvm.ops.names import is_scheduled
    from unsparse_tvm.schedules import sparse_conv2d_cpu

    from conftest import pruned_program

    monkeypatch.setattr(sparse_conv2d_cpu, "SERIAL_FMAS", 0)  # smallcnn's convs are small enough to run serially
    monkeypatch.setattr("unsparse_tvm.schedules.small_loops.MAX_STATEMENTS", 0)  # and its pools and linears too

    mod, names = import_program(pruned_program("smallcnn"))
    with llvm:
        mod = build_pipeline(llvm, sparse=sparse, names=names, stop_after="schedule")(mod)
    funcs = [(gv.name_hint, f) for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert len(funcs) >= 4
    unscheduled = [name for name, f in funcs if not is_scheduled(f)]
    assert unscheduled == []
    # and they really carry parallel loops, not just the flag
    for name, f in funcs:
        assert "T.parallel" in f.script() or "parallel" in f.script(), name


def test_sparse_kernels_keep_their_identity_through_fusion(llvm):
    """FuseOps must not merge our kernels with neighbours (their attributes would be lost)."""
    from tvm import tirx

    from unsparse_tvm.frontend import import_program
    from unsparse_tvm.relay_passes import build_pipeline
    from unsparse_tvm.ops.names import op_of

    from conftest import pruned_program

    mod, names = import_program(pruned_program("smallcnn"))
    with llvm:
        mod = build_pipeline(llvm, names=names, stop_after="legalize")(mod)
    ops = sorted(op_of(f) for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc) and op_of(f))
    assert ops == ["sparse_conv2d"] * 3 + ["sparse_dense"] * 2


class DownBlock(nn.Module):
    """ResNet's downsampling block: the 1x1 shortcut conv's chain ends after the main path's, so
    decision order differs from conv order: what mislabelled bench's per-layer rows once."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16)
        self.b, self.bn_b = nn.Conv2d(16, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
        self.down, self.bn_d = nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 4 * 4, 5)

    def forward(self, x):
        y = torch.relu(self.bn_a(self.a(x)))
        y = torch.relu(self.bn_b(self.b(y)) + self.bn_d(self.down(x)))
        return self.fc(torch.flatten(y, 1))


def test_bench_per_layer_rows_are_named_after_their_own_weights(tmp_path):
    from unsparse_tvm.bench import bench

    ep, _ = _prepared(DownBlock(), (1, 8, 8, 8))
    path = str(tmp_path / "down.pt2")
    torch.export.save(ep, path)
    result = bench(path, "llvm", repeat=1)
    shapes = {k.removesuffix(".weight"): list(v.shape) for k, v in ep.state_dict.items() if k.endswith("weight")}
    assert sorted(r["name"] for r in result["layers"]) == ["a", "b", "down", "fc"]
    for row in result["layers"]:
        assert row["shape"] == shapes[row["name"]], row
        assert row["max_rel_error"] < 1e-4


def test_two_conv_chains_meeting_at_a_residual_add_are_both_sparse(llvm):
    """The main path and the shortcut conv both lead into one add: only one chain may fuse it, and the
    other conv must still become sparse (not silently stay dense)."""
    import tvm
    from tvm import relax

    from unsparse_tvm.build import compile_program

    ep, x = _prepared(DownBlock(), (2, 8, 8, 8))
    compiled = compile_program(ep, llvm, threshold=0.7)
    decisions = {r.name: r.decision for r in compiled.report}
    assert decisions == {"a": "sparse", "b": "sparse", "down": "sparse", "fc": "sparse"}
    fused = sorted(r.fused for r in compiled.report if r.name in ("b", "down"))
    assert fused == ["bias", "bias+residual+relu"]
    y = relax.VirtualMachine(compiled.executable, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))[0].numpy()
    assert rel_err(y, ep.module()(x).detach().numpy()) < 1e-5


class ClipBlock(nn.Module):
    """MobileNet's conv-bn-ReLU6 (a 1x1 and a 3x3, sparse or dense) and a clamp with a nonzero floor (no
    ReLU: it stays its own op)."""

    def __init__(self):
        super().__init__()
        self.a, self.ba = nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.b, self.bb = nn.Conv2d(16, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = nn.functional.relu6(self.ba(self.a(x)))
        y = nn.functional.relu6(self.bb(self.b(y)))
        return torch.clamp(self.c(y), -1.0, 2.0)


@pytest.mark.parametrize("sparse_b", [True, False])
def test_relu6_is_fused_into_sparse_and_dense_convs(sparse_b, llvm):
    import tvm
    from tvm import relax

    from unsparse_tvm.build import compile_program

    model = ClipBlock()
    ep, x = _prepared(model, (2, 8, 7, 9))
    with torch.no_grad():
        model.a.weight *= 8  # pruned zeros stay zero; enough activations above 6 for the cap to matter
        assert (model.ba(model.a(x)) > 6).any()
    ep = torch.export.export(model, (x,))
    compiled = compile_program(ep, llvm, threshold=0.7 if sparse_b else 0.95)
    if sparse_b:  # dense layers (LowerDenseConv2d) fuse the same chain but report no label
        fused = {r.name: r.fused for r in compiled.report}
        assert fused == {"a": "bias+relu6", "b": "bias+relu6", "c": "bias"}  # clamp(-1, 2) is no ReLU
    y = relax.VirtualMachine(compiled.executable, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))[0].numpy()
    ref = ep.module()(x).detach().numpy()
    assert rel_err(y, ref) < 1e-5


class SiluBlock(nn.Module):
    """EfficientNet's conv-bn-SiLU (a 1x1, a strided 3x3), a residual add before a SiLU, and a conv whose
    output has a second user (its SiLU cannot fuse: the un-activated value is still needed)."""

    def __init__(self):
        super().__init__()
        self.a, self.ba = nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.b, self.bb = nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c = nn.Conv2d(16, 16, 1)
        self.d = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        y = nn.functional.silu(self.ba(self.a(x)))
        y = nn.functional.silu(self.bb(self.b(y)))
        y = nn.functional.silu(self.c(y) + y)
        z = self.d(y)
        return nn.functional.silu(z) * z


@pytest.mark.parametrize("sparse_b", [True, False])
def test_silu_is_fused_into_sparse_and_dense_convs(sparse_b, llvm):
    import tvm
    from tvm import relax

    from unsparse_tvm.build import compile_program
    from unsparse_tvm.frontend import import_program
    from unsparse_tvm.relay_passes import build_pipeline

    ep, x = _prepared(SiluBlock(), (2, 8, 9, 11))
    compiled = compile_program(ep, llvm, threshold=0.7 if sparse_b else 0.95)
    fused = {r.name: r.fused for r in compiled.report}
    if sparse_b:  # dense layers (LowerDenseConv2d) fuse the same chain but report no label
        assert fused == {"a": "bias+silu", "b": "bias+silu", "c": "bias+residual+silu", "d": "bias"}
    # torch.export decomposes SiLU into sigmoid and multiply; only d's, with its extra use, is left
    mod, names = import_program(ep)
    lowered = build_pipeline(llvm, stop_after="lower_dense", threshold=0.7 if sparse_b else 0.95, names=names)(mod)
    assert lowered["main"].script().count("fast_sigmoid") == 1
    y = relax.VirtualMachine(compiled.executable, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))[0].numpy()
    ref = ep.module()(x).detach().numpy()
    assert rel_err(y, ref) < 1e-5


class PointwiseBlock(nn.Module):
    """ResNet's 1x1 convs on a 14x14 map (196 = 12.25 vectors of 16, 24.5 of 8), the second with the block's
    input as its residual."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(24, 16, 1), nn.Conv2d(16, 24, 1)

    def forward(self, x):
        return torch.relu(self.b(torch.relu(self.a(x))) + x)


@pytest.mark.parametrize("mcpu,copied", [("haswell", False), ("skylake-avx512", True)])
def test_pointwise_convs_on_14x14_overlap_their_last_vectors(mcpu, copied, llvm):
    """ConvGeometry.with_overlap: the flat domain's last vectors shifted back inside the map and the residual
    reaching a flat epilogue. Under AVX2 neither conv copies its input (no pad stage); under AVX-512 a
    196-float channel pitch would split 3 in 4 vector loads across cache lines, so both copy it at a pitch of
    208 (with_aligned_channels). Scheduled for both ISAs (any host), numerics on this host as PyTorch's."""
    import tvm
    from tvm import relax

    from conftest import cpu_target
    from unsparse_tvm.build import compile_program
    from unsparse_tvm.frontend import import_program
    from unsparse_tvm.relay_passes import build_pipeline
    from unsparse_tvm.schedules import cpu_vector_lanes

    ep, x = _prepared(PointwiseBlock(), (2, 24, 14, 14))
    mod, names = import_program(ep)
    target = cpu_target(mcpu)
    scheduled = build_pipeline(target, names=names, report=[], threshold=0.7, stop_after="schedule")(mod)
    convs = [f for _, f in scheduled.functions.items() if isinstance(f, tvm.tirx.PrimFunc)
             and "unsparse.op" in f.attrs and str(f.attrs["unsparse.op"]).startswith("sparse_conv2d")]
    assert len(convs) == 2
    for f in convs:
        assert int(f.attrs["unsparse.overlap"]) == cpu_vector_lanes(target)[0]
        assert ("pad_flat" in f.script()) == copied
    compiled = compile_program(ep, llvm, threshold=0.7)
    assert {r.name: r.fused for r in compiled.report} == {"a": "bias+relu", "b": "bias+residual+relu"}
    y = relax.VirtualMachine(compiled.executable, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))[0].numpy()
    assert rel_err(y, ep.module()(x).detach().numpy()) < 1e-5


@pytest.mark.parametrize("serial_fmas", [200_000, 0], ids=["small kernel serial", "control: threshold 0"])
def test_small_sparse_convs_have_no_parallel_loop(serial_fmas, llvm, monkeypatch):
    """A conv of fewer multiply-adds than SERIAL_FMAS (here 8x8 3x3 on 6x6: ~5 k) is scheduled without a
    parallel loop (its pad copy, rows and epilogue); with the threshold at 0 the same conv forks as before.
    Numerics are the other tests' (every small conv in them now runs serially)."""
    from unsparse_tvm.frontend import import_program
    from unsparse_tvm.relay_passes import build_pipeline
    from unsparse_tvm.schedules import sparse_conv2d_cpu

    monkeypatch.setattr(sparse_conv2d_cpu, "SERIAL_FMAS", serial_fmas)
    ep, _ = _prepared(ResBlock(), (2, 8, 6, 6))
    mod, names = import_program(ep)
    with llvm:
        scheduled = build_pipeline(llvm, names=names, threshold=0.7, stop_after="schedule")(mod)
    kernels = [f.script() for gv, f in scheduled.functions_items() if gv.name_hint.startswith("sparse_conv2d")]
    assert len(kernels) == 2
    assert all(("T.parallel" in k) == (serial_fmas == 0) for k in kernels)

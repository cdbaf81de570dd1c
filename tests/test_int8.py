"""int8 execution: the int8 sparse conv kernel against a PyTorch reference of the same
integer arithmetic on every x86 dot-product path, channel-quad pruning, calibration, the compile path
and digits accuracy."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import assert_one_line_error, cpu_target, sparse_weight
from unsparse_tvm.cli import main
from unsparse_tvm.ops.geometry import ConvGeometry
from unsparse_tvm.schedules.x86_int8 import act_qmax
from unsparse_tvm.target import kernel_target, target_cpu_features
from unsparse_tvm.testing.isa import skip_unless_runs_here
from unsparse_tvm.ops.int8_formats import (ActQuant, conv_quad_rows, epilogue_consts, quantize_weight, torch_quantize,
                                    dense_quad_rows, torch_linear_reference, torch_reference)

# Outputs are float32(acc) * out_scale[k] + bias (+ residual): one integer off moves an output by a whole
# out_scale[k], float32 rounding (FMA contraction, the order of the adds) by a few ulps of |y|, ~1e-6 here
# where out_scale is ~1e-4: a quarter quantum tells them apart
QUANTUM_SHARE = 0.25

# the x86 dot products: this CPU's, AVX-512 VNNI, AVX-512 without VNNI, AVX2. Each is compiled and its
# assembly checked on every machine; it runs where this CPU executes it (unsparse_tvm.testing.isa)
MCPUS = [None, "cascadelake", "skylake-avx512", "haswell"]

# (N, C, H, W, K, R, S, stride, padding (t, l, b, r), dilation, sparsity)
CASES = [
    (1, 3, 8, 8, 4, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 0.9),
    (2, 8, 9, 7, 12, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 0.8),      # batch 2, odd sizes
    (1, 8, 11, 11, 16, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), 0.9),    # stride 2
    (1, 6, 10, 12, 8, 5, 5, (1, 1), (2, 2, 2, 2), (1, 1), 0.7),     # 5x5, C not a multiple of 4
    (1, 4, 15, 15, 8, 7, 7, (2, 2), (3, 3, 3, 3), (1, 1), 0.9),     # 7x7 stride 2 (ResNet stem)
    (1, 8, 9, 9, 8, 3, 3, (1, 1), (0, 1, 2, 1), (1, 1), 0.9),       # asymmetric padding
    (1, 8, 12, 12, 8, 3, 3, (1, 1), (2, 2, 2, 2), (2, 2), 0.9),     # dilation 2
    (1, 16, 8, 8, 16, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 0.0),     # dense
    (1, 16, 8, 8, 16, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 0.99),    # 99%: mostly empty rows
    (3, 16, 5, 5, 24, 1, 1, (2, 2), (0, 0, 0, 0), (1, 1), 0.9),     # 1x1 stride 2, batch 3
    (1, 32, 2, 2, 16, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 0.95),    # tiny spatial
    (2, 5, 13, 10, 7, 3, 4, (3, 2), (1, 0, 2, 1), (1, 2), 0.8),     # stride 3x2 + dilation, odd K
    (2, 12, 16, 16, 8, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 0.8),    # 1x1 on whole vectors: epilogue in the write-back
    (2, 8, 7, 7, 12, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 0.8),      # 1x1 on 7x7: flat epilogue per row tile, tail 1
    (1, 16, 14, 14, 16, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 0.9),   # 1x1 on 14x14: 12 vectors of 16 and a tail of 4
    (2, 8, 16, 16, 8, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 0.8),     # rows of 16 in rows of 18: a row domain
    (1, 4, 32, 32, 8, 7, 7, (2, 2), (3, 3, 3, 3), (1, 1), 0.9),     # stem-like 7x7/2, rows of 16 in 19: row domain
    (2, 16, 4, 4, 12, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 0.8),     # 4x4, batch 2: input as patches
    (1, 6, 4, 4, 8, 5, 5, (1, 1), (2, 2, 2, 2), (1, 1), 0.7),       # patches, 5x5, C not a multiple of 4
    (1, 8, 4, 4, 8, 3, 3, (1, 1), (2, 2, 2, 2), (2, 2), 0.9),       # patches, dilation 2
]


def build_int8_conv(x, weight, bias, residual, relu, geo, act, mcpu=None, subsample=False, compact=True, config=None):
    """Build int8_ops.sparse_conv2d_int8 with the x86 rule for `mcpu`: (lib, arrays, out shape, wq, wscale, target).
    subsample: a strided 1x1 geo built as the pass does on llvm (stride 1, every s-th input read in place);
    compact: offsets stored as uint16 where they fit, as the pass does on llvm (else int32); config: the rule's
    knobs (default its Config())."""
    from unsparse_tvm.ops.formats import compact_offsets

    import tvm
    from tvm import te

    from unsparse_tvm.ops import sparse_int8 as int8_ops
    from unsparse_tvm.relay_passes._conv_match import strided_pointwise
    from unsparse_tvm.schedules import rule_for
    from unsparse_tvm.schedules.row_extents import trim_row_loops

    from unsparse_tvm.schedules import cpu_vector_lanes

    target = cpu_target(mcpu)
    sub = geo.stride if subsample else (1, 1)
    # a strided 1x1 on its subsampled input, output rows of whole vectors (or, 8 wide, half vectors) as the
    # domain (the pass: strided convs and 8x8 maps; here stride 1 too), or a 4x4 map's patches (the pass: stride 1)
    lanes = cpu_vector_lanes(target)[0]
    geo = strided_pointwise(geo) if subsample else geo.with_row_domain(lanes, narrow=True).with_patches(lanes)
    wq, wscale = quantize_weight(weight)
    rows = conv_quad_rows(wq, geo)
    comp, out_scale = epilogue_consts(wq, wscale, act)
    off = rows.off_with_lengths()  # as the pass stores them on llvm: each row's length last (TrimRowLoops)
    off = compact_offsets(off) if compact else off
    arrays = [x, rows.data, off, comp, out_scale] + [a for a in (bias, residual) if a is not None]
    holders = [te.placeholder(a.shape, str(a.dtype), f"a{i}") for i, a in enumerate(arrays)]
    out = int8_ops.sparse_conv2d_int8(*holders, geo=geo, act=act, quads=rows.pad_quads, has_bias=bias is not None,
                                         has_residual=residual is not None, relu=relu, subsample=sub)
    func = te.create_prim_func(holders + [out]).with_attr("unsparse.op", "sparse_conv2d_int8").with_attr(
        "unsparse.pad_shape", [rows.pad_quads, *geo.pad_shape[1:]])
    func = func.with_attr("unsparse.row_domain", geo.ow) if geo.row_domain else func
    func = func.with_attr("unsparse.patches", 1) if geo.patches else func
    with target:
        sch = rule_for("sparse_conv2d_int8", "llvm").with_config(config).apply(func, target)
    mod = tvm.IRModule({"main": trim_row_loops(sch.mod["main"])})  # the loop over quads ends at the rows' lengths
    lib = tvm.compile(mod, target=kernel_target(target, mod))  # what compile builds it for
    lib.scheduled = mod["main"].script()  # for tests of the schedule's structure
    lib.row_domain = geo.row_domain
    return lib, arrays, [int(d) for d in out.shape], wq, wscale, target


def run_built(lib, arrays, out_shape) -> np.ndarray:
    import tvm

    args = [tvm.runtime.tensor(a) for a in arrays] + [tvm.runtime.tensor(np.zeros(out_shape, np.float32))]
    lib(*args)
    return args[-1].numpy()


SUBSAMPLED = [(3, 16, 5, 5, 24, 1, 1, (2, 2), (0, 0, 0, 0), (1, 1), 0.9),   # resnet's downsample, batch 3
              (1, 12, 14, 9, 8, 1, 1, (2, 3), (0, 0, 0, 0), (1, 1), 0.8)]   # strides per axis, odd sizes


@pytest.mark.parametrize("mcpu", MCPUS, ids=lambda m: m or "host")
@pytest.mark.parametrize("case", CASES + [c + ("subsampled",) for c in SUBSAMPLED],
                         ids=lambda c: "x".join(map(str, c[:7])) + f"-s{c[7][0]}{c[7][1]}-p{c[10]}" + "-sub" * (len(c) > 11))
def test_int8_conv_is_the_integer_arithmetic(case, mcpu):
    """Exact in the integers: see QUANTUM_SHARE. Every path's assembly is checked on every machine, its
    numerics where this CPU runs it."""
    from unsparse_tvm.schedules.x86_int8 import int8_kind

    n, c, h, w, k, r, s, stride, pad, dil, sp = case[:11]
    rng = np.random.default_rng(zlib.crc32(repr((case, mcpu)).encode()))  # hash(None) varies per run in 3.11
    weight = sparse_weight((k, c, r, s), sp, rng, empty_rows=k // 8, dense_rows=1 if sp < 0.99 else 0)
    geo = ConvGeometry(n, c, h, w, k, r, s, stride, pad, dil)
    signed = bool(rng.integers(2))  # a network input (zero point in the middle) or a post-ReLU activation
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    x = x if signed else np.abs(x)
    act = ActQuant.from_range(float(x.min()), float(x.max()) * 0.8, act_qmax(cpu_target(mcpu)))  # some clip at qmax
    bias = rng.standard_normal(k).astype(np.float32) if k % 2 == 0 else None
    residual = rng.standard_normal((n, k, geo.oh, geo.ow)).astype(np.float32) if rng.integers(2) else None
    relu = bool(rng.integers(2))
    lib, arrays, out_shape, wq, wscale, target = build_int8_conv(x, weight, bias, residual, relu, geo, act, mcpu,
                                                                 subsample=len(case) > 11)
    asm = lib.mod.inspect_source("asm")
    features, vnni = target_cpu_features(target), int8_kind(target) == "vnni"
    assert vnni == ({"avx512vnni", "avx512vl"} <= features) and (mcpu is None or vnni == (mcpu == "cascadelake"))
    assert ("vpdpbusd" in asm) == vnni and ("vpmaddubsw" in asm) == (not vnni)
    assert "avx512f" in features or "zmm" not in asm  # no AVX-512 register where the CPU has none
    skip_unless_runs_here(target)
    y = run_built(lib, arrays, out_shape)
    ref = torch_reference(x, wq, wscale, act, bias, residual, relu, stride, pad, dil).numpy()
    assert y.shape == ref.shape
    _, out_scale = epilogue_consts(wq, wscale, act)
    assert (np.abs(y - ref) <= QUANTUM_SHARE * out_scale.reshape(1, -1, 1, 1)).all(), float(np.abs(y - ref).max())


@pytest.mark.parametrize("compact", [True, False])
def test_int8_offsets_are_uint16_where_they_fit_and_int32_elsewhere(compact):
    """The same conv with its offsets as uint16 (what the pass stores where a layer's fit) and as int32: each
    tensorizes to its own intrinsic, and both are the integer arithmetic."""
    rng = np.random.default_rng(5)
    weight = sparse_weight((16, 12, 3, 3), 0.8, rng)
    geo = ConvGeometry(2, 12, 9, 7, 16, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1))
    x = np.abs(rng.standard_normal((2, 12, 9, 7))).astype(np.float32)
    act = ActQuant.from_range(0.0, float(x.max()), act_qmax(cpu_target(None)))  # 127 without VNNI (saturation)
    lib, arrays, out_shape, wq, wscale, target = build_int8_conv(x, weight, None, None, True, geo, act, compact=compact)
    assert str(arrays[2].dtype) == ("uint16" if compact else "int32")
    assert ('"uint16"' in lib.scheduled) == compact  # tensorized by the intrinsic of that offset type
    skip_unless_runs_here(target)
    y = run_built(lib, arrays, out_shape)
    ref = torch_reference(x, wq, wscale, act, None, None, True, (1, 1), (1, 1, 1, 1), (1, 1)).numpy()
    _, out_scale = epilogue_consts(wq, wscale, act)
    assert (np.abs(y - ref) <= QUANTUM_SHARE * out_scale.reshape(1, -1, 1, 1)).all()


@pytest.mark.parametrize("size,fused", [(16, True), (6, False)])
def test_int8_epilogue_joins_the_write_back_where_the_output_is_the_flat_domain(size, fused):
    """A pointwise conv whose map is whole vectors (16x16) dequantises in the accumulators' write-back (no
    "epilogue" block, no int32 sums written out); a 6x6 map (36 of 40 flat positions kept) keeps a flat pass of
    its own, run inside the conv's parallel row tile right after the tile's sums (no third parallel loop)."""
    rng = np.random.default_rng(size)
    weight = sparse_weight((8, 12, 1, 1), 0.8, rng)
    geo = ConvGeometry(1, 12, size, size, 8, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1))
    x = np.abs(rng.standard_normal((1, 12, size, size))).astype(np.float32)
    act = ActQuant.from_range(0.0, float(x.max()), act_qmax(cpu_target(None)))  # 127 without VNNI (saturation)
    lib, *_ = build_int8_conv(x, weight, None, None, True, geo, act)
    assert geo.flat_output == fused
    assert ('T.sblock("epilogue' in lib.scheduled) == (not fused)
    assert lib.scheduled.count("T.parallel(") == 2  # the pad stage's and the conv's


@pytest.mark.parametrize("stride,pad,k", [(1, 1, 3), (2, 3, 7)])
def test_int8_row_domain_joins_the_write_back(stride, pad, k):
    """Output rows of whole vectors (16) inside padded rows (18, or the stem's phase planes of 19): the conv
    runs over the output map itself, read at pitch Wq, and dequantises in the write-back (no epilogue pass)."""
    rng = np.random.default_rng(k)
    size = 16 * stride
    geo = ConvGeometry(1, 8, size, size, 8, k, k, (stride, stride), (pad,) * 4, (1, 1))
    weight = sparse_weight((8, 8, k, k), 0.8, rng)
    x = np.abs(rng.standard_normal((1, 8, size, size))).astype(np.float32)
    act = ActQuant.from_range(0.0, float(x.max()), act_qmax(cpu_target(None)))  # 127 without VNNI (saturation)
    lib, arrays, out_shape, wq, wscale, target = build_int8_conv(x, weight, None, None, True, geo, act)
    assert geo.ow == 16 and geo.wq > 16 and lib.row_domain
    assert 'T.sblock("epilogue' not in lib.scheduled
    skip_unless_runs_here(target)
    y = run_built(lib, arrays, out_shape)
    ref = torch_reference(x, wq, wscale, act, None, None, True, (stride, stride), (pad,) * 4, (1, 1)).numpy()
    _, out_scale = epilogue_consts(wq, wscale, act)
    assert (np.abs(y - ref) <= QUANTUM_SHARE * out_scale.reshape(1, -1, 1, 1)).all()


def test_quantisation_rounds_half_to_even_and_clamps():
    act = ActQuant(0.5, 128, 255)
    u = torch_quantize(torch.tensor([0.25, 0.75, -64.25, 1e9, -1e9]), act)
    assert u.tolist() == [128, 130, 0, 255, 0]   # 0.5 -> 0, 1.5 -> 2 (even), clamped both ways
    assert ActQuant.from_range(0.0, 2.55).zero_point == 0 and ActQuant.from_range(-1.0, 2.0, 127).zero_point == 64


def test_quad_rows_skip_empty_quads():
    geo = ConvGeometry(1, 6, 5, 5, 3, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1))
    wq = np.zeros((3, 6, 3, 3), np.int8)
    wq[0, 5, 2, 1] = 7          # second quad (channels 4..7), tap (2, 1)
    wq[0, 0, 0, 0] = -3
    rows = conv_quad_rows(wq, geo)
    assert rows.quads == 2 and rows.nnz == 2 and rows.data.shape == (3, 2, 4)
    assert rows.data[0].tolist() == [[-3, 0, 0, 0], [0, 7, 0, 0]]
    assert rows.off[0, 1] == geo.channel_plane + geo.tap_offset(0, 2, 1)
    assert not rows.data[1:].any()  # empty rows: one zero quad each


@pytest.mark.parametrize("shape", [(8, 6, 3, 3), (16, 16, 1, 1), (10, 12)])
def test_channel4_mask_keeps_whole_quads(shape):
    from unsparse_tvm.compress.channel_quads import channel_quad_mask

    t = torch.randn(shape)
    mask = channel_quad_mask(t, 0.75)
    assert abs(float((mask == 0).float().mean()) - 0.75) < 0.1
    m = mask.permute(0, 2, 3, 1) if mask.dim() == 4 else mask        # channels last
    c = m.shape[-1]
    full = m[..., : c // 4 * 4].reshape(*m.shape[:-1], c // 4, 4)
    assert ((full.sum(-1) == 0) | (full.sum(-1) == 4)).all()         # every whole quad kept or removed together
    tail = m[..., c // 4 * 4:]
    assert ((tail.sum(-1) == 0) | (tail.sum(-1) == tail.shape[-1])).all()


def test_channel4_pattern_is_detected():
    from unsparse_tvm.compress.channel_quads import channel_quad_mask
    from unsparse_tvm.compress.report import detect_pattern

    torch.manual_seed(0)
    for shape in [(16, 8, 3, 3), (12, 32)]:
        t = torch.randn(shape)
        assert detect_pattern(t * channel_quad_mask(t, 0.8)) == "channel-4"
        assert detect_pattern(t * (torch.rand(shape) > 0.8)) == "unstructured"
    t = torch.randn(16, 1, 3, 3)  # one input channel: every quad is one weight, so no pattern to see
    assert detect_pattern(t * (torch.rand(t.shape) > 0.8)) == "unstructured"


def test_calibration_records_each_layer_input():
    from unsparse_tvm.compress.calibrate import calibrate, calibration_batches
    from unsparse_tvm.models import build_model, export_program

    model = build_model("smallcnn")
    batches = calibration_batches((1, 1, 8, 8), None, batches=3, batch_size=5)
    got = calibrate(model, batches)["layers"]
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m_, a, n=name: seen.setdefault(n, []).append(a[0]))
             for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in hooks:
        h.remove()
    assert set(got) == set(seen) == {"features.0", "features.2", "features.5", "classifier.0", "classifier.2"}
    for name, xs in seen.items():
        assert got[name] == [float(torch.stack(xs).min()), float(torch.stack(xs).max())]
    assert got["features.2"][0] == 0.0  # after a ReLU
    ep = export_program(model, (1, 1, 8, 8))    # a foreign .pt2 (batch 1: run in slices) gives the same ranges
    sliced = calibrate(ep.module(), batches, ep)["layers"]
    assert set(sliced) == set(got)  # equal up to float rounding (a batch of 1 sums in another order)
    assert all(np.allclose(sliced[k], got[k], rtol=1e-5, atol=1e-6) for k in got)


def _int8_reference(model: nn.Module, ranges: dict, qmax: int) -> nn.Module:
    """The model with every calibrated conv and linear layer replaced by the PyTorch integer reference."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and name in ranges:
            act = ActQuant.from_range(*ranges[name], qmax)
            wq, wscale = quantize_weight(m.weight.detach().numpy())
            b = m.bias.detach().numpy() if m.bias is not None else None
            p = m.padding
            m.forward = (lambda x, wq=wq, ws=wscale, act=act, b=b, st=m.stride, p=p, d=m.dilation:
                         torch_reference(x, wq, ws, act, b, None, False, st, (p[0], p[1], p[0], p[1]), d))
        if isinstance(m, nn.Linear) and name in ranges:
            act = ActQuant.from_range(*ranges[name], qmax)
            wq, wscale = quantize_weight(m.weight.detach().numpy())
            b = m.bias.detach().numpy() if m.bias is not None else None
            m.forward = lambda x, wq=wq, ws=wscale, act=act, b=b: torch_linear_reference(x, wq, ws, act, b)
    return model


def test_compiled_smallcnn_runs_the_integer_arithmetic(llvm, monkeypatch):
    import tvm
    from tvm import relax

    from unsparse_tvm.build import compile_program
    from unsparse_tvm.compress.calibrate import calibrate, calibration_batches
    from unsparse_tvm.models import build_model, export_program

    torch.manual_seed(0)
    model = build_model("smallcnn")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight[torch.rand_like(m.weight) < 0.8] = 0
    ranges = calibrate(model, calibration_batches((3, 1, 8, 8), None, 2, 16))["layers"]
    compiled = compile_program(export_program(model, (3, 1, 8, 8)), llvm, threshold=0.5, activations=ranges)
    int8 = [r for r in compiled.report if r.format in ("int8q4", "int8g4")]  # quads, or gathered (VBMI hosts)
    assert [r.name for r in int8] == ["features.0", "features.2", "features.5", "classifier.0", "classifier.2"]
    # conv -> conv and conv -> max pool -> conv exchange uint8; conv -> flatten -> linear does not
    assert [r.fused for r in int8] == ["bias+relu+requant", "bias+relu+requant", "bias+relu", "bias+relu", "bias"]
    assert all(r.decision == "sparse" for r in int8)
    x = torch.randn(3, 1, 8, 8)
    y = relax.VirtualMachine(compiled.executable, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))[0].numpy()
    monkeypatch.setattr("unsparse_tvm.relay_passes.quantize_int8.CHAIN_UINT8", False)
    unchained = compile_program(export_program(model, (3, 1, 8, 8)), llvm, threshold=0.5, activations=ranges)
    assert not any("requant" in r.fused for r in unchained.report)
    y2 = relax.VirtualMachine(unchained.executable, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))[0].numpy()
    assert np.array_equal(y, y2)  # uint8 between layers changes bytes moved, not one bit of the result
    ref = _int8_reference(model, ranges, act_qmax(llvm))(x).detach().numpy()
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()


def test_quantize_activations_errors_are_one_line(tmp_path, capsys):
    out = tmp_path / "o.pt2"
    assert_one_line_error(["quantize", "smallcnn", "--activations", "int8", "-o", out], capsys, "--dataset")
    assert_one_line_error(["quantize", "smallcnn", "--activations", "int8", "--dataset", "random", "--epochs", "1",
                           "-o", out], capsys, "calibration only")
    assert_one_line_error(["quantize", "smallcnn", "-o", out], capsys, "--scheme")
    assert not out.exists()


def test_digits_int8_within_half_a_point_of_fp32(tmp_path, capsys, llvm):
    """smallcnn at 90% (channel4, fine-tuned): the compiled int8 module on the digits test set."""
    import tvm
    from tvm import relax

    from unsparse_tvm.build import activation_ranges, compile_program
    from unsparse_tvm.frontend import read_quantization
    from unsparse_tvm.compress.data import load_dataset
    from unsparse_tvm.frontend import load_model
    from unsparse_tvm.models import export_program

    dense, pruned, quant = tmp_path / "d.pt2", tmp_path / "p.pt2", tmp_path / "q.pt2"
    assert main(["train", "smallcnn", "--dataset", "digits", "--epochs", "40", "-o", str(dense)]) == 0
    assert main(["prune", str(dense), "--method", "channel4", "--sparsity", "0.9", "--dataset", "digits",
                 "--epochs", "60", "-o", str(pruned)]) == 0
    assert main(["quantize", str(pruned), "--activations", "int8", "--dataset", "digits", "-o", str(quant)]) == 0
    capsys.readouterr()
    data = load_dataset("digits")
    n = len(data.y_test)

    def accuracy(path, int8: bool) -> float:
        module = load_model(str(path)).module.eval()
        compiled = compile_program(export_program(module, (n, 1, 8, 8)), llvm, threshold=0.5,
                                   activations=activation_ranges(read_quantization(str(path))) if int8 else None)
        assert any(r.format in ("int8q4", "int8g4") for r in compiled.report) == int8
        vm = relax.VirtualMachine(compiled.executable, tvm.cpu())
        logits = vm["main"](tvm.runtime.tensor(data.x_test.numpy()))[0].numpy()
        return 100.0 * float((logits.argmax(1) == data.y_test.numpy()).mean())

    fp32, int8 = accuracy(pruned, False), accuracy(quant, True)
    print(f"digits test accuracy: fp32 pruned {fp32:.2f}%, int8 {int8:.2f}%")
    assert fp32 > 90.0
    assert abs(int8 - fp32) <= 0.5, (fp32, int8)


def test_bench_times_int8_next_to_fp32_sparse(tmp_path, capsys):
    from unsparse_tvm.bench import bench

    quant = tmp_path / "q.pt2"
    assert main(["prune", "smallcnn", "--method", "channel4", "--sparsity", "0.9", "-o", str(tmp_path / "p.pt2")]) == 0
    assert main(["quantize", str(tmp_path / "p.pt2"), "--activations", "int8", "--dataset", "random", "-o", str(quant)]) == 0
    from unsparse_tvm.compress.report import describe_program

    assert "activations: int8, 5 layer input ranges calibrated (minmax, 4 batches of random)" in describe_program(str(quant))
    result = bench(str(quant), repeat=1, layers=False, threads=[1])
    assert {"unsparse_ms", "unsparse_int8_ms", "tvm_dense_ms", "torch_ms"} <= set(result["end_to_end"])
    assert result["max_rel_error_vs_torch"]["unsparse_int8"] < 0.1  # random input, calibrated on random inputs
    assert "no layer runs int8" not in capsys.readouterr().out


def test_bench_says_when_int8_execution_is_the_fp32_model(tmp_path, capsys, monkeypatch):
    """Unstructured masks on AVX2 code leave layers fp32 (compile's note; here every one, its quads' fill bar
    raised past 4): bench says its int8 row is the fp32 model again, so a ratio between two builds of the same
    code is not read as what int8 buys (the test above: channel4 quads run int8 and the line is absent)."""
    from unsparse_tvm.bench import bench
    from unsparse_tvm.peers import ONEDNN_ISA

    monkeypatch.setenv("UNSPARSE_MCPU", "haswell")
    monkeypatch.delenv(ONEDNN_ISA, raising=False)  # bench holds the peers to AVX2 for its process: restored after
    monkeypatch.setattr("unsparse_tvm.relay_passes.quantize_int8.SCATTERED_FP32", True)  # conftest's default: off
    monkeypatch.setattr("unsparse_tvm.relay_passes._gathered_int8.MAX_FILL", 5.0)
    monkeypatch.setattr("unsparse_tvm.relay_passes.quantize_int8.GATHERED", False)  # nor gathered (AVX2 has them)
    monkeypatch.setattr("unsparse_tvm.relay_passes.quantize_int8_dense.LANES", False)  # its linear left fp32 too
    quant = tmp_path / "q.pt2"
    assert main(["prune", "smallcnn", "--sparsity", "0.9", "-o", str(tmp_path / "p.pt2")]) == 0
    assert main(["quantize", str(tmp_path / "p.pt2"), "--activations", "int8", "--dataset", "random", "-o", str(quant)]) == 0
    capsys.readouterr()
    bench(str(quant), repeat=1, layers=False, threads=[1], peers=[])
    assert "no layer runs int8 on this code" in capsys.readouterr().out


@pytest.mark.parametrize("n,h,w,r,pad", [(2, 48, 48, 1, 0), (1, 56, 56, 3, 1)])
def test_int8_large_maps_run_their_parts_in_parallel(n, h, w, r, pad):
    """A map of MAP_SPLIT_POSITIONS or more, AVX-512 code: its two parts outermost in the parallel loop (thread t
    computes and writes part t of the map for every channel, as the relays and the pool split theirs), the same bits
    as the channel split (map_parts=1), exact against the integer reference. AVX2 code keeps the channel split.
    Built for AVX-512 on every machine, run where the CPU has it."""
    import re

    from unsparse_tvm.ops.geometry import MAP_SPLIT_POSITIONS
    from unsparse_tvm.schedules.sparse_conv2d_int8_cpu import Config, map_parts

    assert h * w >= MAP_SPLIT_POSITIONS
    rng = np.random.default_rng(h + r)
    k, c = 24, 8
    weight = sparse_weight((k, c, r, r), 0.7, rng, empty_rows=2, dense_rows=1)
    geo = ConvGeometry(n, c, h, w, k, r, r, (1, 1), (pad,) * 4, (1, 1))
    x = np.abs(rng.standard_normal((n, c, h, w))).astype(np.float32)
    act = ActQuant.from_range(0.0, float(x.max()), act_qmax(cpu_target("cascadelake")))
    bias = rng.standard_normal(k).astype(np.float32)

    def parallel_tasks(lib) -> int:  # the conv's parallel loop
        return int(re.search(r"for \w*k_0_fused in T\.parallel\((\d+)\)", lib.scheduled).group(1))

    builds = [build_int8_conv(x, weight, bias, None, True, geo, act, "cascadelake", config=cfg)
              for cfg in (Config(), Config(map_parts=1))]
    avx2 = build_int8_conv(x, weight, bias, None, True, geo, act, "haswell")[0]
    tasks = [parallel_tasks(b[0]) for b in builds]
    assert tasks[0] == 2 * tasks[1]  # (image, part, row tile) against (image, row tile)
    assert map_parts(geo.q_extent, 16) == 2  # what the relay writing its input is told
    assert map_parts(56 * 56, 8) == 1  # AVX2's 392 vectors of a 56x56 1x1 run in 49 steps: no halves
    assert parallel_tasks(avx2) == tasks[1]  # AVX2 code: (image, row tile), the map whole
    target = builds[0][5]
    skip_unless_runs_here(target)
    outs = [run_built(lib, arrays, out_shape) for lib, arrays, out_shape, *_ in builds]
    np.testing.assert_array_equal(outs[0], outs[1])
    _, _, _, wq, wscale, _ = builds[0]
    ref = torch_reference(x, wq, wscale, act, bias, None, True, (1, 1), (pad,) * 4).numpy()
    _, out_scale = epilogue_consts(wq, wscale, act)
    assert (np.abs(outs[0] - ref) <= QUANTUM_SHARE * out_scale.reshape(1, -1, 1, 1)).all()


def test_int8_design_space_points_are_exact(llvm):
    """MetaSchedule's design space (space()): random points build and stay exact."""
    import tvm
    from tvm import s_tir, te

    from unsparse_tvm.ops import sparse_int8 as int8_ops
    from unsparse_tvm.schedules import rule_for

    geo = ConvGeometry(2, 8, 9, 7, 16, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1))
    rng = np.random.default_rng(7)
    weight = sparse_weight((16, 8, 3, 3), 0.8, rng)
    x = np.abs(rng.standard_normal((2, 8, 9, 7))).astype(np.float32)
    act = ActQuant.from_range(0.0, float(x.max()), act_qmax(llvm))
    wq, wscale = quantize_weight(weight)
    rows = conv_quad_rows(wq, geo)
    comp, out_scale = epilogue_consts(wq, wscale, act)
    arrays = [x, rows.data, rows.off, comp, out_scale]
    holders = [te.placeholder(a.shape, str(a.dtype), f"a{i}") for i, a in enumerate(arrays)]
    out = int8_ops.sparse_conv2d_int8(*holders, geo=geo, act=act, quads=rows.pad_quads, has_bias=False,
                                         has_residual=False, relu=False)
    func = te.create_prim_func(holders + [out]).with_attr("unsparse.pad_shape", [rows.pad_quads, geo.hq, geo.wq])
    ref = torch_reference(x, wq, wscale, act, None, None, False, (1, 1), (1, 1, 1, 1)).numpy()
    with llvm:
        spaces = rule_for("sparse_conv2d_int8", "llvm").space(s_tir.Schedule(func, seed=3))
    assert len(spaces) >= 2
    for sch in spaces:
        lib = tvm.compile(sch.mod, target=llvm)
        args = [tvm.runtime.tensor(a) for a in arrays] + [tvm.runtime.tensor(np.zeros(ref.shape, np.float32))]
        lib(*args)
        assert (np.abs(args[-1].numpy() - ref) <= QUANTUM_SHARE * out_scale.reshape(1, -1, 1, 1)).all()


@pytest.mark.parametrize("batch,fin,fout,relu", [(1, 64, 16, True), (3, 30, 10, False), (2, 7, 5, True)])
def test_int8_linear_is_the_integer_arithmetic(batch, fin, fout, relu, llvm):
    """In-features not a multiple of 4, batch > 1, an empty row, odd row counts."""
    import tvm
    from tvm import te

    from unsparse_tvm.ops import sparse_int8 as int8_ops
    from unsparse_tvm.schedules import rule_for

    rng = np.random.default_rng(fin)
    weight = sparse_weight((fout, fin), 0.7, rng, empty_rows=1, dense_rows=1)
    x = rng.standard_normal((batch, fin)).astype(np.float32)
    act = ActQuant.from_range(float(x.min()), float(x.max()), act_qmax(llvm))
    wq, wscale = quantize_weight(weight)
    rows = dense_quad_rows(wq)
    comp, out_scale = epilogue_consts(wq, wscale, act)
    bias = rng.standard_normal(fout).astype(np.float32)
    arrays = [x, rows.data, rows.off, comp, out_scale, bias]
    holders = [te.placeholder(a.shape, str(a.dtype), f"a{i}") for i, a in enumerate(arrays)]
    out = int8_ops.sparse_dense_int8(*holders, act=act, quads=rows.pad_quads, has_bias=True, relu=relu)
    func = te.create_prim_func(holders + [out]).with_attr("unsparse.op", "sparse_dense_int8")
    with llvm:
        sch = rule_for("sparse_dense_int8", "llvm").apply(func, llvm)
    lib = tvm.compile(sch.mod, target=llvm)
    args = [tvm.runtime.tensor(a) for a in arrays] + [tvm.runtime.tensor(np.zeros((batch, fout), np.float32))]
    lib(*args)
    ref = torch_linear_reference(x, wq, wscale, act, bias, relu).numpy()
    assert (np.abs(args[-1].numpy() - ref) <= QUANTUM_SHARE * out_scale).all()


def test_foreign_pt2_quantize_activations_then_compile(tmp_path, capsys):
    """A .pt2 not written by unsparse-tvm (batch 1, no known module): calibrated through its graph."""
    from unsparse_tvm.build import compile_file
    from unsparse_tvm.models import export_program

    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    torch.export.save(export_program(net, (1, 3, 6, 6)), tmp_path / "f.pt2")
    assert main(["quantize", str(tmp_path / "f.pt2"), "--activations", "int8", "--dataset", "random",
                 "-o", str(tmp_path / "q.pt2")]) == 0
    meta = compile_file(str(tmp_path / "q.pt2"), "llvm", None, None, str(tmp_path / "q.so"))
    assert [(l["name"], l["format"], l["fused"]) for l in meta["layers"]] == [
        ("0", "int8q4", "bias+relu+requant"), ("2", "int8q4", "bias+relu"), ("5", "int8q4", "bias")]


def test_mcpu_override_picks_the_avx2_path(monkeypatch):
    from unsparse_tvm.errors import UnsparseError
    from unsparse_tvm.schedules.x86_int8 import int8_kind
    from unsparse_tvm.target import make_target

    monkeypatch.setenv("UNSPARSE_MCPU", "haswell")
    target = make_target("llvm")
    assert str(target.attrs["mcpu"]) == "haswell" and int8_kind(target) == "pmadd" and act_qmax(target) == 127
    monkeypatch.setenv("UNSPARSE_MCPU", "pentium-nine")
    with pytest.raises(UnsparseError, match="UNSPARSE_MCPU"):
        make_target("llvm")

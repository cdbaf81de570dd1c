"""The CUDA schedules run without a GPU: the same scheduled TIR as OpenCL on PoCL, against PyTorch.
Default knobs over the conv/dense matrix, random points of every CUDA design space, whole models,
CUDA's static limits, and negative controls that the harness must catch."""

import numpy as np
import pytest
import torch
from tvm import tirx

from conftest import needs_nvcc, pruned_program, rel_err, sparse_weight, torch_conv
from test_ops_llvm import CONV_CASES
from unsparse_tvm.schedules import sparse_conv2d_cuda
from unsparse_tvm.single_layer import LayerSpec, layer_module
from unsparse_tvm.testing.cuda_limits import check_cuda_limits, module_cuda_limits
from unsparse_tvm.testing.opencl import (OpenCLFunc, OpenCLModule, schedule_for_cuda, schedule_space_point,
                                         statements)

TOL = 1e-5
# flat output extents that matter on a GPU: Q = 128 and 256 take per_thread = 2 at the default knobs (the
# write-back of more than one output per thread), 3136 is ResNet's 56x56; batch 8
EXTRA_CONV_CASES = [
    (1, 16, 8, 14, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 0.9),    # Q = 8 x 16 = 128
    (1, 16, 16, 16, 32, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 0.9),   # Q = 256
    (1, 16, 56, 56, 16, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 0.9),   # Q = 3136
    (8, 8, 12, 12, 16, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 0.9),    # batch 8
]


def conv_layer(case, seed=11, relu=True, bias=True):
    """(Relax module, input, PyTorch reference, threshold) for one conv case."""
    n, c, h, w, k, r, s, stride, pad, dil, sp = case
    rng = np.random.default_rng(seed)
    weight = sparse_weight((k, c, r, s), sp, rng, empty_rows=k // 8, dense_rows=1 if sp < 0.99 else 0)
    b = rng.standard_normal(k).astype(np.float32) if bias else None
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    spec = LayerSpec("conv2d", x.shape, weight, b, relu,
                     {"strides": list(stride), "padding": list(pad), "dilation": list(dil), "groups": 1})
    return layer_module(spec), x, torch_conv(x, weight, b, stride, pad, dil, relu=relu), 0.0 if sp == 0 else 0.5


def dense_layer(batch, fin, fout, sp, relu=False, seed=5):
    rng = np.random.default_rng(seed)
    weight = sparse_weight((fout, fin), sp, rng, empty_rows=4, dense_rows=2)
    b = rng.standard_normal(fout).astype(np.float32)
    x = rng.standard_normal((batch, fin)).astype(np.float32)
    ref = x.astype(np.float64) @ weight.T.astype(np.float64) + b
    ref = (np.maximum(ref, 0) if relu else ref).astype(np.float32)
    return layer_module(LayerSpec("dense", x.shape, weight, b, relu, {})), x, ref, 0.5


def check(y, ref):
    assert y.shape == ref.shape
    assert not np.isnan(y).any(), f"{int(np.isnan(y).sum())} of {y.size} outputs NaN (unwritten or out-of-bounds read)"
    assert rel_err(y, ref) < TOL


def case_id(c):
    return "x".join(map(str, c[:7])) + f"-s{c[7][0]}{c[7][1]}-b{c[0]}"


@pytest.mark.parametrize("case", CONV_CASES + EXTRA_CONV_CASES, ids=case_id)
@pytest.mark.parametrize("fmt", ["ell", "hyb"])
def test_sparse_conv2d_cuda_default_knobs_on_pocl(case, fmt, pocl, cuda):
    mod, x, ref, threshold = conv_layer(case)
    report = []
    sched = schedule_for_cuda(mod, threshold=threshold, fmt=fmt, report=report)
    assert report[0].decision == "sparse" and report[0].format == fmt
    check(OpenCLModule(sched, pocl)(x), ref)
    for use in module_cuda_limits(sched, cuda, registers=case is EXTRA_CONV_CASES[0]):  # ptxas: once
        assert not use.problems, use


@pytest.mark.parametrize("batch,relu", [(1, False), (4, True), (8, False)])
@pytest.mark.parametrize("fmt", ["ell", "hyb"])
def test_sparse_dense_cuda_default_knobs_on_pocl(batch, relu, fmt, pocl, cuda):
    mod, x, ref, threshold = dense_layer(batch, 200, 96, 0.9, relu)
    sched = schedule_for_cuda(mod, threshold=threshold, fmt=fmt)
    check(OpenCLModule(sched, pocl)(x), ref)
    for use in module_cuda_limits(sched, cuda, registers=batch == 1):
        assert not use.problems, use


@pytest.mark.parametrize("per_thread", [1, 2, 4])
@pytest.mark.parametrize("case", EXTRA_CONV_CASES[:2], ids=case_id)
def test_sparse_conv2d_cuda_per_thread_outputs(case, per_thread, pocl):
    """Each thread keeps per_thread outputs strided by the thread count: every one of them written back
    exactly (the old loop-based write-back stored uninitialised values over other threads' outputs)."""
    mod, x, ref, threshold = conv_layer(case)
    cfg = sparse_conv2d_cuda.Config(threads_q=32, per_thread=per_thread)
    check(OpenCLModule(schedule_for_cuda(mod, threshold=threshold, configs={"sparse_conv2d": cfg}), pocl)(x), ref)


@pytest.mark.parametrize("batch_per_thread", [1, 2, 8])
def test_sparse_conv2d_cuda_batch_per_thread(batch_per_thread, pocl, cuda):
    """Batch 8 with 1, 2 or 8 images per thread (each weight load feeding them all): same results, and the
    thread keeps per_thread x batch_per_thread accumulators."""
    mod, x, ref, threshold = conv_layer(EXTRA_CONV_CASES[3])
    cfg = sparse_conv2d_cuda.Config(per_thread=1, batch_per_thread=batch_per_thread)
    sched = schedule_for_cuda(mod, threshold=threshold, fmt="ell", configs={"sparse_conv2d": cfg})
    check(OpenCLModule(sched, pocl)(x), ref)
    conv = [u for u in module_cuda_limits(sched, cuda, registers=False) if u.block[1] > 1][0]
    assert conv.grid[1] * batch_per_thread == 8 * 16 // cfg.threads_k  # blockIdx.y: images/bpt x row tiles


def _old_rows(sch, name, threads_q, threads_k, per_thread, batch_per_thread, clamp):
    """sparse_conv2d_cuda._rows before the fix (per-thread outputs on a plain unrolled loop): kept as
    the negative control that shows the harness catches the bug."""
    block = sch.get_sblock(name)
    acc = sch.cache_write(block, 0, "local")
    n, k, q, j = sch.get_loops(block)
    ko, ki = sch.split(k, [None, threads_k])
    qo, qp, qi = sch.split(q, [None, per_thread, threads_q])
    sch.reorder(n, ko, qo, ki, qi, j, qp)
    sch.bind(sch.fuse(n, ko), "blockIdx.y")
    sch.bind(qo, "blockIdx.x")
    sch.bind(ki, "threadIdx.y")
    sch.bind(qi, "threadIdx.x")
    sch.reverse_compute_at(acc, qi)
    sch.unroll(qp)
    sch.decompose_reduction(block, j)


def test_old_per_thread_schedule_is_caught(pocl, monkeypatch):
    mod, x, ref, threshold = conv_layer(EXTRA_CONV_CASES[0])
    monkeypatch.setattr(sparse_conv2d_cuda, "_rows", _old_rows)
    y = OpenCLModule(schedule_for_cuda(mod, threshold=threshold, fmt="ell"), pocl)(x)
    with pytest.raises(AssertionError):
        check(y, ref)


SPACE_LAYERS = {
    "conv-ell-s1-Q128": lambda: conv_layer(EXTRA_CONV_CASES[0]) + ("ell",),
    "conv-hyb-s2": lambda: conv_layer((2, 16, 13, 11, 24, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), 0.9)) + ("hyb",),
    "dense-hyb-b4": lambda: dense_layer(4, 256, 128, 0.9, relu=True) + ("hyb",),
}


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("layer", list(SPACE_LAYERS))
def test_cuda_design_space_points_on_pocl(layer, seed, pocl, cuda):
    """A point tuning may pick is correct and within CUDA's limits (or the limits check says which)."""
    mod, x, ref, threshold, fmt = SPACE_LAYERS[layer]()
    sched, knobs = schedule_space_point(mod, seed, threshold=threshold, fmt=fmt)
    uses = module_cuda_limits(sched, cuda, registers=False)
    if any(u.problems for u in uses):  # tuning's builder rejects these too; nothing to run
        pytest.skip(f"knobs {knobs} exceed CUDA limits: {[p for u in uses for p in u.problems]}")
    y = OpenCLModule(sched, pocl)(x)
    assert not np.isnan(y).any() and rel_err(y, ref) < TOL, f"knobs {knobs}"


@pytest.mark.slow
@pytest.mark.parametrize("model", ["smallcnn", "vgg16-cifar", "resnet18"])
def test_builtin_model_cuda_on_pocl(model, pocl):
    from unsparse_tvm.frontend import import_program, program_input_shape

    ep = pruned_program(model, 0.9)
    mod, _names = import_program(ep)
    x = torch.randn(*program_input_shape(ep), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = ep.module()(x).numpy()
    report = []
    y = OpenCLModule(schedule_for_cuda(mod, threshold=0.7, report=report), pocl)(x.numpy())
    assert all(r.decision == "sparse" for r in report)
    y = y[0] if isinstance(y, tuple) else y
    assert not np.isnan(y).any() and rel_err(y, ref) < 1e-4


def test_silu_epilogues_cuda_on_pocl(pocl):
    """The conv epilogues with SiLU fused (ops.fast_math's exp: bit shifts, reinterpret) as OpenCL."""
    from test_passes import SiluBlock, _prepared
    from unsparse_tvm.frontend import import_program

    ep, x = _prepared(SiluBlock(), (2, 8, 9, 11))
    mod, _names = import_program(ep)
    report = []
    y = OpenCLModule(schedule_for_cuda(mod, threshold=0.7, report=report), pocl)(x.numpy())
    assert [r.fused for r in report] == ["bias+silu", "bias+silu", "bias+residual+silu", "bias"]
    y = y[0] if isinstance(y, tuple) else y
    check(y, ep.module()(x).detach().numpy())


# ---- negative controls: the harness must fail these ----

@pytest.fixture
def scheduled_conv(pocl):
    """(OpenCLFunc of a default-knob sparse conv, input, constants, reference); no ReLU, so a NaN shows."""
    mod, x, ref, threshold = conv_layer((1, 16, 12, 12, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 0.9), relu=False)
    sched = schedule_for_cuda(mod, threshold=threshold, fmt="ell")
    call = sched["main"].body.blocks[0].bindings[0].value
    consts = [a.value.numpy() for a in call.args[1].fields[1:]]  # data, off, bias
    gv = call.args[0]
    return OpenCLFunc(pocl, sched[gv], gv.name_hint), x, consts, ref


def _run(func, x, consts, ref):
    out = np.empty(ref.shape, np.float32)
    func(x, *consts, out)
    return out


def test_control_harness_passes_the_unbroken_kernel(scheduled_conv):
    func, x, consts, ref = scheduled_conv
    check(_run(func, x, consts, ref), ref)


def test_control_missing_blocks_are_caught(scheduled_conv):
    """Half the conv kernel's grid: outputs nobody computes stay NaN."""
    func, x, consts, ref = scheduled_conv
    conv_kernel = func.launches[1].kernel

    def halve(launch):
        if launch.kernel == conv_kernel:
            launch.grid = [launch.grid[0], max(launch.grid[1] // 2, 1), launch.grid[2]]
        return launch

    func.launch_hook = halve
    with pytest.raises(AssertionError):
        check(_run(func, x, consts, ref), ref)


def test_control_out_of_bounds_read_is_caught(scheduled_conv):
    """A padding entry (weight 0) whose offset points past the padded input reads the guard zone's NaN:
    0 * NaN = NaN, where a real GPU would silently read whatever lies there."""
    func, x, consts, ref = scheduled_conv
    data, off, bias = (c.copy() for c in consts)
    pad = [s.buffer for s in statements(func.host.body)
           if isinstance(s, tirx.AllocBuffer) and s.buffer.name == "pad_flat"][0]
    off[tuple(np.argwhere(data == 0)[0])] = int(pad.shape[0])  # reads pad_flat[len + q], q < Q: the guard
    with pytest.raises(AssertionError):
        check(_run(func, x, [data, off, bias], ref), ref)


def test_control_out_of_bounds_write_is_caught(pocl):
    import pyopencl as cl

    prog = cl.Program(pocl.ctx, "__kernel void k(__global float* a) { a[get_global_id(0) + 1] = 1.0f; }").build()
    buf = pocl.buffer(64, "float32", np.zeros(64, np.float32))
    prog.k(pocl.queue, (64,), (64,), buf.sub)
    with pytest.raises(AssertionError, match="guard zone"):
        buf.read(pocl.queue)


def test_cuda_limits_flag_an_oversized_block(cuda):
    mod, _x, _ref, threshold = conv_layer(EXTRA_CONV_CASES[0])
    cfg = sparse_conv2d_cuda.Config(threads_q=256, threads_k=8, per_thread=1)  # 2048 threads per block
    sched = schedule_for_cuda(mod, threshold=threshold, configs={"sparse_conv2d": cfg})
    problems = [p for u in module_cuda_limits(sched, cuda, registers=False) for p in u.problems]
    assert any("threads per block" in p for p in problems)


@needs_nvcc
def test_ptxas_reports_registers(cuda):
    mod, _x, _ref, threshold = conv_layer(EXTRA_CONV_CASES[0])
    sched = schedule_for_cuda(mod, threshold=threshold, fmt="ell")
    func = [f for gv, f in sched.functions_items() if gv.name_hint != "main"][0]
    uses = check_cuda_limits(func, cuda)
    assert all(u.registers is not None and 0 < u.registers <= 255 for u in uses)


@pytest.mark.parametrize("case", [CONV_CASES[1], CONV_CASES[4], CONV_CASES[7], EXTRA_CONV_CASES[3]], ids=case_id)
def test_dense_conv2d_cuda_on_pocl(case, pocl, cuda):
    """Layers left dense run our direct conv's CUDA schedule (not dlight's fallback)."""
    mod, x, ref, _ = conv_layer(case[:-1] + (0.3,))
    sched = schedule_for_cuda(mod, threshold=0.9)
    assert any(str(f.attrs.get("unsparse.op", "")) == "dense_conv2d" for _, f in sched.functions_items()
               if isinstance(f, tirx.PrimFunc) and f.attrs is not None)
    check(OpenCLModule(sched, pocl)(x), ref)
    for use in module_cuda_limits(sched, cuda, registers=case is CONV_CASES[1]):
        assert not use.problems, use


@pytest.mark.parametrize("seed", range(8))
def test_dense_conv2d_cuda_space_points_on_pocl(seed, pocl):
    mod, x, ref, _ = conv_layer(CONV_CASES[1][:-1] + (0.0,))
    sched, knobs = schedule_space_point(mod, seed, threshold=0.9)
    y = OpenCLModule(sched, pocl)(x)
    assert not np.isnan(y).any() and rel_err(y, ref) < TOL, f"knobs {knobs}"


@pytest.mark.parametrize("r,stride,pad,size,fmt,residual", [
    (1, 1, 0, 16, "ell", True),    # pointwise, flat: fused (with a residual add in the write-back)
    (1, 2, 0, 16, "ell", False),   # strided pointwise, 8x8 = q_extent 64: fused
    (1, 1, 0, 16, "hyb", False),   # hyb: two producers, never fused
    (3, 1, 1, 16, "ell", False),   # padded: thrown-away columns, not fused
    (1, 2, 0, 14, "ell", False),   # 7x7 output, q_extent 56 > 49: not fused
])
def test_cuda_epilogue_fuses_exactly_where_the_output_is_flat(r, stride, pad, size, fmt, residual, pocl):
    """The CUDA schedule writes bias, residual and ReLU from each thread's accumulators (no "epilogue"
    kernel: one launch and one output pass fewer) exactly where ConvGeometry.flat_output holds and the
    format is not hyb, as cost.gpu.predict_sparse counts launches; the result on PoCL equals PyTorch."""
    from unsparse_tvm.ops.geometry import ConvGeometry

    rng = np.random.default_rng(1)
    weight = sparse_weight((32, 16, r, r), 0.9, rng, empty_rows=2, dense_rows=2)
    bias = rng.standard_normal(32).astype(np.float32)
    x = rng.standard_normal((1, 16, size, size)).astype(np.float32)
    geo = ConvGeometry(1, 16, size, size, 32, r, r, (stride, stride), (pad,) * 4, (1, 1))
    attrs = {"strides": [stride] * 2, "padding": [pad] * 4, "dilation": [1, 1], "groups": 1}
    if residual:  # conv + bias + residual + ReLU, as torch.export writes a ResNet block's tail
        class Block(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = torch.nn.Conv2d(16, 32, r, stride, pad)
                self.conv.weight.data, self.conv.bias.data = torch.from_numpy(weight), torch.from_numpy(bias)

            def forward(self, a, res):
                return torch.relu(self.conv(a) + res)

        from unsparse_tvm.frontend import import_program

        res = rng.standard_normal((1, 32, geo.oh, geo.ow)).astype(np.float32)
        ep = torch.export.export(Block().eval(), (torch.from_numpy(x), torch.from_numpy(res)))
        mod, inputs = import_program(ep)[0], (x, res)
        with torch.no_grad():
            ref = ep.module()(torch.from_numpy(x), torch.from_numpy(res)).numpy()
    else:
        mod, inputs = layer_module(LayerSpec("conv2d", x.shape, weight, bias, True, attrs)), (x,)
        ref = torch_conv(x, weight, bias, (stride,) * 2, (pad,) * 4, (1, 1), relu=True)
    report = []
    sched = schedule_for_cuda(mod, threshold=0.5, fmt=fmt, report=report)
    assert report[0].format == fmt and (not residual or "residual" in report[0].fused)
    fused = geo.flat_output and fmt != "hyb"
    assert fused == ((r, stride, size, fmt) in ((1, 1, 16, "ell"), (1, 2, 16, "ell")))
    func = next(f for f in sched.functions.values() if isinstance(f, tirx.PrimFunc) and "sparse_conv2d" in
                str(f.attrs.get("unsparse.op", "")))
    assert ('T.sblock("epilogue")' in func.script()) == (not fused)
    y = OpenCLModule(sched, pocl)(*inputs)
    check(y[0] if isinstance(y, tuple) else y, ref)  # an exported program's main returns a tuple


@pytest.mark.parametrize("case,threads", [
    ((1, 64, 14, 14, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 0.8), 32),   # one image, ~115 entries a row
    ((1, 48, 14, 14, 32, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 0.9), 64),   # one image, rows of <= 48 entries
    ((8, 64, 8, 8, 16, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 0.8), 64),     # eight images, long rows
], ids=["b1-long", "b1-short", "b8-long"])
def test_auto_threads_q_follows_batch_and_row_length(case, threads, pocl):
    """Config.threads_q = 0 (the default) picks one warp per block for one image with long rows and two
    elsewhere (auto_threads_q, fitted on the H200 grid), and both schedules stay right."""
    import re

    mod, x, ref, threshold = conv_layer(case)
    sched = schedule_for_cuda(mod, threshold=threshold, fmt="ell")
    conv = [f for gv, f in sched.functions_items() if "sparse_conv2d" in gv.name_hint]
    bound = {int(m) for f in conv
             for m in re.findall(r'thread_binding\((?:T\.int64\()?(\d+)\)?, thread="threadIdx.x"\)', f.script())}
    assert threads in bound and ({32, 64} - {threads}).isdisjoint(bound)  # the pad and epilogue copies take 256
    check(OpenCLModule(sched, pocl)(x), ref)

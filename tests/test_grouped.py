"""Grouped rows (vellV): V output channels that share their nonzero positions (what vector pruning
produces) stored once per group; the format, its choice, and the kernels on llvm and on PoCL (CUDA)."""

import numpy as np
import pytest

from conftest import cli, rel_err, residual_block_matches_torch, run_layer, sparse_weight, torch_conv
from test_pocl import check
from unsparse_tvm.ops.formats import choose_group, conv_weight_rows, to_sparse_rows
from unsparse_tvm.single_layer import LayerSpec, layer_module
from unsparse_tvm.testing.cuda_limits import module_cuda_limits
from unsparse_tvm.testing.opencl import OpenCLModule, schedule_for_cuda, schedule_space_point


def vector_weight(shape, v, sparsity, rng, empty_groups=1, dense_groups=0):
    """Weight whose V consecutive output channels share one zero pattern (vector pruning's masks)."""
    k = shape[0]
    w = rng.standard_normal(shape).astype(np.float32)
    keep = rng.random((k // v, *shape[1:])) >= sparsity
    order = rng.permutation(k // v)
    keep[order[:empty_groups]] = False
    keep[order[empty_groups:empty_groups + dense_groups]] = True
    return w * np.repeat(keep, v, axis=0)


def test_choose_group_finds_vector_masks_and_leaves_unstructured_alone():
    rng = np.random.default_rng(0)
    for v in (2, 4, 8):
        w = vector_weight((32, 8, 3, 3), v, 0.8, rng).reshape(32, -1)
        assert choose_group(w) == v
    assert choose_group(sparse_weight((32, 72), 0.9, rng)) == 1


def test_grouped_rows_hold_exactly_the_weight():
    rng = np.random.default_rng(1)
    w = vector_weight((16, 5, 3, 3), 4, 0.7, rng)
    cols = np.arange(45) * 3 + 1  # any distinct offsets
    rows = to_sparse_rows(w.reshape(16, -1), cols, "vell4")
    assert rows.fmt == "vell4" and rows.group == 4 and rows.data.shape[::2] == (4, 4)
    back = np.zeros((16, cols.max() + 1), np.float32)
    for g in range(4):
        for j in range(rows.off.shape[1]):
            back[g * 4:(g + 1) * 4, rows.off[g, j]] += rows.data[g, j]
    assert np.array_equal(back[:, cols], w.reshape(16, -1))
    assert rows.nnz == int((w != 0).sum())


CASES = [  # (N, C, H, W, K, R, S, stride, padding, dilation, V)
    (1, 8, 9, 9, 16, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 4),
    (2, 6, 11, 7, 24, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), 8),   # batch 2, stride 2, odd sizes
    (1, 16, 8, 14, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 4),  # Q = 128
    (3, 16, 6, 6, 16, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 2),   # 1x1, batch 3
    (1, 4, 12, 12, 16, 3, 3, (1, 1), (2, 2, 2, 2), (2, 2), 4),  # dilation 2
]


def grouped_case(case, seed=3, relu=True):
    n, c, h, w, k, r, s, stride, pad, dil, v = case
    rng = np.random.default_rng(seed)
    weight = vector_weight((k, c, r, s), v, 0.8, rng)
    bias = rng.standard_normal(k).astype(np.float32)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    spec = LayerSpec("conv2d", x.shape, weight, bias, relu,
                     {"strides": list(stride), "padding": list(pad), "dilation": list(dil), "groups": 1})
    return spec, x, torch_conv(x, weight, bias, stride, pad, dil, relu=relu), v


def case_id(c):
    return "x".join(map(str, c[:7])) + f"-s{c[7][0]}-V{c[10]}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_grouped_conv_llvm_matches_torch(case, llvm):
    spec, x, ref, v = grouped_case(case)
    y, report = run_layer(spec, llvm, threshold=0.5, x=x)
    assert report[0].decision == "sparse" and report[0].format == f"vell{v}"
    assert rel_err(y, ref) < 1e-5


SMALL = [  # small maps, where a group's tile is a vector or two: several groups interleaved (Config.g_inner)
    (2, 16, 4, 4, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 4),  # 4x4, batch 2 (patches side by side)
    (1, 12, 2, 2, 48, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 4),  # 2x2: row lanes (4 positions x 4 rows, AVX2 2 x 4)
    (1, 8, 7, 5, 24, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), 8),   # strided to 4x3, odd sizes, V = 8 (AVX-512 row lanes)
    (3, 8, 2, 2, 16, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 4),   # 2x2, batch 3: row lanes image by image
    (1, 8, 4, 4, 16, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), 2),   # strided to 2x2, V = 2 (row lanes on AVX2 only)
    (1, 8, 1, 2, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 4),   # a 1x2 map (row lanes on AVX2 only)
    (1, 8, 2, 2, 16, 3, 3, (1, 1), (2, 2, 2, 2), (2, 2), 4),   # dilation 2 on 2x2
]


@pytest.mark.parametrize("case", SMALL, ids=case_id)
@pytest.mark.parametrize("g_inner", [0, 1, 2, 4])
@pytest.mark.parametrize("path", ["native", "avx2"])
def test_grouped_conv_with_groups_interleaved_matches_torch(case, g_inner, path, llvm):
    import tvm

    from unsparse_tvm.ops import names
    from unsparse_tvm.schedules.sparse_conv2d_grouped_cpu import Config
    from unsparse_tvm.target import llvm_target_dict

    target = llvm if path == "native" else tvm.target.Target(llvm_target_dict("haswell"))
    spec, x, ref, v = grouped_case(case, seed=7)
    y, report = run_layer(spec, target, threshold=0.5, x=x,
                          configs={names.SPARSE_CONV2D_GROUPED: Config(g_inner=g_inner)})
    assert report[0].format == f"vell{v}" and rel_err(y, ref) < 1e-5


def scheduled(lanes: int, case) -> "tvm.tirx.PrimFunc":
    """The grouped conv of `case` as the default rule schedules it for AVX-512 (lanes 16) or AVX2 code."""
    import tvm

    from unsparse_tvm.relay_passes import build_pipeline
    from unsparse_tvm.single_layer import layer_module
    from unsparse_tvm.target import llvm_target_dict

    target = tvm.target.Target(llvm_target_dict("znver4" if lanes == 16 else "haswell"))
    spec = grouped_case(case)[0]
    return build_pipeline(target, threshold=0.5, stop_after="schedule")(layer_module(spec))["sparse_conv2d_grouped"]


@pytest.mark.parametrize("lanes, channels, inner", [(16, 128, [4, 4, 1, 16]), (8, 128, [1, 4, 2, 8]),
                                                     (16, 12, [1, 4, 1, 16])])
def test_small_maps_interleave_groups_by_default(lanes, channels, inner):
    """On a 4x4 map (one 16-lane vector per group, or two of 8) the default tile puts several groups inside the
    nonzero loop, as many as 3/4 of the registers hold as accumulators, where the groups are long (128
    channels: ~460 entries); short ones (12 channels: ~43) are not interleaved (each tile would run to its
    longest), nor are AVX2's two vectors per group (8 accumulators already)."""
    import tvm
    from tvm import s_tir

    func = scheduled(lanes, (1, channels, 4, 4, 48, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 4))
    sch = s_tir.Schedule(func)
    loops = sch.get_loops(sch.get_sblock("conv_update"))
    extents = [sch.get(lp).extent for lp in loops]
    # [..., j (the nonzeros: it ends at the tile's longest row, schedules/row_extents), groups inside, V,
    # unroll, lanes]: the loop after j runs the interleaved groups
    j = max(i for i, e in enumerate(extents) if not isinstance(e, tvm.tirx.IntImm))
    assert [int(e) for e in extents[j + 1:]] == inner


@pytest.mark.parametrize("lanes, inner", [(16, [16, 1]), (8, [4, 2])])
def test_maps_under_a_vector_run_row_lanes(lanes, inner):
    """A 2x2 map (4 positions) of 4-row groups: the conv stage is [N, G, Q, V] (ConvGeometry.with_row_lanes),
    its update one tensorized vector of lanes / 4 positions x 4 rows (x86_row_lanes: a shuffle of one weight
    load and one of the input, no scalar body left), half the registers' worth of groups interleaved after
    the nonzero loop (16 groups of one vector; AVX2: 4 of two)."""
    import tvm
    from tvm import s_tir

    func = scheduled(lanes, (1, 64, 2, 2, 128, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 4))
    assert int(func.attrs["unsparse.row_lanes"]) == 4
    sch = s_tir.Schedule(func)
    assert [int(d) for d in sch.get(sch.get_sblock("conv_init")).writes[0].source.shape] == [1, 32, 4, 4]
    assert not [b for b in ("conv_update",) if f'sblock("{b}")' in func.script()]  # replaced by the intrinsic
    extents = [sch.get(lp).extent for lp in sch.get_loops(sch.get_sblock("conv_update_o"))]
    j = max(i for i, e in enumerate(extents) if not isinstance(e, tvm.tirx.IntImm))
    assert [int(e) for e in extents[j + 1:]] == inner
    assert "T.Shuffle" in func.script() and f"float32x{lanes}" in func.script()


def test_grouped_format_forced_with_a_dense_group(llvm):
    """A fully dense group makes every group as wide (ELL's padding): auto picks hyb, forced vell is exact."""
    rng = np.random.default_rng(6)
    weight = vector_weight((16, 8, 3, 3), 4, 0.9, rng, empty_groups=1, dense_groups=1)
    x = rng.standard_normal((1, 8, 7, 9)).astype(np.float32)
    spec = LayerSpec("conv2d", x.shape, weight, None, True,
                     {"strides": [1, 1], "padding": [1, 1, 1, 1], "dilation": [1, 1], "groups": 1})
    assert run_layer(spec, llvm, threshold=0.5, x=x)[1][0].format == "hyb"
    y, report = run_layer(spec, llvm, threshold=0.5, fmt="vell4", x=x)
    assert report[0].format == "vell4"
    assert rel_err(y, torch_conv(x, weight, None, (1, 1), (1, 1, 1, 1), (1, 1), relu=True)) < 1e-5


def test_grouped_format_forced_on_unstructured_rows(llvm):
    """Fill-in (explicit zeros) where rows do not share positions: still exact."""
    rng = np.random.default_rng(4)
    weight = sparse_weight((16, 8, 3, 3), 0.85, rng, empty_rows=2, dense_rows=1)
    x = rng.standard_normal((2, 8, 7, 9)).astype(np.float32)
    spec = LayerSpec("conv2d", x.shape, weight, None, False,
                     {"strides": [1, 1], "padding": [1, 1, 1, 1], "dilation": [1, 1], "groups": 1})
    y, report = run_layer(spec, llvm, threshold=0.5, fmt="vell4", x=x)
    assert report[0].format == "vell4"
    assert rel_err(y, torch_conv(x, weight, None, (1, 1), (1, 1, 1, 1), (1, 1))) < 1e-5


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_grouped_conv_cuda_on_pocl(case, pocl):  # noqa: F811
    spec, x, ref, v = grouped_case(case)
    report = []
    sched = schedule_for_cuda(layer_module(spec), threshold=0.5, report=report)
    assert report[0].format == f"vell{v}"
    check(OpenCLModule(sched, pocl)(x), ref)


@pytest.mark.parametrize("seed", range(8))
def test_grouped_conv_cuda_space_points_on_pocl(seed, pocl):  # noqa: F811
    spec, x, ref, _ = grouped_case(CASES[1])
    sched, knobs = schedule_space_point(layer_module(spec), seed, threshold=0.5)
    y = OpenCLModule(sched, pocl)(x)
    assert not np.isnan(y).any() and rel_err(y, ref) < 1e-5, f"knobs {knobs}"


def test_conv_weight_rows_pick_grouped_for_vector_pruned_layers():
    from unsparse_tvm.ops.geometry import ConvGeometry

    rng = np.random.default_rng(5)
    geo = ConvGeometry(1, 8, 10, 10, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1))
    assert conv_weight_rows(vector_weight((32, 8, 3, 3), 4, 0.9, rng), geo).fmt == "vell4"
    assert conv_weight_rows(sparse_weight((32, 8, 3, 3), 0.9, rng), geo).fmt in ("ell", "hyb")


@pytest.mark.parametrize("batch,fin,fout,v", [(1, 200, 96, 8), (4, 64, 40, 4), (3, 37, 16, 2)])
def test_grouped_linear_llvm_and_pocl_match_torch(batch, fin, fout, v, llvm, cuda, pocl):  # noqa: F811
    rng = np.random.default_rng(batch)
    weight = vector_weight((fout, fin), v, 0.85, rng)
    bias = rng.standard_normal(fout).astype(np.float32)
    x = rng.standard_normal((batch, fin)).astype(np.float32)
    spec = LayerSpec("dense", x.shape, weight, bias, True, {})
    ref = np.maximum(x.astype(np.float64) @ weight.T + bias, 0).astype(np.float32)
    y, report = run_layer(spec, llvm, threshold=0.5, x=x)
    assert report[0].format == f"vell{v}"
    assert rel_err(y, ref) < 1e-5
    sched = schedule_for_cuda(layer_module(spec), threshold=0.5)
    check(OpenCLModule(sched, pocl)(x), ref)
    for use in module_cuda_limits(sched, cuda, registers=batch == 1):  # nvcc compiles the warp reductions
        assert not use.problems, use


def test_grouped_tasks_are_tuned_and_their_spaces_build(llvm):
    """tune extracts grouped layers as their own tasks, and every design space of their x86 rule builds."""
    import torch
    import tvm
    from tvm import s_tir

    from unsparse_tvm.models import export_program
    from unsparse_tvm.schedules import rule_for
    from unsparse_tvm.tuning.tasks import extract_tasks

    net = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(16 * 36, 16))
    rng = np.random.default_rng(0)
    with torch.no_grad():
        net[0].weight.copy_(torch.from_numpy(vector_weight((16, 8, 3, 3), 4, 0.8, rng)))
        net[3].weight.copy_(torch.from_numpy(vector_weight((16, 16 * 36), 4, 0.8, rng)))
    tasks = extract_tasks(export_program(net.eval(), (1, 8, 6, 6)), llvm)
    assert sorted(t.op for t in tasks) == ["sparse_conv2d_grouped", "sparse_dense_grouped"]
    for task in tasks:
        for seed in (1, 2):
            for space in rule_for(task.op, "llvm").space(s_tir.Schedule(task.mod, seed=seed)):
                tvm.tirx.build(space.mod, target=llvm)


def test_row_lane_record_replays_in_a_fresh_process(tmp_path, llvm):
    """A tuning record of a row-lane kernel names its tensor intrinsic; compiling with the log in a process that
    never scheduled one (so never registered it) still applies the record (tuning.database.replay registers
    what a trace names), and the design space's every point replays."""
    import itertools

    import torch
    from tvm import s_tir

    from unsparse_tvm.schedules import rule_for
    from unsparse_tvm.tuning import extract_tasks, write_record

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 128, 3, padding=1)
    with torch.no_grad():
        conv.weight *= torch.repeat_interleave(torch.rand(32, 64, 3, 3) < 0.1, 4, dim=0)
    ep = torch.export.export(conv.eval(), (torch.randn(1, 64, 2, 2),))
    torch.export.save(ep, str(tmp_path / "m.pt2"))
    task = next(t for t in extract_tasks(ep, llvm, threshold=0.0) if t.op == "sparse_conv2d_grouped")
    spaces = rule_for(task.op, "llvm").space(s_tir.Schedule(task.mod))
    assert spaces and all("row_lanes" in str(s.trace) for s in spaces)
    for space in spaces:  # every knob combination replays (the evolutionary search mutates them)
        knobs = [i for i in space.trace.insts if i.kind.name == "SampleCategorical"]
        for combo in itertools.product(*[range(len(i.attrs[0])) for i in knobs]):
            t = space.trace
            for inst, d in zip(knobs, combo):
                t = t.with_decision(inst, d, remove_postproc=True)
            t.apply_to_schedule(s_tir.Schedule(task.mod), remove_postproc=True)
    write_record(str(tmp_path / "log"), task.mod, spaces[0].trace, [1e-7], llvm)
    out = cli("compile", tmp_path / "m.pt2", "--threshold", "0", "--tuning-log", tmp_path / "log", "-o",
              tmp_path / "m.so")  # a fresh process
    assert "1 of 1 tunable layers" in out.stdout, out.stdout + out.stderr


def test_a_vector_pruned_residual_block_on_2x2_matches_torch():
    """A whole model through the public API on a 2x2 map with vector-4 pruning: two grouped 3x3 convs in row
    lanes (ConvGeometry.with_row_lanes), folded batch-norm, a residual add and ReLUs in their epilogues."""
    report = residual_block_matches_torch((1, 32, 2, 2), "residual-vector4", 0.8, method="vector", vector_size=4)
    sparse = [d for d in report if d["decision"] == "sparse"]
    assert [d["format"] for d in sparse] == ["vell4", "vell4"] and any("residual" in d["fused"] for d in sparse)

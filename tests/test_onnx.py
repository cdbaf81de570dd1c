"""The ONNX door: pruned models exported by torch.onnx.export (dynamo and TorchScript exporters) compile
from ONNX, match ONNX Runtime on the same file, and get the same per-layer decisions (name, sparse/dense,
format) as their .pt2; every op the door accepts is checked against ONNX Runtime on its own; QDQ models
run as fp32; each bad file is one line on stderr."""

from __future__ import annotations

import functools
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from conftest import assert_one_line_error, cli, pruned_program, rel_err  # noqa: E402
from unsparse_tvm.testing.onnx_models import EXPORTERS, export_onnx, ort_outputs, pruned_module  # noqa: E402

SPARSITY = 0.9
TOL = 1e-4  # max relative error against ONNX Runtime


def _run(compiled, x: np.ndarray) -> list[np.ndarray]:
    import tvm
    from tvm import relax

    out = relax.VirtualMachine(compiled.executable, tvm.cpu())["main"](tvm.runtime.tensor(x))
    flat = []

    def walk(v):
        if hasattr(v, "numpy"):
            flat.append(v.numpy())
        else:
            for item in v:
                walk(item)

    walk(out)
    return flat


def _matches_ort(compiled, path: str, seed: int = 3) -> float:
    """Largest relative error of the compiled module against ONNX Runtime over all outputs."""
    x = np.random.default_rng(seed).standard_normal(compiled.input_shape).astype("float32")
    got, ref = _run(compiled, x), ort_outputs(path, x)
    assert [g.shape for g in got] == [r.shape for r in ref]
    assert all(np.isfinite(g).all() for g in got)
    return max(rel_err(g, r) for g, r in zip(got, ref))


def _decisions(report) -> dict:
    return {r.name: (r.decision, r.format) for r in report}


@functools.lru_cache(maxsize=None)
def _pruned(model: str):
    return pruned_module(model, SPARSITY)


@functools.lru_cache(maxsize=None)
def _pt2_decisions(model: str) -> dict:
    """The decisions of the .pt2 path (prune_to_program, compile_program) for a model."""
    from unsparse_tvm.build import compile_program
    from unsparse_tvm.target import make_target

    ep = pruned_program(model, SPARSITY)
    module, _ = _pruned(model)
    own = module.state_dict()  # the ONNX files hold the same pruned weights as this .pt2
    assert all(torch.equal(v, own[k]) for k, v in ep.state_dict.items() if k.endswith("weight") and k in own)
    return _decisions(compile_program(ep, make_target("llvm")).report)


def _check_against_pt2_and_ort(model: str, exporter: str, folder, llvm) -> None:
    from unsparse_tvm.build import compile_onnx

    module, shape = _pruned(model)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    path = export_onnx(module, x, str(folder / f"{exporter}.onnx"), exporter)
    compiled = compile_onnx(path, llvm, log=lambda _: None)
    got, want = _decisions(compiled.report), _pt2_decisions(model)
    assert got == want, {k: (got.get(k), want.get(k)) for k in set(got) | set(want) if got.get(k) != want.get(k)}
    assert any(d == "sparse" for d, _ in got.values())
    assert _matches_ort(compiled, path) <= TOL


# vgg16 and resnet50 (224x224) and the other six architectures: benchmarks/door_matrix.py (every door of every
# model, ~25 min; its committed run is benchmarks/results/door-matrix.json), too slow for every CI run
BUILTINS = ["smallcnn", "vgg16-cifar", "resnet18"]


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("model", BUILTINS)
def test_builtin_model_from_onnx(model, exporter, tmp_path, llvm):
    _check_against_pt2_and_ort(model, exporter, tmp_path, llvm)


ARCHS = [  # two of test_architectures.py's, with the exporters that write them differently; all: door_matrix.py
    ("mobilenet_v3_small", e) for e in EXPORTERS  # depthwise, SE (HardSigmoid, small Gemms), HardSwish
] + [("shufflenet_v2_x0_5", "torchscript")]  # channel split: TorchScript computes its bounds from Shape (folded)


@pytest.mark.parametrize("arch,exporter", ARCHS)
def test_torchvision_architecture_from_onnx(arch, exporter, tmp_path, llvm):
    _check_against_pt2_and_ort(f"tv:{arch}@64", exporter, tmp_path, llvm)


class Epilogues(nn.Module):
    """One of each pattern the passes fuse or fold: conv+bias+BN+ReLU6 (ONNX Clip), conv+BN+SiLU (Sigmoid*x),
    HardSwish, 1x1 conv+BN+residual+ReLU, global pool + flatten, Linear+SiLU, x @ W + b (MatMul+Add)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.conv4, self.bn4 = nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16, 32)
        self.proj_weight = nn.Parameter(torch.randn(32, 10))  # stored [in, out]: MatMul, not Gemm transB
        self.proj_bias = nn.Parameter(torch.randn(10))

    def forward(self, x):
        y = F.relu6(self.bn1(self.conv1(x)))
        y = F.silu(self.bn2(self.conv2(y)))
        z = F.hardswish(self.conv3(y))
        z = torch.relu(self.bn4(self.conv4(z)) + z)
        h = F.silu(self.fc1(torch.flatten(F.adaptive_avg_pool2d(z, 1), 1)))
        return h @ self.proj_weight + self.proj_bias


def _pruned_epilogues() -> nn.Module:
    gen = torch.Generator().manual_seed(5)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        m = Epilogues().eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):  # non-trivial statistics, so folding is really checked
                mod.running_mean.uniform_(-0.2, 0.2, generator=gen)
                mod.running_var.uniform_(0.6, 1.4, generator=gen)
        for p in (m.conv1.weight, m.conv2.weight, m.conv3.weight, m.conv4.weight, m.fc1.weight, m.proj_weight):
            p[p.abs() < p.abs().flatten().kthvalue(int(SPARSITY * p.numel())).values] = 0.0
    return m


def tvm_relax_run(compiled, x: np.ndarray) -> np.ndarray:
    import tvm
    from tvm import relax

    out = relax.VirtualMachine(compiled.executable, tvm.cpu())["main"](tvm.runtime.tensor(x))
    return (out if hasattr(out, "numpy") else out[0]).numpy()


@pytest.mark.parametrize("exporter,optimize", [("dynamo", True), ("dynamo", False), ("torchscript", True)],
                         ids=["dynamo", "dynamo-unoptimised", "torchscript"])
def test_epilogue_patterns_fuse_as_from_pt2(exporter, optimize, tmp_path, llvm):
    """Same layers, decisions, formats and fused epilogues as the .pt2 (the unoptimised dynamo export keeps
    BatchNormalization ops and value_* Constants)."""
    from unsparse_tvm.build import compile_onnx, compile_program

    m = _pruned_epilogues()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pt2 = compile_program(torch.export.export(m, (x,)), llvm)
        ref = m(x).numpy()
    y = tvm_relax_run(pt2, x.numpy())
    assert np.abs(y - ref).max() / np.abs(ref).max() <= TOL  # the .pt2 path itself (x @ W + b included)
    path = export_onnx(m, x, str(tmp_path / "e.onnx"), exporter, optimize=optimize)
    if not optimize:
        assert "BatchNormalization" in {n.op_type for n in onnx.load(path).graph.node}
    compiled = compile_onnx(path, llvm, log=lambda _: None)
    full = lambda report: {r.name: (r.decision, r.format, r.fused) for r in report}  # noqa: E731
    assert full(compiled.report) == full(pt2.report)
    assert {r.fused for r in compiled.report} >= {"bias+relu6", "bias+silu", "bias+residual+relu"}
    assert "proj_weight" in full(compiled.report)  # the MatMul weight, named (the .pt2 names it too)
    assert _matches_ort(compiled, path) <= TOL


# ---- every op the door accepts, alone, against ONNX Runtime ---------------------------------------------
def _init(name: str, arr) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def _sweep_cases() -> dict:
    """{case: (nodes, initializers, input shape)}: x -> op(s) -> y."""
    r = np.random.default_rng(11)
    f = lambda *s: r.standard_normal(s).astype(np.float32)  # noqa: E731
    i64 = lambda v: np.array(v, np.int64)  # noqa: E731
    n = helper.make_node
    x4 = [1, 4, 6, 6]
    unary = {op: ([n(op, ["x"], ["y"], **kw)], [], x4) for op, kw in {
        "Relu": {}, "Sigmoid": {}, "HardSigmoid": {"alpha": 0.2, "beta": 0.5}, "HardSwish": {}, "Identity": {},
        "Softmax": {"axis": 1}, "Flatten": {"axis": 1}, "GlobalAveragePool": {}, "GlobalMaxPool": {},
        "Transpose": {"perm": [0, 2, 3, 1]},
        "MaxPool": {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
        "AveragePool": {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 0}}.items()}
    binary = {op: ([n(op, ["x", "c"], ["y"])], [_init("c", np.abs(f(1, 4, 1, 1)) + 0.5)], x4)
              for op in ("Add", "Sub", "Mul", "Div")}
    return {**unary, **binary,
            "ReduceMean": ([n("ReduceMean", ["x", "axes"], ["y"], keepdims=1)], [_init("axes", i64([2, 3]))], x4),
            "Clip": ([n("Clip", ["x", "lo", "hi"], ["y"])], [_init("lo", np.float32(0)), _init("hi", np.float32(1))], x4),
            "Clip-min-only": ([n("Clip", ["x", "lo"], ["y"])], [_init("lo", np.float32(0))], x4),  # becomes a ReLU
            "Clip-crossed": ([n("Clip", ["x", "lo", "hi"], ["y"])],  # min > max: ONNX's max-then-min order, kept
                             [_init("lo", np.float32(0.5)), _init("hi", np.float32(-0.5))], x4),
            "Squeeze": ([n("GlobalAveragePool", ["x"], ["p"]), n("Squeeze", ["p", "axes"], ["y"])],
                        [_init("axes", i64([2, 3]))], x4),
            "Unsqueeze": ([n("Unsqueeze", ["x", "axes"], ["y"])], [_init("axes", i64([0]))], x4),
            "Reshape": ([n("Reshape", ["x", "shape"], ["y"])], [_init("shape", i64([1, 24, -1]))], x4),
            "Resize-nearest": ([n("Resize", ["x", "", "scales"], ["y"], mode="nearest")],
                               [_init("scales", np.array([1, 1, 2, 2], np.float32))], x4),
            "Resize-linear": ([n("Resize", ["x", "", "scales"], ["y"], mode="linear",
                                 coordinate_transformation_mode="half_pixel")],
                              [_init("scales", np.array([1, 1, 2, 2], np.float32))], x4),
            "Split": ([n("Split", ["x", "split"], ["a", "b"], axis=1), n("Concat", ["b", "a"], ["y"], axis=1)],
                      [_init("split", i64([1, 3]))], x4),
            "Slice": ([n("Slice", ["x", "starts", "ends", "axes"], ["y"])],
                      [_init("starts", i64([1])), _init("ends", i64([3])), _init("axes", i64([1]))], x4),
            "Gather": ([n("Gather", ["x", "idx"], ["y"], axis=1)], [_init("idx", i64([0, 2]))], x4),
            "Constant": ([n("Constant", [], ["c"], value=_init("v", f(1, 4, 1, 1))), n("Add", ["x", "c"], ["y"])],
                         [], x4),
            "MatMul": ([n("MatMul", ["x", "w"], ["y"])], [_init("w", f(8, 5))], [2, 8]),
            "Gemm": ([n("Gemm", ["x", "w", "b"], ["y"], transB=1)], [_init("w", f(5, 8)), _init("b", f(5))], [2, 8]),
            "Conv": ([n("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])], [_init("w", f(8, 4, 3, 3)), _init("b", f(8))],
                     x4),
            "BatchNormalization": ([n("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"])],
                                   [_init("s", f(4)), _init("b", f(4)), _init("m", f(4)),
                                    _init("v", np.abs(f(4)) + 0.5)], x4),
            "QDQ": ([n("QuantizeLinear", ["x", "s", "z"], ["q"]), n("DequantizeLinear", ["q", "s", "z"], ["y"])],
                    [_init("s", np.float32(0.05)), _init("z", np.uint8(128))], x4),
            }


def _model(nodes, inits, shape, *, opset: int = 18, inputs=None, dtype=TensorProto.FLOAT) -> onnx.ModelProto:
    inputs = inputs or [helper.make_tensor_value_info("x", dtype, shape)]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_empty_tensor_value_info("y")], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8  # what every ONNX Runtime reads
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=True)  # the output's type, as exporters write it
    except Exception:  # noqa: BLE001 (ops unknown at this opset: the bad-input cases want them as they are)
        return model


SWEEP = _sweep_cases()


@pytest.mark.parametrize("case", sorted(SWEEP))
def test_op_alone_matches_onnxruntime(case, tmp_path, llvm):
    from unsparse_tvm.build import compile_onnx

    path = str(tmp_path / "op.onnx")
    onnx.save(_model(*SWEEP[case]), path)
    err = _matches_ort(compile_onnx(path, llvm, log=lambda _: None), path)
    assert err <= (2e-2 if case == "QDQ" else TOL)  # QDQ: a rounding tie may flip by one step (0.05 of ~4)


def test_op_sweep_covers_every_accepted_op():
    from unsparse_tvm.onnx_frontend import VERIFIED_OPS

    swept = {node.op_type for nodes, _, _ in SWEEP.values() for node in nodes}
    assert VERIFIED_OPS <= swept, sorted(VERIFIED_OPS - swept)


# ---- QDQ, dynamic batch -------------------------------------------------------------------------------
def _qdq_file(model: str, folder) -> str:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    module, shape = _pruned(model)
    fp32 = export_onnx(module, torch.randn(*shape), str(folder / "fp32.onnx"), "torchscript")
    rng = np.random.default_rng(2)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input.1": rng.standard_normal(shape).astype("float32")} for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    path = str(folder / "qdq.onnx")
    # Without VNNI, ONNX Runtime's u8 x s8 products go through AVX2's saturating vpmaddubsw: 7-bit weights
    # (reduce_range, what its docs advise there) keep its reference exact; the file is QDQ either way.
    from unsparse_tvm.hostcpu import host_features

    quantize_static(fp32, path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                    reduce_range=not {"avx512vnni", "avxvnni"} & host_features())
    return path


@pytest.mark.parametrize("model", ["smallcnn", pytest.param("resnet18", marks=pytest.mark.slow)])
def test_qdq_model_runs_as_fp32_and_matches_onnxruntime(model, tmp_path, llvm):
    """ONNX Runtime's own static quantisation (QDQ, per-channel int8 weights): said in one note, run as
    fp32 with the Q/DQ of activations as written; within one output quantisation step of ONNX Runtime (a
    rounding tie at a QuantizeLinear can go either way with the order of the sums: ONNX Runtime's two
    executions of the same file differ by that much)."""
    from unsparse_tvm.build import compile_onnx

    path = _qdq_file(model, tmp_path)
    notes = []
    compiled = compile_onnx(path, llvm, log=notes.append)
    assert len(notes) == 1 and "QDQ" in notes[0] and "fp32" in notes[0]
    assert set(_decisions(compiled.report)) == set(_pt2_decisions(model))  # the layers keep their names
    assert any(r.decision == "sparse" for r in compiled.report)
    graph = onnx.load(path).graph
    last = next(nd for nd in graph.node if nd.output[0] == graph.output[0].name)
    assert last.op_type == "DequantizeLinear"
    step = float(numpy_helper.to_array(next(i for i in graph.initializer if i.name == last.input[1])))
    x = np.random.default_rng(3).standard_normal(compiled.input_shape).astype("float32")
    (got,), (ref,) = _run(compiled, x), ort_outputs(path, x)
    assert np.abs(got - ref).max() <= 1.01 * step
    assert np.mean(got != ref) < 0.1


def test_dynamic_batch_takes_batch(tmp_path, llvm):
    from unsparse_tvm.build import compile_onnx

    module, shape = _pruned("smallcnn")
    path = export_onnx(module, torch.randn(*shape), str(tmp_path / "dyn.onnx"), "torchscript", dynamic_batch=True)
    notes = []
    compiled = compile_onnx(path, llvm, batch=3, log=notes.append)
    assert compiled.input_shape == (3, *shape[1:]) and compiled.inputs[0]["name"] == "input"
    assert len(notes) == 1 and "dynamic input" in notes[0] and "[3, 1, 8, 8]" in notes[0]
    assert _matches_ort(compiled, path) <= TOL


# ---- bad input: one line, exit 2, nothing written ------------------------------------------------------
@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory) -> str:
    module, shape = _pruned("smallcnn")
    return export_onnx(module, torch.randn(*shape), str(tmp_path_factory.mktemp("small") / "s.onnx"), "torchscript")


def _bad_files(folder, small: str) -> dict:
    """{case: (path, expected text in the error, extra args)}."""
    def save(name, model):
        onnx.save(model, str(folder / name))
        return str(folder / name)

    n = helper.make_node
    x4 = [1, 4, 6, 6]
    cases = {
        "unconvertible op": (save("celu.onnx", _model([n("Celu", ["x"], ["y"])], [], x4)), "Celu", []),
        "unverified op": (save("erf.onnx", _model([n("Erf", ["x"], ["y"])], [], x4)), "Erf", []),
        "foreign domain": (save("ms.onnx", _model([n("FusedConv", ["x"], ["y"], domain="com.microsoft")], [], x4)),
                           "com.microsoft:FusedConv", []),
        "several inputs": (save("two.onnx", _model([n("Add", ["x", "z"], ["y"])], [], x4, inputs=[
            helper.make_tensor_value_info(v, TensorProto.FLOAT, x4) for v in ("x", "z")])), "2 inputs", []),
        "int64 input": (save("int.onnx", _model([n("Cast", ["x"], ["c"], to=TensorProto.FLOAT), n("Relu", ["c"], ["y"])],
                                                [], x4, dtype=TensorProto.INT64)), "int64", []),
        "old opset": (save("op6.onnx", _model([n("Relu", ["x"], ["y"])], [], x4, opset=6)), "opset 6", []),
        "future opset": (save("op99.onnx", _model([n("Relu", ["x"], ["y"])], [], x4, opset=99)), "opset 99", []),
        "missing file": (str(folder / "nope.onnx"), "no such file", []),
        "batch of a static model": (small, "fixed at 1", ["--batch", "2"]),
    }
    dyn = onnx.load(small)
    for axis, name in ((2, "height"), (3, "width")):
        dyn.graph.input[0].type.tensor_type.shape.dim[axis].dim_param = name
    cases["dynamic height/width"] = (save("hw.onnx", dyn), "dynamic dimensions (height, width", [])
    data = open(small, "rb").read()
    for name, blob in (("truncated", data[: len(data) // 2]), ("not onnx", b"this is not a model\n" * 50)):
        with open(folder / f"{name.replace(' ', '_')}.onnx", "wb") as fh:
            fh.write(blob)
        cases[name] = (str(folder / f"{name.replace(' ', '_')}.onnx"), "ONNX", [])
    return cases


BAD = ["unconvertible op", "unverified op", "foreign domain", "several inputs", "int64 input", "old opset",
       "future opset", "missing file", "batch of a static model", "dynamic height/width", "truncated", "not onnx"]


@pytest.mark.parametrize("case", BAD)
def test_bad_onnx_is_one_line(case, tmp_path, small_onnx, capsys):
    path, expect, extra = _bad_files(tmp_path, small_onnx)[case]
    out = tmp_path / "out" / "m.so"
    out.parent.mkdir()
    before = sorted(os.listdir(tmp_path))
    assert_one_line_error(["compile", path, "-o", out, *extra], capsys, expect)
    assert not os.listdir(out.parent) and sorted(os.listdir(tmp_path)) == before  # nothing left behind


# ---- the command line, as a user runs it ---------------------------------------------------------------
def test_cli_compiles_onnx_and_runs_it_in_a_fresh_process(tmp_path, small_onnx):
    so, x_path, y_path = tmp_path / "s.so", tmp_path / "x.npy", tmp_path / "y.npy"
    out = cli("compile", small_onnx, "-o", so).stdout
    assert "features.0" in out and "sparse" in out
    shape = [d.dim_value for d in onnx.load(small_onnx).graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(4).standard_normal(shape).astype("float32")
    np.save(x_path, x)
    cli("run", so, "--input", x_path, "-o", y_path)
    assert rel_err(np.load(y_path), ort_outputs(small_onnx, x)[0]) <= TOL
    info = cli("inspect", so).stdout
    assert "input.1 [1, 1, 8, 8] float32" in info  # the graph's own input name
    from unsparse_tvm.runtime import read_metadata

    meta = read_metadata(str(so))
    assert meta["inputs"] == [{"name": "input.1", "shape": shape, "dtype": "float32"}]
    assert json.dumps(meta["outputs"]) and meta["outputs"][0]["shape"] == [1, 10]


def test_public_api_compiles_onnx(tmp_path, small_onnx, capsys):
    """unsparse_tvm.compile("model.onnx"): callable on numpy, the graph's input name, saved and loaded."""
    import unsparse_tvm

    compiled = unsparse_tvm.compile(small_onnx, threshold=0.5)
    assert compiled.inputs[0]["name"] == "input.1" and compiled.inputs[0]["shape"] == [1, 1, 8, 8]
    assert [r["name"] for r in compiled.report if r["decision"] == "sparse"][:1] == ["features.0"]
    x = np.random.default_rng(6).standard_normal((1, 1, 8, 8)).astype("float32")
    assert rel_err(compiled(x), ort_outputs(small_onnx, x)[0]) <= TOL
    loaded = unsparse_tvm.load(compiled.save(str(tmp_path / "s.so")))
    assert loaded.inputs == compiled.inputs and np.array_equal(loaded(x), compiled(x))
    with pytest.raises(unsparse_tvm.UnsparseError, match="ONNX file knows its input"):
        unsparse_tvm.compile(small_onnx, example_input=x)
    assert capsys.readouterr().err == ""  # a static model: nothing to say

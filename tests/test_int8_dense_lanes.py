"""The int8 linear layer with output features in vector lanes (ops.sparse_dense_int8_lanes): against PyTorch's integer
reference and the TE operator it replaces on llvm, on AVX-512 VNNI, AVX-512 without VNNI and AVX2 code (each
compiled and its dot product checked in the assembly everywhere, run where this CPU executes it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import cpu_target, sparse_weight
from unsparse_tvm.ops.int8_formats import (ActQuant, dense_quad_rows, epilogue_consts, quantize_weight,
                                           torch_linear_reference)
from unsparse_tvm.ops.sparse_dense_int8_lanes import lane_rows, padded, row_order, sparse_dense_int8_lanes
from unsparse_tvm.schedules.x86_int8 import act_qmax, int8_kind
from unsparse_tvm.testing.isa import skip_unless_runs_here

QUANTUM_SHARE = 0.25  # test_int8's: one integer off moves an output by a whole out_scale

# (LLVM CPU, its dot product's instruction): AVX-512 VNNI, AVX-512 without VNNI, AVX2
MCPUS = [("cascadelake", "vpdpbusd"), ("skylake-avx512", "vpmaddubsw"), ("haswell", "vpmaddubsw")]


def _layer(batch, fin, fout, sparsity, relu, seed, qmax, empty=1, dense=1):
    rng = np.random.default_rng(seed)
    weight = sparse_weight((fout, fin), sparsity, rng, empty_rows=empty, dense_rows=dense)
    x = rng.standard_normal((batch, fin)).astype(np.float32)
    act = ActQuant.from_range(float(x.min()), float(x.max()), qmax)
    wq, wscale = quantize_weight(weight)
    bias = rng.standard_normal(fout).astype(np.float32)
    return x, wq, wscale, act, bias, torch_linear_reference(x, wq, wscale, act, bias, relu).numpy()


def _run(target, x, wq, wscale, act, bias, relu, lanes):
    import tvm

    rows = dense_quad_rows(wq)
    comp, out_scale = epilogue_consts(wq, wscale, act)
    packed = lane_rows(rows, lanes)
    func = sparse_dense_int8_lanes(x.shape[0], x.shape[1], wq.shape[0], rows.pad_quads, packed, act,
                                   int8_kind(target), relu)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    asm = lib.mod.inspect_source("asm")
    skip_unless_runs_here(target)
    arrays = [x, packed.data, packed.off, packed.start, *(padded(a, packed) for a in (comp, out_scale, bias)),
              row_order(packed)]
    args = [tvm.runtime.tensor(a) for a in arrays] + [tvm.runtime.tensor(np.zeros((x.shape[0], wq.shape[0]),
                                                                                   np.float32))]
    lib["main"](*args)
    return args[-1].numpy(), out_scale, packed, asm


@pytest.mark.parametrize("mcpu,instruction", MCPUS)
@pytest.mark.parametrize("batch,fin,fout,sparsity,relu", [
    (1, 64, 16, 0.7, True),      # one whole tile
    (3, 30, 10, 0.7, False),     # in-features not whole quads, a partial tile, batch > 1
    (2, 7, 5, 0.5, True),        # fewer features than one quantising vector
    (1, 515, 37, 0.9, True),     # rows sorted by length (a dense row among sparse ones), a partial last tile
    (2, 96, 48, 0.0, False),     # dense
    (1, 16, 3, 1.0, True),       # every weight zero: bias (and ReLU) alone
])
def test_int8_linear_in_lanes_is_the_integer_arithmetic(mcpu, instruction, batch, fin, fout, sparsity, relu):
    target = cpu_target(mcpu)
    lanes = 16 if mcpu != "haswell" else 8
    x, wq, wscale, act, bias, ref = _layer(batch, fin, fout, sparsity, relu, fin + fout, act_qmax(target),
                                           dense=int(sparsity < 1))
    out, out_scale, packed, asm = _run(target, x, wq, wscale, act, bias, relu, lanes)
    assert instruction in asm
    assert (np.abs(out - ref) <= QUANTUM_SHARE * out_scale).all()


def test_lane_rows_sort_where_it_saves_and_run_to_each_tiles_longest_row():
    """Rows sorted by stored length where the tiles then run fewer entries: tile t runs start[t]..start[t+1], its
    longest row; every row's quads are in its lane, in the stored order order[]."""
    rng = np.random.default_rng(3)
    wq, _ = quantize_weight(sparse_weight((40, 64), 0.8, rng, empty_rows=3, dense_rows=2))
    rows = dense_quad_rows(wq)
    stored = (rows.data != 0).any(axis=2).sum(axis=1)
    packed = lane_rows(rows, 16)
    assert packed.order is not None and sorted(packed.order) == list(range(48))
    lengths = np.diff(packed.start)
    in_order = np.pad(stored, (0, 8)).reshape(3, 16).max(axis=1)
    assert lengths.sum() < in_order.sum()
    for t in range(packed.tiles):
        for r in range(16):
            row = packed.order[t * 16 + r]
            quads = packed.data[packed.start[t]:packed.start[t + 1], r]
            if row < 40:
                assert (quads[:stored[row]] == rows.data[row, :stored[row]]).all()
            assert not quads[stored[row] if row < 40 else 0:].any()  # padding: zero weights
    assert lane_rows(rows, 16, min_saving=1.0).order is None  # not sorted where it would not save


@pytest.mark.parametrize("lanes_on", [True, False])
def test_a_scattered_linear_layer_runs_int8_in_lanes(lanes_on, llvm, monkeypatch):
    """A calibrated linear layer becomes the lanes kernel on llvm whatever its quads' fill, and the model matches
    PyTorch. The negative control (LANES off): the TE operator's scalar code lost to fp32 on scattered nonzeros,
    so such layers were left fp32."""
    import tvm
    from tvm import relax

    from unsparse_tvm.build import compile_program
    from unsparse_tvm.compress.calibrate import calibrate, calibration_batches
    from unsparse_tvm.models import export_program

    monkeypatch.setattr("unsparse_tvm.relay_passes.quantize_int8.SCATTERED_FP32", True)  # the suite turns it off
    monkeypatch.setattr("unsparse_tvm.relay_passes.quantize_int8_dense.LANES", lanes_on)
    torch.manual_seed(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(75, 33), nn.ReLU(), nn.Linear(33, 10)).eval()
    with torch.no_grad():
        for layer in (model[1], model[3]):
            layer.weight.mul_((torch.rand_like(layer.weight) > 0.9).float())  # ~1.2 nonzeros a stored quad
    shape = (2, 3, 5, 5)
    ranges = calibrate(model, calibration_batches(shape, None, 2, 16))["layers"]
    compiled = compile_program(export_program(model, shape), llvm, threshold=0.5, activations=ranges)
    formats = {d.name: d.format for d in compiled.report}
    if not lanes_on:
        assert set(compiled.fp32_int8) == {"1", "3"} and "int8q4" not in formats.values(), formats
        return
    assert formats == {"1": "int8q4", "3": "int8q4"} and not compiled.fp32_int8, formats
    first = next(d for d in compiled.report if d.name == "1")  # the report counts what the kernel stores
    from unsparse_tvm.schedules._common import cpu_vector_lanes

    lanes = cpu_vector_lanes(llvm)[0]  # a tile is the target's lanes of rows: 16 (AVX-512), 8 (AVX2)
    assert first.precision == "int8/16-bit off" and first.padded % (lanes * 4) == 0
    skip_unless_runs_here(llvm)
    x = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    y = relax.VirtualMachine(compiled.executable, tvm.cpu())["main"](tvm.runtime.tensor(x))[0].numpy()
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert np.abs(y - ref).max() < 0.05 * np.abs(ref).max()

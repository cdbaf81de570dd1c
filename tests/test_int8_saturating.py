"""ActQuant.saturating (AVX-512 VNNI targets): a zero point of 0 quantises by max 0, vcvtps2dq and vpmovusdb
instead of clamping in float and adding the rounding bias, the same bytes with one vector op less."""

import numpy as np
import pytest
from conftest import cpu_target

from unsparse_tvm.testing.isa import skip_unless_runs_here

# ties of x / 0.5 at .5 (half to even), -0.0, values past both ends and past int32, denormals
EDGES = np.array([0.25, 0.75, 1.25, -1.25, -0.25, -0.0, 0.0, 126.25, 127.75, 128.25, 200.0, 1e-30, -1e-30, 3e38,
                  -3e38, 2.2e9] * 4, dtype=np.float32)


def _build(fn, mcpu: str):
    """fn over 64 floats in vectors of 16, built for `mcpu`: (module, its assembly)."""
    import tvm
    from tvm import s_tir, te

    a = te.placeholder((64,), "float32", name="a")
    sch = s_tir.Schedule(te.create_prim_func([a, te.compute((64,), lambda i: fn(a[i]), name="q")]))
    _, inner = sch.split(sch.get_loops(sch.get_sblock("q"))[0], [4, 16])
    sch.vectorize(inner)
    target = cpu_target(mcpu)
    lib = tvm.compile(sch.mod, target=target)
    return lib, target, lib.mod.inspect_source("asm")


@pytest.mark.parametrize("relu", [False, True])
def test_saturating_quantize_gives_the_same_bytes(relu):
    """quantize with act.saturating against the float clamp and rounding bias, on edge values: equal bytes
    (numpy's round half to even, clipped to [0, 255]); the AVX-512 code uses vcvtps2dq and vpmovusdb and adds
    no rounding bias. A zero point other than 0 keeps the float clamp (the flag changes nothing)."""
    import tvm

    from unsparse_tvm.ops.int8_formats import ActQuant
    from unsparse_tvm.ops.sparse_int8 import quantize

    plain, sat = ActQuant(0.5, 0, 255), ActQuant(0.5, 0, 255, saturating=True)
    (plain_lib, target, plain_asm), (sat_lib, _, asm) = (
        _build(lambda v, act=act: quantize(v, act, relu), "cascadelake") for act in (plain, sat))
    assert "vcvtps2dq" in asm and "vpmovusdb" in asm, asm
    assert "vpmovusdb" not in plain_asm and "vpmovdb" in plain_asm
    _, _, shifted = _build(lambda v: quantize(v, ActQuant(0.5, 3, 255, saturating=True), relu), "cascadelake")
    assert "vpmovusdb" not in shifted  # zp 3: the float clamp and the bias, as before
    skip_unless_runs_here(target)
    outs = []
    for lib in (plain_lib, sat_lib):
        out = tvm.runtime.tensor(np.zeros(64, np.uint8))
        lib["main"](tvm.runtime.tensor(EDGES), out)
        outs.append(out.numpy())
    with np.errstate(over="ignore"):
        want = np.clip(np.round(EDGES.astype(np.float64) / 0.5), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(outs[0], want)
    np.testing.assert_array_equal(outs[1], want)


def test_saturating_lanes_give_the_same_bytes():
    """The gathered kernels' write-back (quantize_lanes) with act.saturating: the same bytes as without."""
    import tvm
    from tvm.script import tirx as T

    from unsparse_tvm.ops.int8_formats import ActQuant
    from unsparse_tvm.ops.sparse_int8_gathered import quantize_lanes

    outs = []
    for act in (ActQuant(0.5, 0, 255), ActQuant(0.5, 0, 255, saturating=True)):
        @T.prim_func(s_tir=True)
        def lanes(xb: T.Buffer((64,), "float32"), yb: T.Buffer((64,), "uint8")):
            for i in range(4):
                yb[T.Ramp(i * 16, 1, 16)] = quantize_lanes(xb[T.Ramp(i * 16, 1, 16)], act, 16, True)

        target = cpu_target("cascadelake")
        lib = tvm.compile(lanes, target=target)
        assert ("vpmovusdb" in lib.mod.inspect_source("asm")) == act.saturating
        skip_unless_runs_here(target)
        out = tvm.runtime.tensor(np.zeros(64, np.uint8))
        lib["main"](tvm.runtime.tensor(EDGES), out)
        outs.append(out.numpy())
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("mcpu, saturating", [("cascadelake", True), ("haswell", False), ("skylake-avx512", False)])
def test_the_pass_sets_saturating_on_vnni_targets_only(mcpu, saturating):
    """Int8LayerPass marks its quantisations saturating where the int8 kernels run VNNI (AVX-512), not on AVX2
    code nor on AVX-512 without VNNI (their uint8 range is 127 and their kernels pmadd)."""
    from unsparse_tvm.relay_passes.quantize_int8 import QuantizeInt8Conv2d

    assert QuantizeInt8Conv2d({}, cpu_target(mcpu)).saturating == saturating

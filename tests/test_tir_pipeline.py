"""tir_pipeline: small buffers of our kernels stay on the stack instead of the workspace pool (design.md item 53).

TVM 0.27 turns each "local" allocation, and each name a TVMScript kernel binds, into a TVMBackendAllocWorkspace /
FreeWorkspace pair, inside a parallel loop one pair per iteration. Checked on the assembly (what runs) and on
the outputs, which must not change."""

import numpy as np
import pytest
import torch

ALLOC = "TVMBackendAllocWorkspace"


def _kernel(local_bytes: int):
    """A parallel loop whose body binds a name (x0) and fills a local buffer of `local_bytes` (a multiple of
    112): a copy of x."""
    from tvm.script import tirx as T

    n = local_bytes

    @T.prim_func(s_tir=True)
    def kernel(x: T.Buffer((8, 100), "uint8"), y: T.Buffer((8, 100), "uint8")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "global_symbol": "main"})
        with T.sblock("root"):
            xf = T.decl_buffer((800,), "uint8", data=x.data)
            yf = T.decl_buffer((800,), "uint8", data=y.data)
            for b in T.parallel(8):
                v = T.decl_buffer((n,), "uint8", scope="local")
                for k in range(n // 16):  # the whole buffer written (TVM compacts a buffer to what is used)
                    x0 = T.min(k % 7 * 16, 84)  # the last step shifted back to end at the row's end
                    v[T.Ramp(k * 16, 1, 16)] = xf[T.Ramp(b * 100 + x0, 1, 16)]
                for k in range(7):
                    yf[T.Ramp(b * 100 + T.min(k * 16, 84), 1, 16)] = v[T.Ramp(k * 16, 1, 16)]

    return kernel


def _build(func, llvm, ours: bool):
    import tvm

    from unsparse_tvm.tir_pipeline import pipeline

    return tvm.tirx.build(tvm.IRModule({"main": func}), target=llvm, pipeline=pipeline() if ours else None)


def _copies(lib) -> bool:
    import tvm

    x = np.random.default_rng(0).integers(0, 256, (8, 100)).astype(np.uint8)
    y = tvm.runtime.tensor(np.zeros_like(x))
    lib["main"](tvm.runtime.tensor(x), y)
    return bool((y.numpy() == x).all())


def test_small_buffers_of_a_parallel_loop_stay_on_the_stack(llvm):
    """A bound name and a 112-byte local buffer: TVM's own lowering allocates both from the workspace pool (the
    negative control), ours keeps them on the stack; the same copy either way."""
    func = _kernel(112)
    theirs, ours = _build(func, llvm, ours=False), _build(func, llvm, ours=True)
    assert theirs.inspect_source("asm").count(ALLOC) >= 2
    assert ours.inspect_source("asm").count(ALLOC) == 0
    assert _copies(theirs) and _copies(ours)


def test_a_buffer_over_the_stack_limit_stays_in_the_workspace(llvm):
    """The limit holds: a local buffer over MAX_STACK_BYTES (4 KB) is still allocated from the workspace."""
    from unsparse_tvm.tir_pipeline import MAX_STACK_BYTES

    assert 112 * 40 > MAX_STACK_BYTES
    ours = _build(_kernel(112 * 40), llvm, ours=True)
    assert ours.inspect_source("asm").count(ALLOC) >= 1
    assert _copies(ours)


@pytest.mark.parametrize("kind", ["relay", "strided", "pool"])
def test_handwritten_kernels_allocate_nothing_per_iteration(kind, llvm):
    """quad_relay, quad_relay_strided and the vector max pool bind no names in their scripts any more: with
    TVM's own lowering too, no workspace call is left in their loops (each bound name cost two per quad: 7x7
    relays ran 2-3x slower). The pool's row buffer (one for the call) is its only allocation."""
    from unsparse_tvm.ops.geometry import ConvGeometry
    from unsparse_tvm.ops.int8_formats import pad_quads
    from unsparse_tvm.ops.pool import max_pool_3x3s2
    from unsparse_tvm.ops.quad_relay import quad_relay, quad_relay_strided

    if kind == "pool":
        func, allowed = max_pool_3x3s2((1, 8, 40, 40), "uint8", 16), 1
    else:
        geo = ConvGeometry(1, 16, 28, 28, 4, 3, 3, (2, 2) if kind == "strided" else (1, 1), (1, 1, 1, 1), (1, 1))
        make = quad_relay_strided if kind == "strided" else quad_relay
        func, allowed = make((1, 16, 28, 28), geo, pad_quads(geo), 3), 0
    asm = _build(func.with_attr("global_symbol", "main"), llvm, ours=False).inspect_source("asm")
    assert asm.count(ALLOC) <= allowed * 2  # a call site, and its error path's where LLVM duplicates it


def test_a_compiled_model_keeps_its_outputs_and_drops_workspace_calls(llvm, monkeypatch):
    """A small int8 network (convs, a strided conv, the linear layer) built with our lowering and with TVM's: fewer
    workspace call sites, the same outputs bit for bit."""
    import tvm
    from tvm import relax

    from unsparse_tvm import tir_pipeline
    from unsparse_tvm.build import compile_program
    from unsparse_tvm.models import export_program

    from conftest import int8_ready
    from test_wide_vectors import _Net

    torch.manual_seed(0)
    net = _Net().eval()
    ranges = int8_ready(net, (1, 3, 16, 16), 0.7)
    x = tvm.runtime.tensor(np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32))
    calls, outs = [], []
    for ours in (True, False):
        if not ours:
            monkeypatch.setattr(tir_pipeline, "pipeline", lambda: None)  # TVM's default lowering
        compiled = compile_program(export_program(net, (1, 3, 16, 16)), llvm, threshold=0.5, activations=ranges)
        calls.append(sum(lib.inspect_source("asm").count(ALLOC)
                         for lib in compiled.executable.mod._collect_dso_modules()))
        outs.append(relax.VirtualMachine(compiled.executable, tvm.cpu())["main"](x)[0].numpy())
    assert calls[0] < calls[1], calls
    np.testing.assert_array_equal(outs[0], outs[1])

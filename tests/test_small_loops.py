"""SerialSmallLoops (schedules/small_loops.py): parallel loops over little work become serial, the rest stay
parallel, and what the function computes does not change."""

import numpy as np
from tvm.script import tirx as T


@T.prim_func(s_tir=True)
def loops(a: T.Buffer((64, 64), "float32"), n: T.Buffer((1,), "int32"), b: T.Buffer((64, 64), "float32")):
    T.func_attr({"tirx.noalias": True})
    for i in T.parallel(2):  # 64 statements: serial
        for j in range(32):
            b[i, j] = a[i, j] + T.float32(1)
    for i in T.parallel(64):  # 4096: stays parallel
        for j in range(64):
            b[i, j] = b[i, j] * T.float32(2)
    for i in T.parallel(8):  # 8 x 4 16-lane vector statements: serial
        for j in T.vectorized(64):
            b[i, j] = b[i, j] + a[i, j]
    for i in T.parallel(2):  # a loop whose extent is read at run time inside: as many as it may be, parallel
        for j in range(n[0]):
            b[i + 8, j] = a[i + 8, j]


def _outer_loops(func):
    """The four `i` loops, in order."""
    import tvm_ffi
    from tvm import tirx

    found = []

    def visit(node, visitor):
        if isinstance(node, tirx.For) and node.loop_var.name == "i":
            found.append(node)
        return visitor.default_visit(node)

    tvm_ffi.structural_visit(func.body, [(object, visit)])
    return found


def _kinds(func):
    from tvm import tirx

    return [loop.kind == tirx.ForKind.PARALLEL for loop in _outer_loops(func)]


def test_small_parallel_loops_become_serial(llvm):
    import tvm

    from unsparse_tvm.schedules.small_loops import SerialSmallLoops, statements

    assert [statements(loop) for loop in _outer_loops(loops)] == [64, 4096, 32, float("inf")]
    mod = tvm.IRModule({"main": loops})
    after = SerialSmallLoops()(mod)
    assert _kinds(loops) == [True, True, True, True]
    assert _kinds(after["main"]) == [False, True, False, True]
    assert _kinds(SerialSmallLoops(limit=5)(mod)["main"]) == [True, True, True, True]  # 32 and 64 >= 5: all stay
    x = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    outs = []
    for m in (mod, after):
        b = tvm.runtime.tensor(np.zeros((64, 64), np.float32))
        tvm.compile(m, target=llvm)["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(np.array([40], np.int32)), b)
        outs.append(b.numpy())
    np.testing.assert_array_equal(outs[0], outs[1])

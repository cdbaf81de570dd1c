"""FoldConstantArrays: constant calls folded in numpy, the same module as Relax's FoldConstant makes, which it
runs only where a constant call it does not know remains."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import tvm
from tvm import relax

from unsparse_tvm.relay_passes import FoldConstantArrays


def _imported(model: nn.Module, shape: tuple) -> tvm.IRModule:
    from unsparse_tvm.frontend import import_program

    with torch.no_grad():
        return import_program(torch.export.export(model.eval(), (torch.randn(*shape),)))[0]


def _constant_calls(mod: tvm.IRModule) -> list[str]:
    """Ops of the calls whose arguments are all constants (or shapes), through variables bound to constants."""
    from tvm.ir import GenericConst

    func = mod["main"]
    var2val = relax.analysis.get_var2val(func)
    found = []

    @relax.expr_functor.visitor
    class Visitor(relax.PyExprVisitor):
        def visit_call_(self, call):
            args = [var2val.get(a, a) for a in call.args if not isinstance(a, relax.ShapeExpr)]
            if isinstance(call.op, tvm.ir.Op) and args and all(isinstance(a, GenericConst) for a in args):
                found.append(call.op.name)
            super().visit_call_(call)

    Visitor().visit_expr(func)
    return found


def _run(mod: tvm.IRModule, x: np.ndarray) -> np.ndarray:
    ex = tvm.compile(mod, target="llvm")
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x))[0].numpy()


def test_biases_and_transposes_fold_without_relax_fold_constant(monkeypatch):
    """A conv's reshaped bias, two linears' transposed weights (and biases): nothing constant left, no kernel
    built to fold them, and the module computes what Relax's FoldConstant's does. Negative control: the
    imported module has such calls."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 16),
                        nn.ReLU(), nn.Linear(16, 4))
    mod = _imported(net, (1, 3, 6, 6))
    assert {"relax.reshape", "relax.permute_dims"} <= set(_constant_calls(mod))
    reference = relax.transform.FoldConstant()(mod)
    monkeypatch.setattr(relax.transform, "FoldConstant", lambda: pytest.fail("FoldConstant ran"))
    folded = FoldConstantArrays()(mod)
    assert _constant_calls(folded) == []
    x = np.random.default_rng(1).standard_normal((1, 3, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(_run(folded, x), _run(reference, x))


def test_an_op_it_does_not_fold_goes_to_relax_fold_constant():
    """exp of a constant (not in FOLDS): folded all the same, by Relax's FoldConstant."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 3), "float32"))
    c = np.arange(6, dtype=np.float32).reshape(2, 3) / 6
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.add(x, relax.op.exp(relax.const(c))))
            out = bb.emit_output(relax.Tuple([y]))
        bb.emit_func_output(out)
    mod = bb.get()
    assert _constant_calls(mod) == ["relax.exp"]
    folded = FoldConstantArrays()(mod)
    assert _constant_calls(folded) == []
    x_np = np.ones((2, 3), np.float32)
    np.testing.assert_allclose(_run(folded, x_np), 1 + np.exp(c), rtol=1e-6)

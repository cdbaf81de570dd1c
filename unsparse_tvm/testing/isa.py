"""The test suite runs only code this CPU executes (an AVX2-only machine must get a summary, not SIGILL).

- `skip_unless_runs_here(target)`: a test about to run code built for `target` skips, saying which
  extensions this CPU lacks; it can still compile that code and read its assembly first.
- `ISAGuard`: installed for the whole session by tests/conftest.py, it checks every compiled module
  before it can run (`tvm.runtime.Executable.jit`, which `VirtualMachine(ex)`, `ex(...)` and `ex["f"]` all
  go through) and fails the test that forgot to ask, instead of letting it kill the whole run.
"""

from __future__ import annotations

import json

from unsparse_tvm.hostcpu import describe_missing
from unsparse_tvm.target import cpu_features, runnable_here


class ForeignISAError(AssertionError):
    """A test tried to run code for CPU extensions this CPU lacks."""


def module_cpus(module) -> list[tuple[str, tuple[str, ...]]]:
    """(mcpu, mattr) of every LLVM-compiled part of a runtime module (its target string says)."""
    cpus = []
    for m in module._collect_dso_modules():
        if m.kind != "llvm":
            continue
        text = str(m.get_function("_get_target_string")())
        try:
            spec = json.loads(text)
        except json.JSONDecodeError:  # an older "llvm -mcpu=..." string
            spec = dict(p.lstrip("-").split("=", 1) for p in text.split()[1:] if "=" in p)
            spec["mattr"] = spec.get("mattr", "").split(",") if spec.get("mattr") else []
        if spec.get("mcpu"):
            cpus.append((str(spec["mcpu"]), tuple(spec.get("mattr") or ())))
    return cpus


def why_not_runnable(module) -> str | None:
    """None where this CPU executes every part of `module`, else which extensions it lacks."""
    for mcpu, mattr in module_cpus(module):
        why = describe_missing(f"code for {mcpu}", cpu_features(mcpu, mattr))
        if why:
            return why
    return None


def skip_unless_runs_here(target) -> None:
    import pytest

    why = runnable_here(target)
    if why:
        pytest.skip(f"not run here: {why} (compiled and checked only)")


class ISAGuard:
    """Wraps tvm.runtime.Executable.jit for as long as it is installed (see the module docstring)."""

    def __init__(self):
        from tvm.runtime import Executable

        self._cls, self._jit = Executable, Executable.jit

    def install(self) -> "ISAGuard":
        real = self._jit

        def jit(executable, *args, **kwargs):
            why = why_not_runnable(executable.mod)
            if why:
                raise ForeignISAError(f"a test tried to run {why}: call unsparse_tvm.testing.isa."
                                      "skip_unless_runs_here(target) before running it")
            return real(executable, *args, **kwargs)

        self._cls.jit = jit
        return self

    def uninstall(self) -> None:
        self._cls.jit = self._jit

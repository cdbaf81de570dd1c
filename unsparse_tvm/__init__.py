"""unsparse-tvm: compile pruned and quantised CNNs with TVM into sparse direct-convolution kernels.

    import unsparse_tvm
    net = unsparse_tvm.prune(net, 0.9)                        # nn.Module, pruned in place
    compiled = unsparse_tvm.compile(net, example_input=x)     # a callable CompiledModel
    compiled(x); compiled.save("model.so")                    # unsparse_tvm.load("model.so")(x)

Data flows one way: model -> prune/quantise -> import (torch.export -> Relax) -> passes
(`unsparse_tvm.relay_passes`) -> schedules (`unsparse_tvm.schedules`) -> build -> tune/bench -> deploy.
The public names below are imported on first use, so `import unsparse_tvm` stays light and
`unsparse-tvm run` runtime-only (no torch, no compiler).
"""

import importlib
import os

__version__ = "0.1.0"

# TVM sizes its CPU thread pool once, from TVM_NUM_THREADS, else from half the hardware threads (it
# assumes hyper-threading): one thread on a 2-vCPU machine, and that one a worker the calling thread hands
# every kernel to and waits for. Measured on such a machine, mobilenet_v2 at 128x128 ran 2.7 ms per
# inference that way, 1.6 ms with the pool sized to the cores (one thread used) and 1.1 ms with both
# used; `runtime.config_threadpool` (bench --threads) cannot grow a pool past its start size. So the
# pool is sized to the cores this process may run on, unless the user chose.
if "TVM_NUM_THREADS" not in os.environ:
    from .reference import usable_cores

    os.environ["TVM_NUM_THREADS"] = str(usable_cores())


# the public API (unsparse_tvm.api), loaded on first use
_API = {**dict.fromkeys(("compile", "load", "tune", "calibrate", "CompiledModel", "CompileOptions"), ".api"),
        **dict.fromkeys(("prune", "quantize", "train", "evaluate"), ".api_compress")}
__all__ = [*_API, "UnsparseError", "__version__"]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name], __name__), name)
    if name == "UnsparseError":
        from .errors import UnsparseError

        return UnsparseError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

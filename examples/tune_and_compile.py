"""Tune the sparse kernels of a pruned model with MetaSchedule (XGBoost cost model), then compile with the
records and compare the default knobs with the tuned ones.

    python examples/tune_and_compile.py [--model vgg16-cifar] [--trials 64] [--log-dir DIR]

The same with the command line:
    unsparse-tvm tune vgg16-cifar --sparsity 0.9 --target llvm --trials 64 --log-dir mylog
    unsparse-tvm logs show mylog
    unsparse-tvm bench vgg16-cifar --sparsity 0.9 --tuning-log mylog --no-layers
Running it again with the same --log-dir resumes (records already there count toward --trials).
"""

import argparse
import tempfile
import time

import numpy as np
import tvm
from tvm import relax

from unsparse_tvm.bench import round_robin
from unsparse_tvm.build import compile_program
from unsparse_tvm.frontend import program_input_shape
from unsparse_tvm.models import example_input
from unsparse_tvm.compress.prune import prune_to_program
from unsparse_tvm.target import make_target
from unsparse_tvm.tuning import open_database, tune

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="vgg16-cifar")
parser.add_argument("--sparsity", type=float, default=0.9)
parser.add_argument("--trials", type=int, default=64)
parser.add_argument("--log-dir", default=None, help="default: a new temporary directory")
args = parser.parse_args()



def ms_per_call(fn, x, n):
    start = time.perf_counter()
    for _ in range(n):
        fn(x)
    return (time.perf_counter() - start) / n * 1e3


target = make_target("llvm")
ep = prune_to_program(args.model, args.sparsity)
log_dir = args.log_dir or tempfile.mkdtemp(prefix="unsparse-log-")
result = tune(ep, target, log_dir, args.trials)           # appends records to log_dir
print(result.table())

database = open_database(log_dir, target)                  # best record per workload, this target only
tuned = compile_program(ep, target, database=database)
print(database.summary())
default = compile_program(ep, target)

x = tvm.runtime.tensor(example_input(program_input_shape(ep)).numpy())
timers, outputs = {}, {}
for name, compiled in (("default knobs", default), ("tuned", tuned)):
    vm = relax.VirtualMachine(compiled.executable, tvm.cpu())
    fn = vm["main"]
    out = fn(x)
    outputs[name] = (out if hasattr(out, "numpy") else out[0]).numpy()
    timers[name] = lambda n, fn=fn: ms_per_call(fn, x, n)


assert np.allclose(outputs["default knobs"], outputs["tuned"], rtol=1e-4, atol=1e-4)
ms = round_robin(timers, repeat=10)
print(f"default knobs {ms['default knobs']:.3f} ms, tuned {ms['tuned']:.3f} ms: "
      f"{ms['default knobs'] / ms['tuned']:.2f}x (records in {log_dir})")

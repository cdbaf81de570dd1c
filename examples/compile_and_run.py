"""The whole flow from Python: prune a built-in model, compile it for the CPU (and, with nvcc, for an
H100), run the deployable module with the TVM runtime, compare with PyTorch.

    python examples/compile_and_run.py [--model vgg16-cifar] [--sparsity 0.9] [--cuda]
"""

import argparse
import os
import tempfile

import numpy as np
import torch

from unsparse_tvm.build import compile_program, export, print_report
from unsparse_tvm.frontend import program_input_shape
from unsparse_tvm.compress.prune import prune_to_program
from unsparse_tvm.runtime import describe_module, load, run_array
from unsparse_tvm.target import make_target

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="vgg16-cifar")
parser.add_argument("--sparsity", type=float, default=0.9)
parser.add_argument("--cuda", action="store_true", help="also build an sm_90 module (needs nvcc)")
args = parser.parse_args()

ep = prune_to_program(args.model, args.sparsity)                 # model -> prune (one-shot magnitude)
compiled = compile_program(ep, make_target("llvm"))              # import -> passes -> schedules -> build
print_report(compiled)                                           # each layer's decision and why
out_dir = tempfile.mkdtemp()
so = os.path.join(out_dir, "model.so")
export(compiled, so, model=args.model)                           # one file, weights inside

x = np.random.default_rng(0).standard_normal(program_input_shape(ep)).astype(np.float32)
vm, dev, meta = load(so)                                          # what `unsparse-tvm run` does
y = run_array(vm, dev, meta, x)
with torch.no_grad():
    ref = ep.module()(torch.from_numpy(x)).numpy()
print(f"max relative error vs PyTorch: {np.abs(y - ref).max() / np.abs(ref).max():.2e}")

if args.cuda:
    cuda_so = os.path.join(out_dir, "model_sm90.so")
    export(compile_program(ep, make_target("cuda", "sm_90")), cuda_so, model=args.model)
    print(describe_module(cuda_so))

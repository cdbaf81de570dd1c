"""Tune the sparse kernels of a pruned model with MetaSchedule (XGBoost cost model), then compile with the
records and compare the default knobs with the tuned ones, in alternating rounds.

    python examples/tune_and_compile.py [--model vgg16-cifar] [--trials 64] [--log-dir DIR]

The same with the command line:
    unsparse-tvm prune vgg16-cifar --sparsity 0.9 -o vgg.pt2
    unsparse-tvm tune vgg.pt2 --target llvm --trials 64 --log-dir mylog
    unsparse-tvm logs show mylog
    unsparse-tvm bench vgg.pt2 --tuning-log mylog --no-layers
Running it again with the same --log-dir resumes (records already there count toward --trials).
"""

import argparse
import os
import statistics
import tempfile

import torch

import unsparse_tvm

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="vgg16-cifar")
parser.add_argument("--sparsity", type=float, default=0.9)
parser.add_argument("--trials", type=int, default=64)
parser.add_argument("--log-dir", default=None, help="default: a new temporary directory")
args = parser.parse_args()

SHAPES = {"smallcnn": (1, 1, 8, 8), "vgg16-cifar": (1, 3, 32, 32), "resnet18": (1, 3, 224, 224)}  # batch 1

work = tempfile.TemporaryDirectory(prefix="unsparse-example-")  # removed at the end; --log-dir keeps the records
pruned = os.path.join(work.name, "pruned.pt2")
net = unsparse_tvm.prune(args.model, args.sparsity)                # built-in name -> pruned nn.Module
x = SHAPES[args.model]
torch.export.save(torch.export.export(net, (torch.randn(*x),)), pruned)  # the same weights for tune and compile

log_dir = args.log_dir or os.path.join(work.name, "log")
result = unsparse_tvm.tune(pruned, log_dir, args.trials)          # appends records to log_dir
print(result.table())

default = unsparse_tvm.compile(pruned)
tuned = unsparse_tvm.compile(pruned, tuning_log=log_dir)           # best record per workload, this target only
inp = torch.randn(*x)
assert torch.allclose(default(inp), tuned(inp), rtol=1e-4, atol=1e-4)
rounds = {"default knobs": [], "tuned": []}
for _ in range(5):                                                 # alternating rounds: a noisy machine slows both
    for name, model in (("default knobs", default), ("tuned", tuned)):
        rounds[name].append(model.benchmark(number=10, repeat=3)["median_ms"])
ms = {k: statistics.median(v) for k, v in rounds.items()}
print(f"default knobs {ms['default knobs']:.3f} ms, tuned {ms['tuned']:.3f} ms: "
      f"{ms['default knobs'] / ms['tuned']:.2f}x")
print(f"records in {log_dir}" if args.log_dir else "records removed with the temporary folder: --log-dir keeps them")
work.cleanup()

"""Your own PyTorch model through the whole flow: prune it, compile it into sparse kernels for this CPU
(and, with nvcc, for an H100), call it, save the one-file module, load it with the TVM runtime alone.

    python examples/compile_and_run.py [--sparsity 0.9] [--cuda]
"""

import argparse
import os
import tempfile

import torch
import torch.nn as nn

import unsparse_tvm

parser = argparse.ArgumentParser()
parser.add_argument("--sparsity", type=float, default=0.9)
parser.add_argument("--cuda", action="store_true", help="also build an sm_90 module (needs nvcc, not a GPU)")
args = parser.parse_args()

net = nn.Sequential(                                          # any CNN: NCHW convs, BN, ReLU, pooling, linear
    nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),          # [N,64,32,32]
    nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.BatchNorm2d(128), nn.ReLU(),  # [N,128,16,16]
    nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(),                           # [N,128,16,16]
    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),              # [N,10]
).eval()
x = torch.randn(1, 3, 32, 32)

unsparse_tvm.prune(net, args.sparsity)                        # layer-wise magnitude pruning, in place
model = unsparse_tvm.compile(net, example_input=x)            # import -> passes -> schedules -> build
for layer in model.report:                                    # why each layer runs sparse or dense
    print(f"{layer['name']:4s} {str(layer['shape']):18s} sparsity {layer['sparsity']:.2f}  {layer['decision']} "
          f"{layer['format'] if layer['decision'] == 'sparse' else '(' + layer['reason'] + ')'}")

with torch.no_grad():
    ref = net(x)
y = model(x)                                                  # torch in, torch out (numpy in, numpy out)
print(f"max relative error vs PyTorch: {float((y - ref).abs().max() / ref.abs().max()):.2e}")
print(f"time per call: {model.benchmark()['median_ms']:.3f} ms")

work = tempfile.TemporaryDirectory(prefix="unsparse-example-")  # removed at the end: save where you keep files
so = model.save(os.path.join(work.name, "model.so"))          # one file, weights inside
deployed = unsparse_tvm.load(so)                              # TVM runtime only, as `unsparse-tvm run`
print(f"{deployed}: same output: {bool((deployed(x) == y).all())}")

if args.cuda:
    gpu = unsparse_tvm.compile(net, "cuda", example_input=x, arch="sm_90")
    print(f"CUDA module: {gpu.save(os.path.join(os.path.dirname(so), 'model_sm90.so'))}")
work.cleanup()

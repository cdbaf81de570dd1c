"""Train smallcnn on sklearn's digits, prune it gradually (vector-wise, V=4, 80%), quantise to int8,
compile, and check the accuracy at every step, the compiled model's included.

    python examples/prune_and_quantize.py        # about a minute on 2 cores

The same with the command line (each step writes a .pt2 the next one reads; --report writes the numbers):
    unsparse-tvm train smallcnn --dataset digits --epochs 40 -o dense.pt2
    unsparse-tvm prune dense.pt2 --method vector --vector-size 4 --sparsity 0.8 --dataset digits --epochs 60 -o v4.pt2
    unsparse-tvm quantize v4.pt2 --scheme int8 --dataset digits -o v4_int8.pt2 --report v4_int8.json
    unsparse-tvm compile v4_int8.pt2 -o v4_int8.so
"""

import torch

import unsparse_tvm

net = unsparse_tvm.train("smallcnn", "digits", epochs=40)     # the built-in model, trained densely
dense = unsparse_tvm.evaluate(net, "digits")
print(f"dense:            {dense:.2f}%")

# 80% of the weights removed in groups of 4 output channels; sparsity ramps up over the first 60%
# of the fine-tuning (cubic schedule), the rest trains at the final mask
unsparse_tvm.prune(net, 0.8, method="vector", vector_size=4, data="digits", epochs=60)
pruned = unsparse_tvm.evaluate(net, "digits")
print(f"vector-4, 80%:    {pruned:.2f}% ({pruned - dense:+.2f})")

unsparse_tvm.quantize(net, "int8")                             # per-output-channel int8, zeros untouched
quantised = unsparse_tvm.evaluate(net, "digits")
print(f"+ int8:           {quantised:.2f}% ({quantised - pruned:+.2f})")

model = unsparse_tvm.compile(net, example_input=torch.randn(64, 1, 8, 8))  # batch 64: the accuracy pass
compiled = unsparse_tvm.evaluate(model, "digits")
print(f"compiled:         {compiled:.2f}% ({compiled - quantised:+.2f})")
for layer in model.report:
    print(f"  {layer['name']:14s} {layer['decision']:7s} {layer['format']:6s} {layer['precision']:>10s} "
          f"{layer['weight_bytes']:8,d} B")

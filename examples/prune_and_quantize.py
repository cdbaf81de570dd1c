"""Train smallcnn on sklearn's digits, prune it gradually (vector-wise, V=4, 80%), quantise to int8, export .pt2.

    python examples/prune_and_quantize.py [out.pt2]        # about half a minute on 2 cores

The same with the command line (each step writes a .pt2 the next one reads; --report writes the numbers):
    unsparse-tvm train smallcnn --dataset digits --epochs 40 -o dense.pt2
    unsparse-tvm prune dense.pt2 --method vector --vector-size 4 --sparsity 0.8 --dataset digits --epochs 60 -o v4.pt2
    unsparse-tvm quantize v4.pt2 --scheme int8 --dataset digits -o v4_int8.pt2 --report v4_int8.json
    unsparse-tvm inspect v4_int8.pt2
"""

from __future__ import annotations

import sys

from unsparse_tvm.compress.data import load_dataset
from unsparse_tvm.compress.report import describe_program
from unsparse_tvm.compress.prune import prune_model
from unsparse_tvm.compress.targets import PruneConfig
from unsparse_tvm.compress.quantize import quantize_model
from unsparse_tvm.frontend import read_quantization
from unsparse_tvm.compress.train import evaluate, train
from unsparse_tvm.frontend import load_model, save_model


def main(out: str = "smallcnn_vector4_int8.pt2") -> None:
    data = load_dataset("digits")  # fixed, stratified 1437/360 split
    model = load_model("smallcnn")  # the built-in model with seeded random weights, as a trainable nn.Module
    train(model.module, data, epochs=40, lr=3e-3)
    dense = evaluate(model.module, data)
    print(f"dense:            {dense:.2f}%")

    # 80% of the weights removed in groups of 4 output channels; sparsity ramps up over the first 60%
    # of the fine-tuning (cubic schedule), the rest trains at the final mask
    cfg = PruneConfig(sparsity=0.8, method="vector", vector_size=4, epochs=60)
    prune_model(model.module, cfg, data)
    pruned = evaluate(model.module, data)
    print(f"vector-4, 80%:    {pruned:.2f}% ({pruned - dense:+.2f})")

    quant = quantize_model(model.module, "int8")  # per-output-channel int8, zeros untouched
    final = evaluate(model.module, data)
    print(f"+ int8:           {final:.2f}% ({final - pruned:+.2f})")

    model.meta.update(trained=True, dataset=data.name, accuracy=round(final, 3), pruning={"method": "vector", "sparsity": 0.8,
                      "vector_size": 4, "epochs": 60})
    save_model(model, out, overwrite=True, quant=quant)  # .pt2 + unsparse_model.json + unsparse_quant.json
    assert read_quantization(out)["scheme"] == "int8"
    print(describe_program(out))


if __name__ == "__main__":
    main(*sys.argv[1:2])

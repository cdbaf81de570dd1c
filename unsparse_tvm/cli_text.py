"""The CLI's longer help texts (unsparse_tvm.cli builds the parser)."""

MODEL_HELP = "a built-in model (smallcnn, vgg16-cifar, vgg16, resnet18, resnet50) or a .pt2 file"
MODEL_INPUT_HELP = (MODEL_HELP + "; a .pt2 written by train/prune/quantize can be fine-tuned again, "
                    "another .pt2 only pruned/quantised one-shot")
WEIGHTS_HELP = ("weights for a built-in MODEL: a state_dict saved with torch.save(model.state_dict(), 'w.pt'), "
                "or a .pt2 of the same model (default: seeded random weights)")

# help and description of the longer-described commands
TEXTS = {
    "prune": ("prune conv and linear weights (unstructured, vector, block, mixed), optionally while fine-tuning",
        "Prune every conv2d/linear weight and save the model as .pt2. Without --dataset/--epochs it is "
        "one-shot layer-wise magnitude pruning; with --dataset D --epochs N, sparsity ramps up on a cubic "
        "schedule (Zhu & Gupta) while fine-tuning. Chain: train -> prune -> quantize, passing .pt2 files."),
    "quantize": ("quantise conv and linear weights (int8, int4, kmeansB, pow2), zeros kept; save as .pt2",
        "Quantise the nonzero conv2d/linear weights; zeros stay exactly zero. The .pt2 keeps float "
        "weights holding the dequantised values, and carries the scheme with its per-layer scales or "
        "codebooks as unsparse_quant.json (unsparse_tvm.frontend.read_quantization)."),
    "train": ("train a built-in model densely on a data set (the baseline for prune/quantize); save as .pt2",
        "Dense training (Adam, cosine learning rate). The .pt2 it writes records the built-in model, so "
        "`prune`/`quantize`/`train` take it as MODEL and can fine-tune it further; to start from your own "
        "PyTorch training, pass the built-in name with --weights state.pt (a state_dict). Weights that "
        "are exactly zero (a pruned .pt2) stay zero."),
    "tune": ("tune the sparse kernels' schedule knobs with MetaSchedule (XGBoost), records to --log-dir",
        "One task per distinct sparse workload; MetaSchedule's evolutionary search with its XGBoost "
        "cost model draws the knobs of our hand-written schedules, timed with the layers' real sparse "
        "index arrays. Records are appended per measured batch: Ctrl-C loses nothing, and running the "
        "same command again resumes (records already in DIR count toward --trials)."),
}

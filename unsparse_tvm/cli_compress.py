"""The compress commands of `unsparse-tvm` (train, prune, quantize): their options and handlers, each
turning the parsed arguments into one typed call (cli.py has the rest and `main`)."""

from __future__ import annotations

import argparse
import dataclasses

from . import argtypes as types
from .cli_text import MODEL_INPUT_HELP, TEXTS, WEIGHTS_HELP
from .errors import UnsparseError


def command_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=TEXTS[name][0], description=TEXTS[name][1])


# ---- prune ---------------------------------------------------------------------------------------
def _add_data_args(p: argparse.ArgumentParser, epochs_help: str, lr: float, *, fine_tuning: bool = False,
                   random: bool = False) -> None:
    """--dataset, --epochs, --lr, --batch-size, --seed. fine_tuning (prune, quantize): --lr and --batch-size
    default to None (not given), and giving them without --epochs is refused rather than ignored."""
    p.add_argument("--dataset", default=None, type=types.dataset(random), help=types.DATASETS_HELP
                   + ("; random: seeded normal inputs, for --activations calibration" if random else ""))
    p.add_argument("--epochs", type=types.whole("--epochs", 0), default=0, help=epochs_help)
    p.add_argument("--lr", type=types.learning_rate, default=None if fine_tuning else lr,
                   help=f"Adam learning rate, cosine-decayed (default {lr:g}" + ("; with --epochs)" if fine_tuning else ")"))
    p.add_argument("--batch-size", type=types.positive_int("--batch-size"), default=None if fine_tuning else 64,
                   help="training mini-batch size (default 64" + ("; with --epochs)" if fine_tuning else ")"))
    p.add_argument("--seed", type=types.seed, default=0,
                   help="seed for shuffling and k-means (default 0; the train/test split is always the same)")


def _fine_tuning(args: argparse.Namespace, lr: float) -> tuple[float, int]:
    """(lr, batch size) of prune/quantize: --lr and --batch-size mean nothing without --epochs."""
    given = [o for o, v in (("--lr", args.lr), ("--batch-size", args.batch_size)) if v is not None]
    if given and not args.epochs:
        raise UnsparseError(f"{' and '.join(given)} {'are' if len(given) > 1 else 'is'} for fine-tuning: add "
                            "--epochs N (and --dataset), or leave it out for one-shot")
    return args.lr or lr, args.batch_size or 64


def _add_model_io_args(p: argparse.ArgumentParser, report: bool = True) -> None:
    p.add_argument("--weights", default=None, help=WEIGHTS_HELP)
    p.add_argument("--batch", type=types.positive_int("batch"), default=None,
                   help="batch size baked into the exported program (default 1, or the input .pt2's)")
    p.add_argument("-o", "--output", required=True, help="output .pt2 file")
    if report:
        p.add_argument("--report", default=None, help="also write the report (accuracy, per-layer sparsity, bytes) as JSON")
    p.add_argument("--force", action="store_true",
                   help="overwrite the output (and report) file if it exists" if report else "overwrite the output file if it exists")


def _compress_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    """A prune/quantize parser: its MODEL (built-in or .pt2) first."""
    p = command_parser(sub, name)
    p.add_argument("model", help=MODEL_INPUT_HELP)
    return p


def _add_prune(sub: argparse._SubParsersAction) -> None:
    p = _compress_parser(sub, "prune")
    p.add_argument("--sparsity", type=types.sparsity(), default=None,
                   help="overall fraction of conv/linear weights set to zero, in [0, 0.99] (a layer pruned "
                        "further is all but cut out of the network); or a speed target instead:")
    p.add_argument("--speedup", type=types.positive_number("--speedup"), default=None,
                   help="prune for this end-to-end speedup over the model compiled dense, on this CPU: per-layer "
                        "sparsity and pattern chosen by the compiler's cost model, verified by timing")
    p.add_argument("--latency-ms", type=types.positive_number("--latency-ms"), default=None,
                   help="prune for this latency (ms per inference on this CPU), as --speedup")
    p.add_argument("--pattern", type=types.one_of("--pattern", ("unstructured", "vector", "block", "auto")),
                   default=None, help="with --speedup/--latency-ms: unstructured (default), vector (V=4), block "
                                      "(4x4) or auto (per layer, where the cost model says it pays)")
    p.add_argument("--threads", type=types.positive_int("--threads"), default=None,
                   help="with --speedup/--latency-ms: the thread count it is timed at (default: TVM_NUM_THREADS, "
                        "else every usable core)")
    p.add_argument("--method", default="unstructured",
                   help="unstructured (default), vector (V output channels at one input position), "
                        "block (B x B tiles of the [out, in*kh*kw] matrix), mixed (vector AND block masks), "
                        "channel4 (4 input channels at one tap together: the int8 kernels' weight quads)")
    p.add_argument("--scope", default="layer", help="layer (default: each layer to the sparsity) or global "
                                                    "(one magnitude ranking over all layers; unstructured only)")
    p.add_argument("--vector-size", type=types.positive_int("--vector-size"), default=None,
                   help="V for vector/mixed: 2, 4 or 8 (default 4)")
    p.add_argument("--block-size", type=types.positive_int("--block-size"), default=None,
                   help="B for block/mixed: 2, 4, 8, 16, 32 (default 4 for block, 8 for mixed)")
    p.add_argument("--block-share", type=types.fraction("--block-share"), default=None,
                   help="mixed: part of the sparsity reached by the block mask (default 0.5)")
    p.add_argument("--first-layer-sparsity", type=types.sparsity("--first-layer-sparsity"), default=None,
                   help="sparsity of the first layer (keep it denser); the others are raised to keep the overall sparsity")
    p.add_argument("--last-layer-sparsity", type=types.sparsity("--last-layer-sparsity"), default=None,
                   help="sparsity of the last layer (the classifier); same rule")
    p.add_argument("--sensitivity", action="store_true",
                   help="per-layer sparsity from a one-shot sensitivity scan (needs --dataset) instead of uniform")
    _add_data_args(p, "fine-tuning epochs for gradual pruning (default 0: one-shot)", 3e-3, fine_tuning=True)
    _add_model_io_args(p)


def _print_result(what: str, report: dict, args: argparse.Namespace) -> int:
    """What prune/quantize did, the report table, and what they wrote."""
    from .compress.report import format_summary

    print(f"{what} ({report['seconds']:.1f} s)")
    print(format_summary(report))
    print(f"wrote {args.output}" + (f" and {args.report}" if args.report else ""))
    return 0


def _cmd_prune(args: argparse.Namespace) -> int:
    from .compress.prune import prune_command
    from .compress.config import PruneConfig

    lr, batch_size = _fine_tuning(args, 3e-3)
    speed = _speed_request(args)
    cfg = PruneConfig(
        sparsity=args.sparsity if speed is None else 0.0, method=args.method, scope=args.scope,
        vector_size=args.vector_size, block_size=args.block_size, block_share=args.block_share,
        first_layer_sparsity=args.first_layer_sparsity, last_layer_sparsity=args.last_layer_sparsity,
        sensitivity=args.sensitivity, epochs=args.epochs, lr=lr, batch_size=batch_size, seed=args.seed,
    )
    report = prune_command(args.model, cfg, args.output, dataset=args.dataset, weights=args.weights,
                           batch=args.batch, report=args.report, overwrite=args.force, speed=speed)
    if speed is not None:
        from .speed_target import format_speed

        print(format_speed(report["speed"]))
        cfg = dataclasses.replace(cfg, sparsity=report["config"]["sparsity"],
                                  layer_sparsity=report["config"]["layer_sparsity"])  # the plan's
    return _print_result(f"pruned {args.model}: {cfg.describe()}", report, args)


def _speed_request(args: argparse.Namespace) -> dict | None:
    """--speedup / --latency-ms and what goes with them, checked against the uniform-sparsity options."""
    if args.speedup is None and args.latency_ms is None:
        for flag, value in (("--pattern", args.pattern), ("--threads", args.threads)):
            if value is not None:
                raise UnsparseError(f"{flag} is for --speedup/--latency-ms (pruning for a speed target)")
        if args.sparsity is None:
            raise UnsparseError("prune needs --sparsity S, or a speed target: --speedup X or --latency-ms T")
        return None
    if args.speedup is not None and args.latency_ms is not None:
        raise UnsparseError("give one speed target: --speedup or --latency-ms")
    taken = [f for f, v in (("--sparsity", args.sparsity), ("--method", args.method != "unstructured" or None),
                            ("--scope", args.scope != "layer" or None), ("--sensitivity", args.sensitivity or None),
                            ("--first-layer-sparsity", args.first_layer_sparsity),
                            ("--last-layer-sparsity", args.last_layer_sparsity)) if v is not None]
    if taken:
        raise UnsparseError(f"{taken[0]} sets the sparsity itself; with --speedup/--latency-ms the cost model "
                            "chooses it per layer (--pattern picks the patterns)")
    return {"speedup": args.speedup, "latency_ms": args.latency_ms, "pattern": args.pattern or "unstructured",
            "threads": args.threads}


# ---- quantize ------------------------------------------------------------------------------------
def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = _compress_parser(sub, "quantize")
    p.add_argument("--activations", default=None, choices=["int8"],
                   help="also calibrate activation ranges (static, per tensor) on a few batches of --dataset "
                        "(digits, cifar10:PATH, or random: seeded normal inputs) so that `compile` runs the "
                        "convs int8 x int8 -> int32 (x86); --scheme defaults to int8 then")
    p.add_argument("--scheme", default=None,
                   help="int8 | int4 (intB, B=2..8: symmetric per output channel) | kmeansB (B=2..8, per-layer "
                        "codebook of 2^B values, e.g. kmeans4) | pow2 (+-scale*2^e, 4 bits)")
    _add_data_args(p, "fine-tuning epochs with a straight-through estimator (default 0: one-shot)", 1e-4,
                   fine_tuning=True, random=True)
    _add_model_io_args(p)


def _cmd_quantize(args: argparse.Namespace) -> int:
    from .compress.quantize import quantize_command

    if args.scheme is None and args.activations is None:
        raise UnsparseError("quantize needs --scheme (int8, int4, kmeansB, pow2) or --activations int8")
    args.scheme = args.scheme or "int8"
    lr, batch_size = _fine_tuning(args, 1e-4)
    report = quantize_command(args.model, args.scheme, args.output, dataset=args.dataset, epochs=args.epochs,
                              lr=lr, batch_size=batch_size, weights=args.weights, batch=args.batch,
                              report=args.report, overwrite=args.force, seed=args.seed, activations=args.activations)
    return _print_result(f"quantised {args.model}: {args.scheme}"
                         + (f", {args.epochs} fine-tuning epochs" if args.epochs else ""), report, args)


# ---- train ---------------------------------------------------------------------------------------
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = command_parser(sub, "train")
    p.add_argument("model", help="a built-in model (smallcnn for digits, vgg16-cifar for cifar10), "
                                 "or a .pt2 written by unsparse-tvm to continue training")
    _add_data_args(p, "training epochs", 3e-3)
    p.set_defaults(epochs=None)
    _add_model_io_args(p, report=False)


def _cmd_train(args: argparse.Namespace) -> int:
    from .compress.train import train_command

    if args.dataset is None or args.epochs is None:
        raise UnsparseError("train needs --dataset (digits or cifar10:PATH) and --epochs N")
    res = train_command(args.model, args.dataset, args.epochs, args.output, lr=args.lr, batch_size=args.batch_size,
                        seed=args.seed, weights=args.weights, batch=args.batch, overwrite=args.force)
    print(f"trained {res['model']} on {res['dataset']} for {res['epochs']} epochs: test accuracy "
          f"{res['accuracy_before']:.2f}% -> {res['accuracy_after']:.2f}%")
    print(f"wrote {args.output}")
    return 0


def add_batch(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=types.positive_int("batch"), default=None,
                   help="batch size for built-in models (default 1) and for a .pt2 exported with a dynamic batch "
                        "(a static .pt2's batch cannot change)")


COMMANDS = {  # name -> (add its parser, handle its arguments), as cli.COMMANDS
    "train": (_add_train, _cmd_train),
    "prune": (_add_prune, _cmd_prune),
    "quantize": (_add_quantize, _cmd_quantize),
}


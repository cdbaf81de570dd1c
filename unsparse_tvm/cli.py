"""`unsparse-tvm`: the command-line driver, in the habits of TVM's old `tvmc` (compile, tune, run; -o, --target).

Every command is `_add_<name>(subparsers)` + `_cmd_<name>(args)`, and each handler turns the parsed
arguments into one typed call. The handlers import their command's module when called (deliberately:
`unsparse-tvm run` must keep torch and TVM's compiler out of the process, and every command starts faster).
Errors the user can fix are `UnsparseError`s, and usage errors argparse's: printed as one line, exit
status 2, no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from . import argtypes as types
from .cli_text import MODEL_HELP, MODEL_INPUT_HELP, TEXTS, WEIGHTS_HELP
from .errors import UnsparseError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`unsparse-tvm compile: error: ...`) and exit status 2."""

    def error(self, message: str):  # noqa: D401 (argparse's API)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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


def _parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=TEXTS[name][0], description=TEXTS[name][1])


def _compress_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    """A prune/quantize parser: its MODEL (built-in or .pt2) first."""
    p = _parser(sub, name)
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
    p = _parser(sub, "train")
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


# ---- compile -------------------------------------------------------------------------------------
def _add_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="llvm", help="llvm (x86 CPU) or cuda")
    p.add_argument("--arch", default=None, help="CUDA arch for --target cuda, e.g. sm_90 (default sm_90); an error with --target llvm")
    p.add_argument("--threshold", type=types.fraction("threshold"), default=None,
                   help="run a layer sparse when its weight sparsity is at least this; default: each layer "
                        "where its sparse kernel is predicted faster than its dense one")
    p.add_argument("--no-calibrate", action="store_true",
                   help="predict with the built-in x86 rates instead of this CPU's calibration (`unsparse-tvm "
                        "calibrate`, measured on the first compile otherwise; also UNSPARSE_CALIBRATION=off)")


def _add_compile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compile", help="compile a model into one deployable .so (weights inside)")
    p.add_argument("model", help=MODEL_HELP + ", or an .onnx file (one float32 input; QDQ models run as fp32)")
    _add_target_args(p)
    _add_batch(p)
    p.add_argument("-o", "--output", required=True, help="output .so file")
    p.add_argument("--force", action="store_true", help="overwrite the output file if it exists")
    p.add_argument("--tuning-log", default=None, help="directory of tuning records to apply")


def _add_batch(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=types.positive_int("batch"), default=None,
                   help="batch size for built-in models (default 1) and for a .pt2 exported with a dynamic batch "
                        "(a static .pt2's batch cannot change)")


def _cmd_compile(args: argparse.Namespace) -> int:
    from .build import compile_file

    compile_file(args.model, args.target, args.arch, args.threshold, args.output,
                 batch=args.batch, overwrite=args.force, tuning_log=args.tuning_log, calibrate=not args.no_calibrate)
    return 0


# ---- run -----------------------------------------------------------------------------------------
def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a compiled .so with the TVM runtime only (no torch, no compiler)")
    p.add_argument("module", help="a .so written by `unsparse-tvm compile`")
    p.add_argument("--input", default=None, help="input tensor as .npy, or a .npz holding one array (default: seeded "
                                                 "random normal of the module's input shape)")
    p.add_argument("-o", "--output", default=None, help="where to write the output .npy (.npz: every output)")
    p.add_argument("--force", action="store_true", help="overwrite the output file if it exists")
    p.add_argument("--device", default=None, type=types.one_of("--device", ("cpu", "cuda")),
                   help="cpu or cuda (default: the module's target)")
    p.add_argument("--print-time", action="store_true", help="time the module (as tvmc run --print-time)")
    p.add_argument("--number", type=types.positive_int("--number"), default=None,
                   help="calls per timed repeat (default 10; with --print-time)")
    p.add_argument("--repeat", type=types.positive_int("--repeat"), default=None,
                   help="timed repeats (default 10; with --print-time)")


def _cmd_run(args: argparse.Namespace) -> int:
    from .runtime import run_file

    if not args.print_time and (args.number or args.repeat):  # refused, not ignored
        raise UnsparseError("--number and --repeat set the timing: add --print-time")
    if args.force and not args.output:
        raise UnsparseError("--force overwrites the -o file: give -o OUT.npy")
    run_file(args.module, args.input, args.output, overwrite=args.force, device=args.device,
             print_time=args.print_time, number=args.number or 10, repeat=args.repeat or 10)
    return 0


# ---- inspect -------------------------------------------------------------------------------------
def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="describe a .pt2 (layers, sparsity) or a compiled .so (target, arch, inputs)")
    p.add_argument("file")


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .inputs import check_input_file

    check_input_file(args.file, hint="inspect reads a .pt2 or a .so file")
    if args.file.endswith(".so"):
        from .runtime import describe_module

        print(describe_module(args.file))
    else:
        from .compress.report import describe_program

        print(describe_program(args.file))
    return 0


# ---- bench ---------------------------------------------------------------------------------------
def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time sparse-compiled vs TVM dense vs PyTorch eager, end to end and per layer")
    p.add_argument("model", help=MODEL_HELP)
    _add_target_args(p)
    p.add_argument("--sparsity", type=types.sparsity(), default=None,
                   help="magnitude-prune to this sparsity first, in [0, 0.99] (default: use the weights as they are)")
    _add_batch(p)
    p.add_argument("--json", default=None, help="write the results as JSON here (a .json file)")
    p.add_argument("--no-layers", action="store_true", help="skip the per-layer table")
    p.add_argument("--repeat", type=types.positive_int("--repeat"), default=20,
                   help="timed runs per measurement (median reported)")
    p.add_argument("--tuning-log", default=None, help="also time the model compiled with these tuning records")
    p.add_argument("--force", action="store_true", help="overwrite the --json file if it exists")
    p.add_argument("--threads", type=types.thread_list, default=None,
                   help="thread counts for every contender, e.g. 1,2 (one round robin each; default: all cores)")
    p.add_argument("--peers", nargs="?", const="onnxruntime,openvino,torch_compile,unsparse_torch_compile", default=None,
                   type=types.peer_list,
                   help="also time the runtimes a user would pick instead (default with the flag: onnxruntime,"
                        "openvino,torch_compile, and ours through torch.compile(backend=\"unsparse\"): "
                        "unsparse_torch_compile; needs pip install -e \".[peers]\")")


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench_command

    if args.force and not args.json:
        raise UnsparseError("--force overwrites the --json file: give --json OUT.json")
    bench_command(args.model, args.target, args.arch, sparsity=args.sparsity, threshold=args.threshold,
                  batch=args.batch, repeat=args.repeat, layers=not args.no_layers, tuning_log=args.tuning_log,
                  json_path=args.json, overwrite=args.force, threads=args.threads, peers=args.peers,
                  calibrate=not args.no_calibrate)
    return 0


# ---- tune / logs ---------------------------------------------------------------------------------
def _add_tune(sub: argparse._SubParsersAction) -> None:
    p = _parser(sub, "tune")
    p.add_argument("model", help=MODEL_HELP)
    _add_target_args(p)
    p.add_argument("--sparsity", type=types.sparsity(), default=None,
                   help="magnitude-prune to this sparsity first, in [0, 0.99] (default: use the weights as they are)")
    p.add_argument("--trials", type=types.positive_int("--trials"), required=True,
                   help="measurements in total over all workloads (one per workload for the default knobs first)")
    p.add_argument("--log-dir", required=True, help="directory of tuning records (created; appended to)")
    p.add_argument("--include-dense", action="store_true", help="also tune the dense direct conv2d layers (llvm)")
    p.add_argument("--rpc-tracker", default=None, metavar="HOST:PORT",
                   help="measure on the devices registered with this TVM RPC tracker instead of locally")
    p.add_argument("--rpc-key", default=None, help="the key the RPC servers registered with")
    _add_batch(p)
    p.add_argument("--seed", type=types.seed, default=1, help="search seed (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _cmd_tune(args: argparse.Namespace) -> int:
    from .tuning.command import TuneRequest, tune_command

    return tune_command(TuneRequest(
        args.model, args.trials, args.log_dir, target=args.target, arch=args.arch, sparsity=args.sparsity,
        threshold=args.threshold, include_dense=args.include_dense, rpc_tracker=args.rpc_tracker,
        rpc_key=args.rpc_key, batch=args.batch, seed=args.seed, progress=not args.no_progress,
        calibrate=not args.no_calibrate))


def _add_logs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("logs", help="show or merge tuning logs")
    lsub = p.add_subparsers(dest="logs_command", required=True)
    show = lsub.add_parser("show", help="per workload: op, shapes, best time, trials, target")
    show.add_argument("dir", help="a tuning log directory")
    merge = lsub.add_parser("merge", help="keep the best record per workload and target of several logs")
    merge.add_argument("dirs", nargs="+", help="tuning log directories")
    merge.add_argument("-o", "--output", required=True, help="output log directory")
    merge.add_argument("--force", action="store_true", help="overwrite an output directory that holds records")


def _cmd_logs(args: argparse.Namespace) -> int:
    from .tuning.command import logs_merge, logs_show

    if args.logs_command == "show":
        return logs_show(args.dir)
    return logs_merge(args.dirs, args.output, overwrite=args.force)


# ---- calibrate -----------------------------------------------------------------------------------
def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="measure the x86 cost model's rates on this CPU (under a minute; cached)",
                       description="Time a few single layers built by the same rules as `compile` (dense direct "
                                   "conv, ell/hyb/vell sparse rows, epilogues, an output larger than the caches, "
                                   "the linear kernels) and fit the rates that decide sparse vs dense per layer. "
                                   "Stored per CPU model, code path (UNSPARSE_MCPU) and thread count in the cache "
                                   "folder (UNSPARSE_CACHE_DIR, default ~/.cache/unsparse-tvm); `compile` uses them.")
    p.add_argument("--threads", type=types.positive_int("--threads"), default=None,
                   help="thread count to calibrate for (default: TVM_NUM_THREADS, else every usable core)")
    p.add_argument("--dry-run", action="store_true", help="measure and print, store nothing")


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from .cost.calibration import calibrate_command

    calibrate_command(threads=args.threads, no_store=args.dry_run)
    return 0


COMMANDS = {
    "train": (_add_train, _cmd_train),
    "prune": (_add_prune, _cmd_prune),
    "quantize": (_add_quantize, _cmd_quantize),
    "calibrate": (_add_calibrate, _cmd_calibrate),
    "compile": (_add_compile, _cmd_compile),
    "run": (_add_run, _cmd_run),
    "inspect": (_add_inspect, _cmd_inspect),
    "bench": (_add_bench, _cmd_bench),
    "tune": (_add_tune, _cmd_tune),
    "logs": (_add_logs, _cmd_logs),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="unsparse-tvm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # torch's and TVM's deprecation notices are for their API users, not ours: stderr stays for our errors
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    args = build_parser().parse_args(argv)
    try:
        code = COMMANDS[args.command][1](args)
        sys.stdout.flush()  # here, so that a closed pipe is met inside the try
        return code
    except UnsparseError as err:
        return _fail(args.command, str(err))
    except MemoryError:
        return _fail(args.command, "out of memory: use a smaller --batch or model")
    except RuntimeError as err:  # torch's allocator says so in a RuntimeError
        if "can't allocate memory" not in str(err) and "out of memory" not in str(err).lower():
            raise
        return _fail(args.command, "out of memory: use a smaller --batch or model")
    except BrokenPipeError:
        return _reader_gone()
    except OSError as err:  # the environment, not a bug of ours: a file vanished or a disk filled meanwhile
        return _fail(args.command, f"{err.strerror or err}" + (f": {err.filename}" if err.filename else ""))
    except KeyboardInterrupt:
        print(f"unsparse-tvm {args.command}: interrupted", file=sys.stderr)
        return 130


def _fail(command: str, message: str) -> int:
    print(f"unsparse-tvm {command}: error: {message}", file=sys.stderr)
    return 2


def _reader_gone() -> int:
    """`unsparse-tvm inspect m.so | head -1`: the reader left. Stop quietly with the status a process killed
    by SIGPIPE reports (141), as other tools do; stdout goes to /dev/null so that Python's own flush at
    exit does not fail again (the recipe of Python's signal module documentation)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (tests capture it)
        pass
    return 141


if __name__ == "__main__":
    sys.exit(main())

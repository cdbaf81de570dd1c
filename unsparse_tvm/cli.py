"""`unsparse-tvm`: the command-line driver, in the habits of TVM's old `tvmc` (compile, tune, run; -o, --target).

Every command is `_add_<name>(subparsers)` + `_cmd_<name>(args)`. Heavy imports (torch, tvm) happen inside
the handlers, so `unsparse-tvm run` can keep torch and TVM's compiler out of the process.
Errors the user can fix are `UnsparseError`s: printed as one line, exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import sys

from .errors import UnsparseError, check_fraction

MODEL_HELP = "a built-in model (smallcnn, vgg16-cifar, vgg16, resnet18, resnet50) or a .pt2 file"


def _fraction(name: str, upper_inclusive: bool = True):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number in [0, 1], got '{text}'") from None
        try:
            return check_fraction(name, value, upper_inclusive=upper_inclusive)
        except UnsparseError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


# ---- prune ---------------------------------------------------------------------------------------
def _add_prune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="magnitude-prune every conv and linear weight; save as .pt2")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--sparsity", type=_fraction("sparsity"), required=True, help="fraction of weights set to zero")
    p.add_argument("--batch", type=int, default=1, help="batch size baked into the exported program")
    p.add_argument("-o", "--output", required=True, help="output .pt2 file")
    p.add_argument("--force", action="store_true", help="overwrite the output file if it exists")


def _cmd_prune(args: argparse.Namespace) -> int:
    from .prune import layer_sparsity, prune_to_program, save_program

    if not args.output.endswith(".pt2"):
        raise UnsparseError(f"output {args.output} must end in .pt2")
    ep = prune_to_program(args.model, args.sparsity, batch=args.batch)
    save_program(ep, args.output, overwrite=args.force)
    for name, shape, sp in layer_sparsity(ep):
        print(f"  {name:40s} {str(list(shape)):22s} sparsity {sp:.3f}")
    print(f"wrote {args.output}")
    return 0


# ---- compile -------------------------------------------------------------------------------------
def _add_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="llvm", help="llvm (x86 CPU) or cuda")
    p.add_argument("--arch", default=None, help="CUDA arch, e.g. sm_90 (default sm_90); ignored for llvm")
    p.add_argument("--threshold", type=_fraction("threshold"), default=0.7,
                   help="layers whose weight sparsity is at least this run as sparse kernels (default 0.7)")


def _add_compile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compile", help="compile a model into one deployable .so (weights inside)")
    p.add_argument("model", help=MODEL_HELP)
    _add_target_args(p)
    p.add_argument("--batch", type=int, default=1, help="batch size for built-in models")
    p.add_argument("-o", "--output", required=True, help="output .so file")
    p.add_argument("--force", action="store_true", help="overwrite the output file if it exists")
    p.add_argument("--tuning-log", default=None, help="directory of tuning records to apply")


def _cmd_compile(args: argparse.Namespace) -> int:
    from .compiler import compile_file

    compile_file(args.model, args.target, args.arch, args.threshold, args.output,
                 batch=args.batch, overwrite=args.force, tuning_log=args.tuning_log)
    return 0


# ---- run -----------------------------------------------------------------------------------------
def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a compiled .so with the TVM runtime only (no torch, no compiler)")
    p.add_argument("module", help="a .so written by `unsparse-tvm compile`")
    p.add_argument("--input", required=True, help="input tensor as .npy")
    p.add_argument("-o", "--output", required=True, help="where to write the output .npy")
    p.add_argument("--force", action="store_true", help="overwrite the output file if it exists")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the module's target)")


def _cmd_run(args: argparse.Namespace) -> int:
    from .runtime import run_file

    run_file(args.module, args.input, args.output, overwrite=args.force, device=args.device)
    return 0


# ---- inspect -------------------------------------------------------------------------------------
def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="describe a .pt2 (layers, sparsity) or a compiled .so (target, arch, inputs)")
    p.add_argument("file")


def _cmd_inspect(args: argparse.Namespace) -> int:
    if args.file.endswith(".so"):
        from .runtime import describe_module

        print(describe_module(args.file))
    else:
        from .inspection import describe_program

        print(describe_program(args.file))
    return 0


# ---- bench ---------------------------------------------------------------------------------------
def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time sparse-compiled vs TVM dense vs PyTorch eager, end to end and per layer")
    p.add_argument("model", help=MODEL_HELP)
    _add_target_args(p)
    p.add_argument("--sparsity", type=_fraction("sparsity"), default=None,
                   help="magnitude-prune to this sparsity first (default: use the weights as they are)")
    p.add_argument("--batch", type=int, default=1, help="batch size for built-in models")
    p.add_argument("--json", default=None, help="write the results as JSON here")
    p.add_argument("--no-layers", action="store_true", help="skip the per-layer table")
    p.add_argument("--repeat", type=int, default=20, help="timed runs per measurement (median reported)")
    p.add_argument("--tuning-log", default=None, help="also time the model compiled with these tuning records")


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench_command

    bench_command(args)
    return 0


COMMANDS = {
    "prune": (_add_prune, _cmd_prune),
    "compile": (_add_compile, _cmd_compile),
    "run": (_add_run, _cmd_run),
    "inspect": (_add_inspect, _cmd_inspect),
    "bench": (_add_bench, _cmd_bench),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unsparse-tvm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][1](args)
    except UnsparseError as err:
        print(f"unsparse-tvm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"unsparse-tvm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

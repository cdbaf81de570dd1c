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
from .cli_compress import COMMANDS as COMPRESS_COMMANDS
from .cli_compress import add_batch, command_parser
from .cli_text import MODEL_HELP, TEXTS
from .errors import UnsparseError
from .peers import PEER_ISAS


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`unsparse-tvm compile: error: ...`) and exit status 2."""

    def error(self, message: str):  # noqa: D401 (argparse's API)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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
    add_batch(p)
    p.add_argument("-o", "--output", required=True, help="output .so file")
    p.add_argument("--force", action="store_true", help="overwrite the output file if it exists")
    p.add_argument("--tuning-log", default=None, help="directory of tuning records to apply")


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
    add_batch(p)
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
                        "unsparse_torch_compile, timed beside unsparse_api, the same model through "
                        "unsparse_tvm.compile; needs pip install -e \".[peers]\")")
    p.add_argument("--peer-isa", choices=PEER_ISAS, default="auto",
                   help="auto (default): where our code is AVX2 on an AVX-512 CPU (UNSPARSE_MCPU=haswell), hold the "
                        "peers to AVX2 too (OpenVINO and PyTorch's convs by ONEDNN_MAX_CPU_ISA, ONNX Runtime and "
                        "DeepSparse by a CPUID without AVX-512 where Linux offers CPUID faulting); native: never; "
                        "avx2: always")


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench_command

    if args.force and not args.json:
        raise UnsparseError("--force overwrites the --json file: give --json OUT.json")
    bench_command(args.model, args.target, args.arch, sparsity=args.sparsity, threshold=args.threshold,
                  batch=args.batch, repeat=args.repeat, layers=not args.no_layers, tuning_log=args.tuning_log,
                  json_path=args.json, overwrite=args.force, threads=args.threads, peers=args.peers,
                  calibrate=not args.no_calibrate, peer_isa=args.peer_isa)
    return 0


# ---- tune / logs ---------------------------------------------------------------------------------
def _add_tune(sub: argparse._SubParsersAction) -> None:
    p = command_parser(sub, "tune")
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
    add_batch(p)
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
    **COMPRESS_COMMANDS,
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

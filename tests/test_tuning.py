"""Tuning (unsparse_tvm.tuning): task extraction, a tiny MetaSchedule tune of smallcnn with the real
index arrays, resume, interruption, applying records at compile time (and never another target's),
corrupt logs, and the errors users see."""

from __future__ import annotations

import atexit
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from conftest import assert_one_line_error, pruned_program, sparse_weight
from unsparse_tvm.errors import UnsparseError
from unsparse_tvm.schedules.row_extents import trim_row_loops
from unsparse_tvm.schedules.small_loops import serial_small_loops
from unsparse_tvm.tuning.log import RECORD_FILE, read_log
from unsparse_tvm.tuning.search import SearchOptions
from unsparse_tvm.tuning.state import trace_key

QUIET = SearchOptions(progress=False)  # no progress lines in test output


def as_pipeline_leaves(func):
    """A scheduled kernel as the pipeline leaves it: row loops at their rows' lengths, small parallel loops serial."""
    return serial_small_loops(trim_row_loops(func))


TINY_TRIALS = 4


@functools.lru_cache(maxsize=None)
def tiny_log() -> str:
    """One tiny tune of smallcnn per test session (shared with test_logs.py); copy before changing it."""
    from unsparse_tvm.target import make_target
    from unsparse_tvm.tuning import tune

    folder = tempfile.mkdtemp(prefix="unsparse-tiny-log-")
    atexit.register(shutil.rmtree, folder, True)  # the session's; tests copy it into their own tmp_path
    path = os.path.join(folder, "log")
    res = tune(pruned_program("smallcnn"), make_target("llvm"), path, TINY_TRIALS, options=QUIET)
    assert res.new_trials == TINY_TRIALS and not res.interrupted
    return path


def copy_log(tmp_path, name="log") -> str:
    dst = str(tmp_path / name)
    shutil.copytree(tiny_log(), dst)
    return dst


def record_lines(path: str) -> list[str]:
    with open(os.path.join(path, RECORD_FILE)) as f:
        return [line for line in f.read().split("\n") if line.strip()]


def test_extract_tasks_dedupes_and_keeps_real_arrays(llvm):
    from unsparse_tvm.tuning import extract_tasks

    tasks = extract_tasks(pruned_program("smallcnn"), llvm)
    assert [t.op for t in tasks].count("sparse_conv2d") == 3 and [t.op for t in tasks].count("sparse_dense") == 2
    assert len({t.shash for t in tasks}) == len(tasks)
    for t in tasks:
        params = t.mod["main"].params
        assert len(t.args) == len(params) and t.calls == 1 and t.flops > 0
        ints = [a for a in t.args if a is not None and np.issubdtype(a.dtype, np.integer)]  # uint16 where they fit
        assert ints, "the index arrays of the call site travel with the task"
        assert all(a.min() >= 0 for a in ints if a.ndim == 2)  # offsets (hyb's slot uses -1 for "none")
        assert t.args[0] is None and t.args[-1] is None  # activation and output: not constants
    assert tasks == sorted(tasks, key=lambda t: -t.weight)


def test_tiny_tune_writes_records_for_this_target(llvm):
    from unsparse_tvm.tuning.log import target_identity

    log = read_log(tiny_log())
    assert log.corrupt == 0 and len(log.records) == TINY_TRIALS
    assert len(log.workloads) == 5  # every task's workload is registered, even without a trial yet
    for r in log.records:
        assert r.ok and 0 < r.seconds < 0.1, "measured with the real index arrays: no failed candidates"
        assert r.identity == target_identity(llvm)
    # the first trial of each task is the default knobs (a trace without sampled decisions)
    assert sum(1 for r in log.records if not r.trace[1]) == TINY_TRIALS


def test_resume_counts_existing_records(tmp_path, llvm):
    from unsparse_tvm.tuning import tune

    path = copy_log(tmp_path)
    again = tune(pruned_program("smallcnn"), llvm, path, TINY_TRIALS, options=QUIET)
    assert again.new_trials == 0 and len(record_lines(path)) == TINY_TRIALS
    more = tune(pruned_program("smallcnn"), llvm, path, TINY_TRIALS + 3, options=QUIET)
    assert more.new_trials == 3
    log = read_log(path)
    assert len(log.records) == TINY_TRIALS + 3 and log.corrupt == 0
    keys = [(r.workload, trace_key(r.trace)) for r in log.records]
    assert len(set(keys)) == len(keys), "a resumed run never measures a point twice"


def test_interrupt_keeps_finished_batches(tmp_path, llvm, monkeypatch):
    from unsparse_tvm import tuning

    calls = {"n": 0}
    real_run = tuning.Runner.run

    def run_then_interrupt(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(tuning.Runner, "run", run_then_interrupt)
    path = str(tmp_path / "log")
    res = tuning.tune(pruned_program("smallcnn"), llvm, path, 6, options=QUIET)
    assert res.interrupted
    assert len(record_lines(path)) == 2  # the two batches measured before Ctrl-C
    monkeypatch.setattr(tuning.Runner, "run", real_run)
    res = tuning.tune(pruned_program("smallcnn"), llvm, path, 6, options=QUIET)
    assert not res.interrupted and res.new_trials == 4 and len(record_lines(path)) == 6


@pytest.mark.slow
def test_kill_keeps_records_and_resumes(tmp_path):
    """`kill` (SIGTERM) of the CLI mid-run: exit 130, every appended line intact, the rerun resumes."""
    path = str(tmp_path / "log")
    # smallcnn's 5 default-knob trials and 2 of the search: SIGTERM follows the first record, so the rerun still
    # has defaults and search points to measure (a larger budget only made both runs longer)
    trials = 7
    cmd = [sys.executable, "-m", "unsparse_tvm.cli", "tune", "smallcnn", "--sparsity", "0.9", "--trials", str(trials),
           "--log-dir", path, "--no-progress"]
    sys_tmp = tmp_path / "tmp"  # the run's system temp folder: whatever it puts there must go with it
    sys_tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(sys_tmp)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 300  # a loaded 2-core CI machine: the first batch can take minutes
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(os.path.join(path, RECORD_FILE)) and record_lines(path):
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "resume" in err
    assert _ours(sys_tmp) == [], "a killed tune left its candidates behind"
    done = len(record_lines(path))
    assert 1 <= done < trials and read_log(path).corrupt == 0
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert rerun.returncode == 0, rerun.stderr
    assert _ours(sys_tmp) == []
    # the rerun measures what the budget has left (trials - done), less what a task whose design space runs dry
    # leaves unspent: how the budget splits follows the measured default times, so that is not a constant
    new = int(re.search(r"(\d+) new trials", rerun.stdout).group(1))
    log = read_log(path)
    assert 1 <= new <= trials - done and len(record_lines(path)) == done + new and log.corrupt == 0
    # a point as the search knows it (state.trace_key: instructions and decisions): two design spaces (k_inner 1
    # and 2) can take the same decisions on different loops, which a key of the decisions alone took for one point
    keys = [(r.workload, trace_key(r.trace)) for r in log.records]
    assert len(set(keys)) == len(keys), "the rerun measured no point the killed run had measured"


def _ours(folder) -> list[str]:
    """What a run left in its temp folder, less PyTorch's compile cache (kept across runs by design)."""
    return [f for f in os.listdir(folder) if not f.startswith("torchinductor_")]


def _distinct_record_log(tmp_path, llvm, target=None):
    """A log with one record for smallcnn's biggest conv: a design-space point unlike the default
    (k_inner 16, unroll 1), claimed fast so that it is the best record."""
    from tvm import s_tir

    from unsparse_tvm.schedules import rule_for
    from unsparse_tvm.tuning import extract_tasks, write_record

    # the workload as tuning on `target` extracts it (the rows' storage tile follows the target's lanes)
    task = next(t for t in extract_tasks(pruned_program("smallcnn"), target or llvm) if t.op == "sparse_conv2d")
    spaces = rule_for(task.op, "llvm").space(s_tir.Schedule(task.mod))
    trace = spaces[-1].trace  # vec 8, k_inner 16: the last design space
    path = str(tmp_path / "distinct")
    write_record(path, task.mod, trace, [1e-7], target or llvm)
    sch = s_tir.Schedule(task.mod)
    trace.apply_to_schedule(sch, remove_postproc=False)
    return path, task, as_pipeline_leaves(sch.mod["main"])


def _scheduled(ep, target, database):
    from unsparse_tvm.frontend import import_program
    from unsparse_tvm.relay_passes import build_pipeline

    mod, names = import_program(ep)
    return build_pipeline(target, names=names, database=database, stop_after="schedule")(mod)


def test_record_is_applied_at_compile_time(tmp_path, llvm):
    """The scheduled PrimFunc in the compiled module is exactly the record's schedule, not the default:
    MetaScheduleApplyDatabase matches our functions (structural hash with attrs, tirx.noalias)."""
    import tvm_ffi

    from unsparse_tvm.schedules import rule_for
    from unsparse_tvm.tuning import open_database

    path, task, expected = _distinct_record_log(tmp_path, llvm)
    default = as_pipeline_leaves(rule_for(task.op, "llvm").apply(task.mod["main"], llvm).mod["main"])
    assert not tvm_ffi.structural_equal(expected.body, default.body, map_free_vars=True)
    db = open_database(path, llvm)
    mod = _scheduled(pruned_program("smallcnn"), llvm, db)
    got = mod[task.name]
    assert tvm_ffi.structural_equal(got.body, expected.body, map_free_vars=True)
    assert db.stats["kernels_applied"] == 1 and db.stats["layers_applied"] == 1 and db.stats["layers"] == 5
    assert "1 of 5" in db.summary()


def test_record_of_another_target_is_never_applied(tmp_path, llvm, capsys):
    import tvm_ffi

    from unsparse_tvm.schedules import rule_for
    from unsparse_tvm.target import llvm_target_dict
    from unsparse_tvm.tuning import open_database

    from unsparse_tvm.tuning.log import isa_family, target_identity

    # a CPU model of the other vector ISA (same-ISA records are a starting point: the next test)
    other_cpu = "haswell" if isa_family(target_identity(llvm)) == "avx512" else "skylake-avx512"
    other = __import__("tvm").target.Target(llvm_target_dict(other_cpu))
    path, task, expected = _distinct_record_log(tmp_path, llvm, target=other)
    db = open_database(path, llvm)
    err = capsys.readouterr().err
    assert "skipped 1 record of another target" in err and err.count("\n") == 1
    mod = _scheduled(pruned_program("smallcnn"), llvm, db)
    from unsparse_tvm.tuning import extract_tasks

    # this target's own workload of the layer (its rows' storage tile follows the target's lanes)
    own = next(t for t in extract_tasks(pruned_program("smallcnn"), llvm) if t.name == task.name)
    default = as_pipeline_leaves(rule_for(task.op, "llvm").apply(own.mod["main"], llvm).mod["main"])
    assert tvm_ffi.structural_equal(mod[task.name].body, default.body, map_free_vars=True)
    assert db.stats["kernels_applied"] == 0
    # ... while the same log does apply to the target it was recorded for
    db_other = open_database(path, other)
    assert len(db_other) == 1


def test_records_of_another_cpu_model_with_the_same_vector_isa_are_a_starting_point(tmp_path, llvm, capsys):
    """A committed per-ISA log (tuning_logs/x86-avx2, tuned on one AVX2 model) applies on another AVX2 CPU
    where that CPU has no records of its own, and the summary says whose records they are; a record of
    the CPU's own model for the same workload wins over it."""
    import tvm
    import tvm_ffi

    from unsparse_tvm.target import llvm_target_dict
    from unsparse_tvm.tuning import open_database

    tuned_on, compiled_for = (tvm.target.Target(llvm_target_dict(m)) for m in ("haswell", "znver2"))
    path, task, expected = _distinct_record_log(tmp_path, llvm, target=tuned_on)
    db = open_database(path, compiled_for)
    assert capsys.readouterr().err == ""
    mod = _scheduled(pruned_program("smallcnn"), compiled_for, db)
    assert tvm_ffi.structural_equal(mod[task.name].body, expected.body, map_free_vars=True)
    assert "records of haswell, the same vector ISA" in db.summary()
    from tvm import s_tir

    from unsparse_tvm.schedules import rule_for
    from unsparse_tvm.tuning.database import write_record

    own = rule_for(task.op, "llvm").space(s_tir.Schedule(task.mod))[0].trace  # znver2's own, slower record
    write_record(path, task.mod, own, [1e-3], compiled_for)
    db = open_database(path, compiled_for)
    assert db.borrowed == [] and "skipped 1 record of another target" in capsys.readouterr().err


def test_tuned_model_runs_and_matches_untuned(llvm):
    import tvm
    from tvm import relax

    from unsparse_tvm.build import compile_program
    from unsparse_tvm.frontend import program_input_shape
    from unsparse_tvm.models import example_input
    from unsparse_tvm.tuning import open_database

    ep = pruned_program("smallcnn")
    db = open_database(tiny_log(), llvm)
    tuned = compile_program(ep, llvm, database=db)
    assert db.stats["kernels_applied"] == TINY_TRIALS  # one record per tuned task
    plain = compile_program(ep, llvm)
    x = example_input(program_input_shape(ep)).numpy()
    outs = []
    for c in (tuned, plain):
        out = relax.VirtualMachine(c.executable, tvm.cpu())["main"](tvm.runtime.tensor(x))
        outs.append((out if hasattr(out, "numpy") else out[0]).numpy())
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_compile_cli_reports_layers_from_log(tmp_path, capsys):
    from unsparse_tvm.cli import main

    out = str(tmp_path / "m.so")
    pt2 = str(tmp_path / "smallcnn.pt2")
    from unsparse_tvm.frontend import save_program

    save_program(pruned_program("smallcnn"), pt2)
    assert main(["compile", pt2, "-o", out, "--tuning-log", tiny_log()]) == 0
    text = capsys.readouterr().out
    assert f"{TINY_TRIALS} of 5 tunable layers" in text and os.path.exists(out)


def test_corrupt_and_truncated_lines_are_skipped(tmp_path, llvm, capsys):
    from unsparse_tvm.tuning import open_database, tune

    path = copy_log(tmp_path)
    idx, (trace, _, target, args_info) = json.loads(record_lines(path)[0])
    damaged = json.loads(json.dumps(trace).replace('"conv"', '"no_such_block"'))
    with open(os.path.join(path, RECORD_FILE), "a") as f:
        f.write("this is not json\n")
        f.write(json.dumps([idx, [damaged, [1e-9], target, args_info]]) + "\n")  # parses, claims to be best
        f.write(json.dumps([99, [trace, [1e-9], target, args_info]]) + "\n")      # no such workload
        f.write('[1, [[[["GetSBl')  # torn last line: a killed writer
    db = open_database(path, llvm)
    err = capsys.readouterr().err
    assert "skipped 4 unreadable lines (corrupt or truncated)" in err and err.count("\n") == 1, err
    assert len(db) == TINY_TRIALS  # every good record is there; the damaged one is not applied
    # tuning on top of it appends on a fresh line: the torn line does not swallow the next record
    res = tune(pruned_program("smallcnn"), llvm, path, TINY_TRIALS + 1, options=QUIET)
    assert res.new_trials == 1 and res.corrupt == 4
    log = read_log(path)
    assert len(log.records) == TINY_TRIALS + 2 and log.corrupt == 3  # parse-level: 3 (the damaged one parses)


def test_errors_are_one_clear_line(tmp_path, capsys):
    from unsparse_tvm.tuning import open_database

    with pytest.raises(UnsparseError, match="does not exist"):
        open_database(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnsparseError, match="holds no tuning records"):
        open_database(str(tmp_path / "empty"))
    (tmp_path / "afile").write_text("x")
    cases = [
        ["tune", "smallcnn", "--trials", "2", "--log-dir", str(tmp_path / "afile")],            # not a directory
        ["tune", "smallcnn", "--trials", "2", "--log-dir", "/proc/unsparse-cannot-write"],       # unwritable
        ["tune", "smallcnn", "--trials", "0", "--log-dir", str(tmp_path / "l")],                 # no budget
        ["tune", "smallcnn", "--trials", "2", "--log-dir", str(tmp_path / "l"),
         "--rpc-tracker", f"127.0.0.1:{_closed_port()}", "--rpc-key", "k"],                      # unreachable tracker
        ["tune", "smallcnn", "--trials", "2", "--log-dir", str(tmp_path / "l"), "--rpc-tracker", "nohostport",
         "--rpc-key", "k"],
        ["tune", "smallcnn", "--trials", "2", "--log-dir", str(tmp_path / "l"), "--rpc-key", "k"],
        ["compile", "smallcnn", "-o", str(tmp_path / "m.so"), "--tuning-log", str(tmp_path / "missing")],
        ["compile", "smallcnn", "-o", str(tmp_path / "m.so"), "--tuning-log", str(tmp_path / "empty")],
    ]
    for argv in cases:
        assert_one_line_error(argv, capsys)


def test_tune_without_sparse_layers_says_so(tmp_path, capsys):
    assert_one_line_error(["tune", "smallcnn", "--trials", "2", "--log-dir", tmp_path / "l", "--no-progress"], capsys,
                          "no layer to tune")


def test_cuda_tuning_builds_candidates_but_needs_a_gpu_to_measure(tmp_path, cuda):
    """No GPU here: `tune --target cuda` stops with a clear message; the candidates of the CUDA design
    spaces do build (what a GPU or an RPC server would then time)."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from unsparse_tvm.tuning import Builder, extract_tasks, tune
    from unsparse_tvm.tuning.search import _make_context

    if not tvm.cuda(0).exist:
        with pytest.raises(UnsparseError, match="GPU"):
            tune(pruned_program("smallcnn"), cuda, str(tmp_path / "l"), 2, options=QUIET)
    builder = Builder(2)
    try:
        for task in extract_tasks(pruned_program("smallcnn"), cuda)[:2]:
            ctx = _make_context(task, cuda, 1, 2, 16)
            ctx.pre_tuning(max_trials=2, num_trials_per_iter=2, design_spaces=ctx.generate_design_space(),
                           database=ms.database.MemoryDatabase(), cost_model=ms.cost_model.RandomModel())
            cands = ctx.generate_measure_candidates()
            built = builder.build([c.sch.mod for c in cands], cuda)
            assert cands and all(path for path, _ in built), built
    finally:
        builder.close()


def test_trials_follow_weights():
    from unsparse_tvm.tuning import Task, TaskState, allocate

    def state(name, calls, flops, default=None):
        s = TaskState(Task(name, "sparse_conv2d", None, [], calls, flops, name))
        if default is not None:
            s.measured["default"] = default
        return s

    states = [state("a", 1, 1e6), state("b", 1, 1e8), state("c", 3, 1e8)]
    allocate(states, 2)  # fewer trials than tasks: the heaviest get the default-knob trial
    assert [s.budget for s in states] == [0, 1, 1]
    allocate(states, 30)
    assert sum(s.budget for s in states) == 30
    assert states[2].budget > states[1].budget > states[0].budget >= 3
    for s, t in zip(states, (1e-3, 1e-3, 1e-4)):  # measured default times take over from FLOPs
        s.measured["default"] = t
    allocate(states, 30)
    assert states[0].budget == states[1].budget > states[2].budget


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mcpu", [None, "haswell"], ids=["native", "avx2"])
def test_every_sparse_workload_of_vgg16_cifar_has_a_design_space(mcpu):
    """MetaSchedule refuses a task without design spaces (EvolutionarySearch: "design_spaces.empty()"): every
    sparse kernel of vgg16-cifar, whose 2x2 maps run 4-lane vectors (patches), must have one per target."""
    from tvm import s_tir

    from conftest import cpu_target
    from unsparse_tvm.schedules import rule_for
    from unsparse_tvm.tuning import extract_tasks

    target = cpu_target(mcpu)
    tasks = extract_tasks(pruned_program("vgg16-cifar"), target, threshold=0.0)
    assert len(tasks) >= 13
    empty = [t.name for t in tasks if not rule_for(t.op, "llvm").space(s_tir.Schedule(t.mod))]
    assert not empty


@pytest.mark.parametrize("sparsity", [0.9, None], ids=["sparse", "dense"])
def test_every_point_of_the_design_spaces_replays(llvm, sparsity):
    """The search mutates decisions and replays traces: every combination of every design space's
    categorical knobs must replay (structure that changes with a knob breaks the evolutionary search)."""
    import itertools

    from tvm import s_tir

    from unsparse_tvm.schedules import rule_for
    from unsparse_tvm.compress.prune import load_model_program
    from unsparse_tvm.tuning import extract_tasks

    ep = pruned_program("smallcnn") if sparsity else load_model_program("smallcnn", None)
    tasks = extract_tasks(ep, llvm, include_dense=True)
    assert tasks
    for task in tasks:
        rule = rule_for(task.op, "llvm")
        sch = s_tir.Schedule(task.mod)
        spaces = rule.space(sch) or [sch]
        for space in spaces:
            trace = space.trace
            knobs = [i for i in trace.insts if i.kind.name == "SampleCategorical"]
            for combo in itertools.product(*[range(len(i.attrs[0])) for i in knobs]):
                t = trace
                for inst, d in zip(knobs, combo):
                    t = t.with_decision(inst, d, remove_postproc=True)
                t.apply_to_schedule(s_tir.Schedule(task.mod), remove_postproc=True)


@pytest.mark.slow
@pytest.mark.parametrize("log", ["x86-avx512", "x86-avx2", "x86-znver3"])
def test_committed_log_matches_the_model_it_was_tuned_for(log, llvm):
    """tuning_logs/LOG (see tuning_logs/README.md) must still cover every sparse workload of
    vgg16-cifar at 0.9: a change to the operators or passes changes the workloads, and the log then needs
    the tune command of the README again. Checked for the CPU the log was tuned on (compiling for it
    needs no such CPU), so that the check runs on every machine, not only on that CPU model."""
    import tvm

    from unsparse_tvm.tuning.log import read_log
    from unsparse_tvm.tuning import extract_tasks, open_database

    path = os.path.join(os.path.dirname(__file__), "..", "tuning_logs", log)
    identities = {r.identity for r in read_log(path).records}
    assert len(identities) == 1, identities
    kind, triple, mcpu, mattr = next(iter(identities))
    assert kind == "llvm" and mcpu
    target = tvm.target.Target({"kind": "llvm", "mtriple": triple, "mcpu": mcpu,
                                **({"mattr": mattr.split(",")} if mattr else {})})
    db = open_database(path, target, quiet=True)
    tasks = extract_tasks(pruned_program("vgg16-cifar"), target)
    missing = [t.name for t in tasks if not db.has_workload(t.mod)]
    assert not missing, f"re-tune tuning_logs/{log} (command in tuning_logs/README.md): no record for {missing}"


def test_a_large_input_gets_design_spaces_in_both_loop_orders(llvm):
    """Where the input outgrows L2 (a 256-channel 1x1 on 56x56: 3.2 MB), the tuner may choose the loop
    order too (spatial_outer): twice the design spaces of the same layer on 16x16, each replaying. (16x16, not
    14x14: 196 positions pad to 200 for AVX2's 8 lanes, which drops the 16-lane spaces there and not at 56x56.)"""
    from tvm import s_tir

    from unsparse_tvm.relay_passes import build_pipeline
    from unsparse_tvm.schedules import sparse_conv2d_cpu
    from unsparse_tvm.single_layer import LayerSpec, layer_module

    weight = sparse_weight((64, 256, 1, 1), 0.9, np.random.default_rng(4))
    counts = []
    for size in (56, 16):
        spec = LayerSpec("conv2d", (1, 256, size, size), weight, None, True,
                         {"strides": [1, 1], "padding": [0] * 4, "dilation": [1, 1], "groups": 1})
        func = build_pipeline(llvm, threshold=0.5, fmt="ell", stop_after="legalize")(layer_module(spec))["sparse_conv2d"]
        spaces = sparse_conv2d_cpu.space(s_tir.Schedule(func))
        for space in spaces:
            space.trace.apply_to_schedule(s_tir.Schedule(func), remove_postproc=True)
        counts.append(len(spaces))
    assert counts[0] == 2 * counts[1] > 0


def test_committed_gpu_log_replays_on_its_workloads():
    """tuning_logs/h200-sm_90 (benchmarks/gpu_tuning_log.py, from the H200 kit's knob grid): every record
    is for cuda sm_90, claims a measured time, and its trace replays on its stored workload (the log is
    intact). Whether today's operators still produce those workloads is what `compile --tuning-log` reports
    (vgg16 pruned to 0.9: 11 of 15 kernels on 2026-12-04); extracting vgg16's workloads here would cost
    a minute of the suite."""
    from unsparse_tvm.tuning.database import replay
    from unsparse_tvm.tuning.log import read_log

    path = os.path.join(os.path.dirname(__file__), "..", "tuning_logs", "h200-sm_90")
    log = read_log(path)
    assert log.corrupt == 0 and len(log.records) >= 100
    assert {r.identity for r in log.records} == {("cuda", "sm_90")}
    assert all(r.run_secs and 0 < min(r.run_secs) < 1e-2 for r in log.records)
    mods = {}
    for r in log.records[::7]:  # a sample: each replay parses the workload's module
        mod = mods.setdefault(r.workload, log.workloads[r.workload].module())
        assert replay(r, mod) is not None, f"record of workload {r.workload} no longer replays"


def test_tasks_of_silu_epilogues_are_extracted(llvm):
    """A conv whose epilogue is the fast SiLU (efficientnet's blocks) binds its terms with Let, for which TVM's
    FLOP estimate has no rule: `tune` failed with a traceback; its weight now comes from the nonzero weights."""
    import torch
    import torch.nn as nn

    from unsparse_tvm.models import export_program
    from unsparse_tvm.tuning import extract_tasks

    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 16, 1), nn.SiLU()).eval()
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Conv2d):
                m.weight[torch.rand_like(m.weight) < 0.9] = 0
    tasks = extract_tasks(export_program(model, (1, 8, 16, 16)), llvm, threshold=0.5)
    assert len(tasks) == 2 and all(t.flops > 0 for t in tasks)
    nonzeros = int((model[0].weight != 0).sum())
    first = next(t for t in tasks if int(t.mod["main"].params[-1].shape[1]) == 32)
    assert first.flops == 2 * nonzeros * 16 * 16  # multiply-adds of the nonzeros at every output position

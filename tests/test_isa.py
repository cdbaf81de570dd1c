"""Right on every x86 CPU: no test, and no command, runs code for extensions this CPU lacks; the host's
features come from CPUID (numpy's probe), so an emulated CPU is seen as what it emulates."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from unsparse_tvm import hostcpu
from unsparse_tvm.errors import UnsparseError

HASWELL = frozenset({"sse4.1", "sse4.2", "avx", "avx2", "fma", "f16c"})  # an AVX2-only CPU


@pytest.fixture
def avx2_host(monkeypatch):
    """This process believes it runs on an AVX2-only CPU."""
    monkeypatch.setattr(hostcpu, "host_features", lambda: HASWELL)


def _tiny_executable(mcpu):
    import tvm
    from tvm import te

    from unsparse_tvm.target import llvm_target_dict

    a = te.placeholder((64,), name="a")
    b = te.compute((64,), lambda i: a[i] * 2.0, name="b")
    target = tvm.target.Target(llvm_target_dict(mcpu))
    return tvm.compile(tvm.IRModule({"main": te.create_prim_func([a, b])}), target=target), target


def test_host_features_follow_cpuid_where_cpuinfo_disagrees(monkeypatch):
    """Under `qemu-x86_64 -cpu Haswell`, /proc/cpuinfo still lists the real CPU's AVX-512; CPUID does not.
    Features numpy does not probe (avxvnni) are then not taken from /proc/cpuinfo either."""
    cpuid = {"SSE41": True, "SSE42": True, "AVX": True, "AVX2": True, "FMA3": True, "F16C": True,
             "AVX512F": False, "AVX512BW": False, "AVX512VNNI": False}
    real = {"sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni"}
    monkeypatch.setattr(hostcpu, "_numpy_cpu_features", lambda: cpuid)
    monkeypatch.setattr(hostcpu, "cpuinfo_flags", lambda: real)
    hostcpu.host_features.cache_clear()
    try:
        assert hostcpu.host_features() == HASWELL
        monkeypatch.setattr(hostcpu, "cpuinfo_flags", lambda: real - {"avx512f", "avx512bw", "avx512_vnni"})
        hostcpu.host_features.cache_clear()  # cpuinfo and CPUID agree: the unprobed avxvnni counts
        assert hostcpu.host_features() == HASWELL | {"avxvnni"}
    finally:
        hostcpu.host_features.cache_clear()


def test_host_features_match_this_machine():
    """On the machine itself: every feature numpy's CPUID probe reports is in the set, and nothing else is."""
    probed = hostcpu._numpy_cpu_features()
    for llvm, (np_name, _) in hostcpu.ISA_FEATURES.items():
        if np_name in probed:
            assert (llvm in hostcpu.host_features()) == bool(probed[np_name]), llvm


def test_the_guard_stops_a_test_running_foreign_code(avx2_host):
    """The session's ISAGuard (conftest) fails a test that runs AVX-512 code on an AVX2 CPU, by name."""
    from tvm import relax

    from unsparse_tvm.testing.isa import ForeignISAError

    ex, _ = _tiny_executable("skylake-avx512")
    with pytest.raises(ForeignISAError, match="avx512f"):
        ex(np.zeros(64, np.float32), np.zeros(64, np.float32))
    with pytest.raises(ForeignISAError, match="code for skylake-avx512 needs .*avx512f"):
        relax.VirtualMachine(ex, __import__("tvm").cpu())
    ex_avx2, _ = _tiny_executable("haswell")  # AVX2 code passes the guard (and runs on any CPU we support)
    import tvm

    a, b = tvm.runtime.tensor(np.arange(64, dtype=np.float32)), tvm.runtime.tensor(np.zeros(64, np.float32))
    ex_avx2(a, b)
    assert (b.numpy() == 2 * np.arange(64)).all()


def test_skip_reason_names_the_missing_features(avx2_host):
    from unsparse_tvm.testing.isa import skip_unless_runs_here

    _, target = _tiny_executable("cascadelake")
    with pytest.raises(pytest.skip.Exception, match=r"avx512.*avx512vnni.*this CPU lacks them"):
        skip_unless_runs_here(target)


def test_every_build_and_run_helper_asks_first(avx2_host):
    """The suite's build-and-run helpers (conftest.run_layer, the int8 and quantised-kernel helpers) skip on
    a CPU that lacks the target's extensions, before running anything."""
    import tvm

    from conftest import run_layer
    from test_int8 import MCPUS
    from test_quant_kernels import conv_spec, run_quant
    from unsparse_tvm.target import llvm_target_dict

    assert "cascadelake" in MCPUS and "skylake-avx512" in MCPUS  # the other ISAs stay compiled and checked
    target = tvm.target.Target(llvm_target_dict("skylake-avx512"))
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    x = rng.standard_normal((1, 4, 6, 6)).astype(np.float32)
    spec = conv_spec(x.shape, w, None, False, (1, 1), (1, 1, 1, 1))
    for helper in (lambda: run_layer(spec, target, x=x), lambda: run_quant(spec, target, None, None, x)):
        with pytest.raises(pytest.skip.Exception, match="avx512f"):
            helper()


def test_host_target_switches_off_what_this_cpu_lacks(avx2_host, monkeypatch):
    """A VM that reports a Skylake-SP model but hides AVX-512: the host target keeps the model's tuning and
    turns the missing extensions off, so its code runs here."""
    from unsparse_tvm import target as tgt

    monkeypatch.delenv(tgt.MCPU_ENV, raising=False)
    monkeypatch.setattr(tgt, "host_cpu", lambda: "skylake-avx512")
    d = tgt.llvm_target_dict()
    assert d["mcpu"] == "skylake-avx512" and "-avx512f" in d["mattr"] and "-avx512vnni" not in d["mattr"]
    import tvm

    assert tgt.runnable_here(tvm.target.Target(d)) is None
    assert "mattr" not in tgt.llvm_target_dict("skylake-avx512")  # a named CPU model is built as named


def test_bench_and_tune_refuse_a_cpu_model_this_machine_lacks(avx2_host, monkeypatch, tmp_path):
    from unsparse_tvm.bench import bench
    from unsparse_tvm.tuning.command import TuneRequest, tune_command

    monkeypatch.setenv("UNSPARSE_MCPU", "skylake-avx512")
    with pytest.raises(UnsparseError, match="bench runs the code it builds here, but code for skylake-avx512 needs"):
        bench("smallcnn")
    with pytest.raises(UnsparseError, match="tune runs the code it builds here"):
        tune_command(TuneRequest("smallcnn", 4, str(tmp_path / "log")))
    assert not (tmp_path / "log").exists()


QEMU = shutil.which("qemu-x86_64")


@pytest.mark.slow
@pytest.mark.skipif(QEMU is None, reason="qemu-x86_64 not installed (Debian: apt-get install qemu-user)")
def test_kernel_tests_pass_on_an_emulated_avx2_cpu():
    """The int8 kernels' tests under `qemu-x86_64 -cpu Haswell` (an AVX2-only CPU, no AVX-512): a pytest
    summary with every AVX-512 path compiled and checked, skipped with its reason, and the rest passing;
    no SIGILL. (Emulation is slow: a few cases, not the whole suite.)"""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [QEMU, "-cpu", "Haswell", sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
           os.path.join(os.path.dirname(__file__), "test_int8.py"), "-k", "integer_arithmetic and 3x8x8x4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "2 passed, 2 skipped" in out, out[-3000:]  # host (haswell here) and haswell; the AVX-512 two skip
    assert "code for cascadelake needs" in out and "code for skylake-avx512 needs" in out


@pytest.mark.slow
@pytest.mark.skipif(QEMU is None, reason="qemu-x86_64 not installed (Debian: apt-get install qemu-user)")
def test_run_refuses_avx512_module_on_an_emulated_avx2_cpu(tmp_path, monkeypatch):
    """The real thing: `run` of an AVX-512 .so in a process whose CPU is a Haswell (qemu) exits 2 with one
    line, where it died of SIGILL before; the same file built for haswell runs there."""
    from conftest import assert_proc_one_line_error, cli_here

    for mcpu in ("skylake-avx512", "haswell"):
        monkeypatch.setenv("UNSPARSE_MCPU", mcpu)
        cli_here("compile", "smallcnn", "-o", tmp_path / f"{mcpu}.so")
    base = [QEMU, "-cpu", "Haswell", sys.executable, "-m", "unsparse_tvm.cli", "run"]
    proc = subprocess.run(base + [tmp_path / "skylake-avx512.so", "--print-time", "--repeat", "1"],
                          capture_output=True, text=True, timeout=600)
    assert_proc_one_line_error(proc, "needs avx512", "this CPU lacks them", ignore=("qemu-x86_64: warning",))
    ok = subprocess.run(base + [tmp_path / "haswell.so", "-o", tmp_path / "y.npy"],
                        capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert np.load(tmp_path / "y.npy").shape == (1, 10)


def test_l2_size_is_read_from_sysfs(tmp_path, monkeypatch):
    """The per-core L2 the sparse conv's loop order depends on (schedules.sparse_conv2d_cpu.L2_INPUT_BYTES):
    level 2's unified or data cache in Linux's sysfs, in K or M; None where no level-2 entry parses."""
    def cache(index, level, kind, size):
        d = tmp_path / f"index{index}"
        d.mkdir()
        for name, value in (("level", level), ("type", kind), ("size", size)):
            (d / name).write_text(value + "\n")

    monkeypatch.setattr(hostcpu, "_CACHE_SYSFS", str(tmp_path))
    cache(0, "1", "Data", "32K")
    cache(1, "1", "Instruction", "32K")
    cache(3, "3", "Unified", "32768K")
    hostcpu.l2_bytes.cache_clear()
    assert hostcpu.l2_bytes() is None
    cache(2, "2", "Unified", "2M")
    hostcpu.l2_bytes.cache_clear()
    assert hostcpu.l2_bytes() == 2 << 20
    (tmp_path / "index2" / "size").write_text("512K\n")
    hostcpu.l2_bytes.cache_clear()
    assert hostcpu.l2_bytes() == 512 << 10
    hostcpu.l2_bytes.cache_clear()


def test_the_loop_order_uses_this_l2_only_for_code_that_runs_here(monkeypatch):
    """As the calibration: this machine's L2 decides the sparse conv's loop order only where this CPU executes
    the target's code; code for another CPU model gets the 2 MB the rule was fitted with."""
    import tvm

    from unsparse_tvm.schedules import sparse_conv2d_cpu
    from unsparse_tvm.target import llvm_target_dict, runnable_here

    monkeypatch.setattr(sparse_conv2d_cpu, "l2_bytes", lambda: 512 << 10)
    assert sparse_conv2d_cpu.l2_input_bytes(tvm.target.Target(llvm_target_dict())) == 512 << 10
    foreign = next((m for m in ("sapphirerapids", "skylake-avx512")
                    if runnable_here(tvm.target.Target(llvm_target_dict(m)))), None)
    if foreign is None:
        pytest.skip("this CPU runs every candidate's code")
    assert sparse_conv2d_cpu.l2_input_bytes(tvm.target.Target(llvm_target_dict(foreign))) == 2 << 20

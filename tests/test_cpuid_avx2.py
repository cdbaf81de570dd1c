"""cpuid_avx2: ONNX Runtime held to AVX2 on an AVX-512 CPU by a CPUID that hides AVX-512 (bench --peer-isa).

Each check runs in a child process: the mask belongs to a thread and the SIGSEGV handler to the process."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from unsparse_tvm import cpuid_avx2

needs_fault = pytest.mark.skipif(cpuid_avx2.unavailable() is not None, reason=str(cpuid_avx2.unavailable()))

_BITS = """
import json
from unsparse_tvm import cpuid_avx2 as c
before = {leaf: c.cpuid(*leaf) for leaf in ((0, 0), (1, 0), (7, 0), (7, 1), (0xD, 0))}
with c.held() as why:
    masked = {leaf: c.cpuid(*leaf) for leaf in before}
after = {leaf: c.cpuid(*leaf) for leaf in before}
print(json.dumps({"why": why, "faults": c.faults(), **{f"{k}_{leaf[0]}_{leaf[1]}": v for k, d in
                  (("before", before), ("masked", masked), ("after", after)) for leaf, v in d.items()}}))
"""


def _child(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


@needs_fault
def test_masked_cpuid_hides_avx512_and_keeps_the_rest():
    """Inside held(): leaf 7's AVX-512 and VNNI bits clear, AVX2 and the other leaves as the CPU says, every
    answer the shim's (faults counted); after it, CPUID is the CPU's again. Negative control: unmasked, the
    AVX-512F bit is what /proc/cpuinfo says (set on an AVX-512 host)."""
    import json

    from unsparse_tvm.hostcpu import host_features

    run = _child(_BITS)
    assert run.returncode == 0, run.stderr
    r = json.loads(run.stdout.splitlines()[-1])
    assert r["why"] is None and r["faults"] >= 5
    ebx, ecx = r["masked_7_0"][1], r["masked_7_0"][2]
    assert not ebx & (1 << 16) and not ebx & (1 << 30) and not ecx & (1 << 11)  # AVX512F, BW, VNNI
    assert ebx & (1 << 5) == r["before_7_0"][1] & (1 << 5)  # AVX2 as it was
    assert r["masked_0_0"] == r["before_0_0"] and r["masked_1_0"] == r["before_1_0"]
    assert not r["masked_13_0"][0] & (0b111 << 5)  # no AVX-512 register state offered
    assert r["after_7_0"] == r["before_7_0"]
    assert bool(r["before_7_0"][1] & (1 << 16)) == ("avx512f" in host_features())


@needs_fault
def test_a_real_fault_under_the_handler_still_kills_the_process():
    """The handler answers CPUID only: any other SIGSEGV goes to the handler before it (here the default), so
    a crash stays a crash instead of a hang or a wrong answer."""
    run = _child("import ctypes\nfrom unsparse_tvm import cpuid_avx2 as c\nwith c.held():\n    ctypes.string_at(0)\n")
    assert run.returncode == -11, (run.returncode, run.stderr[-500:])


_ORT = """
import numpy as np, onnx, sys
from onnx import TensorProto, helper, numpy_helper
from unsparse_tvm import cpuid_avx2 as c
w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32), "w")
g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 64])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 64])], [w])
onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), sys.argv[1])
x = np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32)
with c.held() as why:
    import onnxruntime as ort
    y = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
print("RESULT", why, c.faults(), float(np.abs(y - x @ numpy_helper.to_array(w)).max()))
"""


@needs_fault
@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="needs the peers extra")
def test_onnxruntime_reads_its_cpu_through_the_mask(tmp_path):
    """ONNX Runtime started under held() asks CPUID (the shim answers: faults > 0, where none of ours ran) and
    still computes the right result on the code it then picks."""
    run = _child(_ORT, str(tmp_path / "m.onnx"))
    assert run.returncode == 0, run.stderr[-2000:]
    _, why, faults, err = next(line for line in run.stdout.splitlines() if line.startswith("RESULT")).split()
    assert why == "None" and int(faults) > 0 and float(err) < 1e-3


_GRANDCHILD = """
import ctypes, faulthandler, os
lib, r = ctypes.CDLL(os.environ["LD_PRELOAD"].split()[0]), (ctypes.c_uint32 * 4)()
lib.unsparse_cpuid(7, 0, r)
first = r[1]
faulthandler.enable()  # a runtime's own SIGSEGV handler, installed after the shim's
lib.unsparse_cpuid(7, 0, r)
print("EBX", first, r[1], flush=True)
ctypes.string_at(0)
"""

_PROCESSES = """
import json, subprocess, sys
from unsparse_tvm import cpuid_avx2 as c
def flags():
    return subprocess.run(["grep", "-c", "avx512", "/proc/cpuinfo"], capture_output=True, text=True).stdout.strip()
with c.held() as why:
    inside, child = flags(), subprocess.run([sys.executable, "-c", sys.argv[1]], capture_output=True, text=True)
print(json.dumps({"why": why, "inside": inside, "after": flags(), "rc": child.returncode, "out": child.stdout,
                  "err": child.stderr[-300:]}))
"""


@needs_fault
def test_processes_started_while_held_see_an_avx2_cpu():
    """A process started under held() (DeepSparse's worker, its probe) preloads the shim: CPUID masked from its
    start, /proc/cpuinfo without avx512 flags, and a SIGSEGV handler it installs later (faulthandler here) gets
    the real faults behind the shim's, which still answers CPUID. Negative control: started after held(), a
    process reads the CPU's own flags (avx512 ones on an AVX-512 host)."""
    import json

    from unsparse_tvm.hostcpu import host_features

    run = _child(_PROCESSES, _GRANDCHILD)
    assert run.returncode == 0, run.stderr[-2000:]
    r = json.loads(run.stdout.splitlines()[-1])
    assert r["why"] is None and r["inside"] == "0"
    assert (int(r["after"]) > 0) == ("avx512f" in host_features())
    _, first, later = r["out"].split()
    assert not int(first) & (1 << 16) and not int(later) & (1 << 16)
    assert r["rc"] == -11 and "Segmentation fault" in r["err"]


def test_where_cpuid_cannot_be_masked_it_says_why_and_masks_nothing(monkeypatch):
    """Not Linux x86-64: one line saying so, and held() yields it without touching CPUID; held(False) does
    nothing and yields None."""
    monkeypatch.setattr(cpuid_avx2.platform, "machine", lambda: "aarch64")
    why = cpuid_avx2.unavailable()
    assert why and "x86-64" in why
    with cpuid_avx2.held() as said:
        assert said == why
    with cpuid_avx2.held(False) as said:
        assert said is None

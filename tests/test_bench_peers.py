"""bench --peers / --threads: the runtimes a user would pick instead, checked and timed in one process."""

import json

import pytest

from conftest import assert_proc_one_line_error, cli


def test_bench_peers_and_threads_write_every_contender(tmp_path):
    out = tmp_path / "b.json"
    proc = cli("bench", "smallcnn", "--sparsity", "0.9", "--no-layers", "--repeat", "3", "--threads", "1,2",
               "--peers", "onnxruntime,openvino", "--json", out)
    r = json.loads(out.read_text())
    assert set(r["by_threads"]) == {"1", "2"}
    for e in r["by_threads"].values():
        assert {"unsparse_ms", "tvm_dense_ms", "torch_ms", "onnxruntime_ms", "openvino_ms"} <= set(e)
        assert all(v > 0 for v in e.values())
    assert r["max_rel_error_vs_torch"]["onnxruntime"] < 1e-3 and r["max_rel_error_vs_torch"]["openvino"] < 1e-3
    assert "unsparse vs the fastest fp32 peer" in proc.stdout
    for n, e in r["by_threads"].items():  # every round kept; the medians are theirs; ours paired with the fastest
        rounds = r["rounds"][n]
        assert set(rounds) == set(e) and all(len(v) == 3 for v in rounds.values())
        assert all(sorted(v)[1] == e[k] for k, v in rounds.items())
        best = min(("onnxruntime_ms", "openvino_ms"), key=e.get)
        (name, p), = r["paired"][n].items()
        assert name == f"unsparse_vs_{best[:-3]}" and p["rounds"] == 3
        assert p["q1"] <= p["median"] <= p["q3"]
    assert "round by round: median" in proc.stdout


def test_torch_compile_row_is_compared_with_the_api_call(tmp_path):
    """--peers unsparse_torch_compile also times the same model through unsparse_tvm.compile (a CompiledModel on
    the torch tensor, as a script calls a loaded .so): the ratio of the two is Dynamo's cost per call."""
    out = tmp_path / "b.json"
    proc = cli("bench", "smallcnn", "--sparsity", "0.9", "--no-layers", "--repeat", "3", "--threads", "1",
               "--peers", "unsparse_torch_compile", "--json", out)
    r = json.loads(out.read_text())
    assert {"unsparse_torch_compile_ms", "unsparse_api_ms"} <= set(r["by_threads"]["1"])
    assert r["max_rel_error_vs_torch"]["unsparse_api"] < 1e-4
    assert r["max_rel_error_vs_torch"]["unsparse_torch_compile"] < 1e-4
    assert 'torch.compile(backend="unsparse") vs the same model through unsparse_tvm.compile' in proc.stdout
    paired = r["paired"]["1"]["unsparse_api_vs_unsparse_torch_compile"]  # torch.compile's time over the API's
    rounds = r["rounds"]["1"]
    ratios = sorted(t / a for t, a in zip(rounds["unsparse_torch_compile_ms"], rounds["unsparse_api_ms"]))
    assert paired["rounds"] == 3 and paired["median"] == pytest.approx(ratios[1])


def test_the_torch_rows_run_the_program_as_a_plain_module():
    """bench's PyTorch and torch.compile rows run the program as a user runs their own nn.Module: without the
    input-check and pytree hooks ExportedProgram.module() adds (Python on every call, ~0.1 ms), same output."""
    import torch

    from unsparse_tvm.peers import plain_module

    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    x = torch.randn(2, 3, 9, 7)
    ep = torch.export.export(m, (x,))
    assert ep.module()._forward_pre_hooks  # what there is to remove (else this test checks nothing)
    net = plain_module(ep)
    assert not net._forward_pre_hooks and not net._forward_hooks and "_guards_fn" not in net.code
    with torch.no_grad():
        torch.testing.assert_close(net(x), m(x))


def _int8_model(tmp_path) -> str:
    """vgg16-cifar-like small net, channel-quad pruned and quantised with int8 activations (random data)."""
    from conftest import cli_here

    cli_here("prune", "smallcnn", "--sparsity", "0.75", "--method", "channel4", "-o", tmp_path / "p.pt2")
    cli_here("quantize", tmp_path / "p.pt2", "--activations", "int8", "--dataset", "random", "-o", tmp_path / "q.pt2")
    return str(tmp_path / "q.pt2")


def test_an_int8_model_meets_int8_runtimes_by_default(tmp_path, monkeypatch):
    """No --peers: ONNX Runtime's and OpenVINO's int8 (ORT's static QDQ quantisation, calibrated on the same
    samples as `quantize --activations int8`), each checked against PyTorch with the int8 tolerance."""
    monkeypatch.setenv("DEEPSPARSE_VENV", str(tmp_path / "no-deepsparse"))  # not built: left out by default
    out = tmp_path / "b.json"
    proc = cli("bench", _int8_model(tmp_path), "--no-layers", "--repeat", "3", "--threads", "1", "--json", out)
    r = json.loads(out.read_text())
    e = r["by_threads"]["1"]
    assert {"unsparse_int8_ms", "onnxruntime_int8_ms", "openvino_int8_ms"} <= set(e), e
    errors = r["max_rel_error_vs_torch"]
    assert 0 < errors["onnxruntime_int8"] < 0.1 and 0 < errors["openvino_int8"] < 0.1  # int8: close, not exact
    assert "unsparse_int8 vs the fastest int8 peer" in proc.stdout


def test_a_peer_that_cannot_run_is_one_line_and_the_others_run(tmp_path, monkeypatch):
    fake = tmp_path / "venv" / "bin"
    fake.mkdir(parents=True)
    (fake / "python").write_text("#!/bin/sh\necho 'no deepsparse here' >&2\nexit 1\n")
    (fake / "python").chmod(0o755)
    monkeypatch.setenv("DEEPSPARSE_VENV", str(tmp_path / "venv"))
    proc = cli("bench", "smallcnn", "--sparsity", "0.9", "--no-layers", "--repeat", "3", "--threads", "1",
               "--peers", "deepsparse,onnxruntime", "--json", tmp_path / "b.json")
    assert "skipping deepsparse: deepsparse could not run the model: no deepsparse here" in proc.stdout
    assert "onnxruntime_ms" in json.loads((tmp_path / "b.json").read_text())["by_threads"]["1"]


@pytest.mark.skipif(not __import__("unsparse_tvm.peers_deepsparse", fromlist=["ready"]).ready(),
                    reason="DeepSparse's environment is not built (bench --peers deepsparse builds it once, ~500 MB)")
def test_deepsparse_runs_fp32_and_int8_in_its_own_environment(tmp_path):
    out = tmp_path / "b.json"
    cli("bench", _int8_model(tmp_path), "--no-layers", "--repeat", "3", "--threads", "1",
        "--peers", "deepsparse,deepsparse_int8", "--json", out)
    r = json.loads(out.read_text())
    assert r["max_rel_error_vs_torch"]["deepsparse"] < 1e-3 and r["max_rel_error_vs_torch"]["deepsparse_int8"] < 0.1
    assert r["by_threads"]["1"]["deepsparse_int8_ms"] > 0


def test_bench_rejects_bad_thread_counts_and_peers():
    for args in (["--threads", "0"], ["--threads", "a,b"], ["--peers", "tensorrt"]):
        proc = cli("bench", "smallcnn", *args, check=False)
        assert_proc_one_line_error(proc)


def test_round_robin_alternates_and_waits_the_pause_before_each_batch(monkeypatch):
    """Each round times every contender once, in turn, after `pause` seconds of idle (bench passes
    timing.MULTI_THREAD_PAUSE_S on more than one thread: TVM's spinning pool slowed the runtime timed next)."""
    from unsparse_tvm import timing

    sleeps, order = [], []
    monkeypatch.setattr(timing.time, "sleep", sleeps.append)

    def contender(name, ms):
        def measure(number):
            order.append((name, number))
            return ms
        return measure

    got = timing.round_robin({"a": contender("a", 2.0), "b": contender("b", 5.0)}, repeat=3, pause=0.2)
    assert got == {"a": 2.0, "b": 5.0}
    assert sleeps == [0.2] * 6
    rounds = order[4:]  # after the warm-up: measure(2), then measure(1) to size each one's batch
    assert rounds == [("a", 1), ("a", 10), ("b", 1), ("b", 4)] * 3  # an untimed call, then 20 ms worth
    assert timing.MULTI_THREAD_PAUSE_S >= 0.1


def test_paired_ratio_compares_round_by_round():
    """A machine that slows down mid-run: each round's ratio is 4 but one contender's median falls in the slow
    rounds and the other's in the fast ones, so the ratio of the medians says 5.2."""
    from unsparse_tvm.bench import paired_to_peers
    from unsparse_tvm.timing import paired_ratio

    ours, peer = [1.0, 1.0, 1.0, 1.3, 1.3], [4.0, 4.0, 5.2, 5.2, 5.2]
    assert sorted(peer)[2] / sorted(ours)[2] == pytest.approx(5.2)
    got = paired_ratio(peer, ours)
    assert got["median"] == pytest.approx(4.0) and got["rounds"] == 5
    assert got["q1"] == pytest.approx(4.0) and got["q3"] == pytest.approx(4.0)
    wide = paired_ratio([2.0, 3.0, 4.0, 5.0], [1.0] * 4)
    assert (wide["q1"], wide["median"], wide["q3"]) == pytest.approx((2.75, 3.5, 4.25))
    with pytest.raises(ValueError):
        paired_ratio([], [])
    # like with like: ours fp32 against the fastest fp32 peer, int8 execution against the fastest int8 one
    rounds = {"unsparse_ms": ours, "openvino_ms": peer, "onnxruntime_ms": [9.0] * 5,
              "unsparse_int8_ms": [0.5] * 5, "onnxruntime_int8_ms": [2.0] * 5, "openvino_int8_ms": [3.0] * 5}
    medians = {k: sorted(v)[2] for k, v in rounds.items()}
    paired = paired_to_peers(medians, rounds)
    assert set(paired) == {"unsparse_vs_openvino", "unsparse_int8_vs_onnxruntime_int8"}
    assert paired["unsparse_int8_vs_onnxruntime_int8"]["median"] == pytest.approx(4.0)
    # and int8 execution against the same model's fp32 sparse kernels, where the run timed both
    rounds["unsparse_fp32_ms"] = [0.8, 0.8, 0.9, 0.9, 1.0]
    paired = paired_to_peers({k: sorted(v)[2] for k, v in rounds.items()}, rounds)
    assert paired["unsparse_int8_vs_unsparse_fp32"]["median"] == pytest.approx(1.8)


def test_peers_are_held_to_avx2_only_where_our_code_is_avx2_on_an_avx512_host(monkeypatch):
    """--peer-isa auto: an AVX2 build of ours on an AVX-512 CPU meets AVX2 peers (oneDNN's cap set; ONNX Runtime
    and DeepSparse: test_cpuid_avx2); an AVX-512 build, an AVX2-only CPU or --peer-isa native leave the peers
    alone; a cap the user set is kept."""
    import os

    from unsparse_tvm.errors import UnsparseError
    from unsparse_tvm.peers import ONEDNN_ISA, hold_to_avx2

    monkeypatch.delenv(ONEDNN_ISA, raising=False)
    for mode, ours, host in (("auto", True, True), ("auto", False, False), ("native", False, True)):
        assert hold_to_avx2(mode, ours, host) is None
        assert ONEDNN_ISA not in os.environ
    line = hold_to_avx2("auto", False, True)
    assert "OpenVINO" in line and os.environ[ONEDNN_ISA] == "AVX2"
    monkeypatch.setenv(ONEDNN_ISA, "AVX512_CORE")
    assert "AVX512_CORE" in hold_to_avx2("avx2", True, True)  # the user's own cap wins
    with pytest.raises(UnsparseError, match="--peer-isa"):
        hold_to_avx2("sse", False, True)


_OV_KERNELS = """
import numpy as np, onnx, sys
from onnx import TensorProto, helper, numpy_helper
from unsparse_tvm.peers import openvino_call
w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((32, 16, 3, 3)).astype(np.float32), "w")
g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "g",
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 16, 16])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 16, 16])], [w])
onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), sys.argv[1])
call = openvino_call(sys.argv[1], np.ones((1, 16, 16, 16), np.float32), 1)
print("KERNELS", call.kernels)
"""


@pytest.mark.skipif(__import__("importlib").util.find_spec("openvino") is None, reason="needs the peers extra")
def test_openvino_names_its_kernels_and_the_avx2_cap_reaches_them(tmp_path):
    """The cap hold_to_avx2 sets does change what OpenVINO runs (each in a fresh process: oneDNN reads it
    once), and openvino_call reports it from the runtime model; without the cap, on an AVX-512 CPU, the
    kernels are not AVX2 ones (the negative control)."""
    import os
    import subprocess
    import sys

    from unsparse_tvm.hostcpu import host_features
    from unsparse_tvm.peers import ONEDNN_ISA

    def kernels(**env) -> str:
        base = {k: v for k, v in os.environ.items() if k != ONEDNN_ISA}
        out = subprocess.run([sys.executable, "-c", _OV_KERNELS, str(tmp_path / "c.onnx")], env={**base, **env},
                             capture_output=True, text=True, check=True).stdout
        return next(line for line in out.splitlines() if line.startswith("KERNELS")).split(" ", 1)[1]

    held = kernels(**{ONEDNN_ISA: "AVX2"})
    assert "avx2" in held and "x1" in held, held
    if "avx512f" in host_features():
        assert "avx2" not in kernels(), "without the cap an AVX-512 CPU should run wider kernels"

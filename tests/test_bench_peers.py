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

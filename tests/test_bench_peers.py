"""bench --peers / --threads: the runtimes a user would pick instead, checked and timed in one process."""

import json

from conftest import cli


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
    assert "fastest peer" in proc.stdout


def test_bench_rejects_bad_thread_counts_and_peers():
    for args in (["--threads", "0"], ["--threads", "a,b"], ["--peers", "tensorrt"]):
        proc = cli("bench", "smallcnn", *args, check=False)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr

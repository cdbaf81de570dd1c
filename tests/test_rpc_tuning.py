"""Distributed measurement: a TVM RPC tracker and two RPC servers on loopback (127.0.0.1 only), a tiny
llvm tune of smallcnn through them via MetaSchedule's RPCRunner, everything stopped at the end."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import assert_one_line_error, pruned_program
from unsparse_tvm.tuning.log import read_log
from unsparse_tvm.tuning.search import SearchOptions

QUIET = SearchOptions(progress=False)  # no progress lines in test output

KEY = "unsparse-test"
pytest.importorskip("tornado", reason="TVM's RPC tracker needs tornado (pip install tornado)")


def _free_port_range(width: int = 10) -> int:
    """A base port whose [base, base + width) is free on 127.0.0.1 right now."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + width >= 65535:
            continue
        free = True
        for p in range(base, base + width):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    free = False
                    break
        if free:
            return base
    pytest.skip("no free port range on 127.0.0.1")


def _start(args: list[str], log) -> subprocess.Popen:
    # own process group: the servers fork a child per session; the whole group is stopped at the end
    return subprocess.Popen([sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)


@pytest.fixture
def rpc_cluster(tmp_path):
    """(host, port, key, [server logs]) of a tracker with two servers under KEY."""
    from tvm import rpc

    procs = []
    logs = []
    tracker_port = _free_port_range(5)
    try:
        with open(tmp_path / "tracker.log", "w") as log:
            procs.append(_start(["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(tracker_port),
                                 "--port-end", str(tracker_port + 5)], log))
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", tracker_port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.3)
        for i in range(2):
            base = _free_port_range(10)
            path = tmp_path / f"server{i}.log"
            logs.append(path)
            with open(path, "w") as log:
                procs.append(_start(["tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(base),
                                     "--port-end", str(base + 10), "--tracker", f"127.0.0.1:{tracker_port}",
                                     "--key", KEY], log))
        while time.time() < deadline:  # both servers registered
            try:
                queue = rpc.connect_tracker("127.0.0.1", tracker_port).summary()["queue_info"].get(KEY, {})
                if queue.get("free", 0) >= 2:
                    break
            except Exception:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("the RPC servers did not register with the tracker within 60 s")
        yield "127.0.0.1", tracker_port, KEY, logs
    finally:
        for p in reversed(procs):
            _stop(p)


@pytest.mark.slow
def test_tune_through_rpc_tracker(tmp_path, rpc_cluster, llvm):
    from unsparse_tvm.tuning import check_tracker, tune

    host, port, key, server_logs = rpc_cluster
    assert check_tracker(host, port, key) == 2
    path = str(tmp_path / "log")
    res = tune(pruned_program("smallcnn"), llvm, path, 7, rpc=(host, port, key), options=QUIET)
    assert res.new_trials == 7 and not res.interrupted
    log = read_log(path)
    assert len(log.records) == 7 and all(r.ok for r in log.records), [r.run_secs for r in log.records]
    assert sum(1 for r in log.records if r.trace[1]) == 2  # two search trials beyond the 5 defaults
    sessions = [open(p).read().count("load_module") for p in server_logs]
    assert sum(sessions) == 7, sessions  # every candidate was timed on an RPC server
    # the records apply like local ones
    from unsparse_tvm.build import compile_program
    from unsparse_tvm.tuning import open_database

    db = open_database(path, llvm)
    compile_program(pruned_program("smallcnn"), llvm, database=db)
    assert db.stats["kernels_applied"] == 5


def test_rpc_errors(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    argv = ["tune", "smallcnn", "--sparsity", "0.9", "--trials", "2", "--log-dir", str(tmp_path / "l"),
            "--rpc-tracker", f"127.0.0.1:{closed}", "--rpc-key", KEY]
    start = time.time()
    assert_one_line_error(argv, capsys, "cannot reach the RPC tracker")
    assert time.time() - start < 15

"""The RPC tracker: parse `--rpc-tracker HOST:PORT` and check, before any work, that it answers and has
servers under the key."""

from __future__ import annotations

import socket
import threading

from ..errors import UnsparseError


def parse_tracker(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UnsparseError(f"--rpc-tracker must be HOST:PORT, got '{text}'")
    return host, int(port)


def check_tracker(host: str, port: int, key: str, timeout: float = 10.0) -> int:
    """How many servers the tracker has free or busy under `key`; one clear error if none or unreachable."""
    from tvm import rpc  # deferred: only --rpc-tracker needs TVM's RPC client

    try:  # a plain connect first: TVM's own client retries for a minute, logging each attempt
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        raise UnsparseError(f"cannot reach the RPC tracker at {host}:{port} ({err.strerror or err}); start one with "
                            f"`python -m tvm.exec.rpc_tracker --host {host} --port {port}`") from None
    result: dict = {}

    def query():
        try:
            result["summary"] = rpc.connect_tracker(host, port).summary()
        except Exception as err:  # connection refused, bad handshake, ...
            result["error"] = err

    t = threading.Thread(target=query, daemon=True)
    t.start()
    t.join(timeout)
    if "summary" not in result:
        why = result.get("error", f"no answer within {timeout:.0f} s")
        why = str(why).strip().splitlines()[0] if str(why).strip() else type(why).__name__
        raise UnsparseError(f"cannot reach the RPC tracker at {host}:{port} ({why[:200]}); start one with "
                            f"`python -m tvm.exec.rpc_tracker --host {host} --port {port}`")
    servers = sum(1 for s in result["summary"].get("server_info", []) if str(s.get("key", "")).split(":")[-1] == key)
    queue = result["summary"].get("queue_info", {}).get(key, {})
    servers = max(servers, int(queue.get("free", 0)) + int(queue.get("pending", 0)))
    if servers == 0:
        raise UnsparseError(f"the RPC tracker at {host}:{port} has no server registered under key '{key}'; start one "
                            f"with `python -m tvm.exec.rpc_server --tracker {host}:{port} --key {key}`")
    return servers

"""Tuning logs (unsparse_tvm.tuning.log): target identity, `logs show`, `logs merge` (best per workload and
target, no silent overwrite), tolerant reading."""

from __future__ import annotations

import json
import os

import pytest

from conftest import assert_one_line_error
from test_tuning import TINY_TRIALS, copy_log, record_lines, tiny_log
from unsparse_tvm.errors import UnsparseError
from unsparse_tvm.tuning.log import RECORD_FILE, WORKLOAD_FILE, read_log, target_identity


def _retarget(path: str, mcpu: str, scale: float) -> None:
    """Rewrite every record of a log as if measured on another CPU model, `scale` times the time."""
    lines = []
    for line in record_lines(path):
        idx, (trace, secs, target, args) = json.loads(line)
        lines.append(json.dumps([idx, [trace, [s * scale for s in secs], {**target, "mcpu": mcpu}, args]]))
    with open(os.path.join(path, RECORD_FILE), "w") as f:
        f.write("\n".join(lines) + "\n")


def test_target_identity():
    llvm = {"kind": "llvm", "mtriple": "x86_64-unknown-linux-gnu", "mcpu": "rocketlake", "num-cores": 2}
    assert target_identity(llvm) == target_identity({**llvm, "num-cores": 64, "tag": "x"})  # cores: same
    assert target_identity(llvm) != target_identity({**llvm, "mcpu": "znver4"})
    assert target_identity(llvm) != target_identity({**llvm, "mattr": ["-avx512f"]})
    cuda = {"kind": "cuda", "arch": "sm_90", "host": llvm}
    assert target_identity(cuda) == target_identity({**cuda, "host": {**llvm, "mcpu": "znver4"}})
    assert target_identity(cuda) != target_identity({**cuda, "arch": "sm_80"})
    assert target_identity(cuda) != target_identity(llvm)


def test_show_lists_each_workload(capsys):
    from unsparse_tvm.cli import main

    assert main(["logs", "show", tiny_log()]) == 0
    out = capsys.readouterr().out
    assert f"{TINY_TRIALS} records" in out
    rows = [l for l in out.splitlines()[2:] if l.strip()]
    assert len(rows) == TINY_TRIALS
    for row in rows:
        assert "sparse_" in row and "llvm mcpu=" in row and " ms" not in row  # the header says ms
        best = float(row.split()[2])
        assert 0 < best < 100


def test_merge_keeps_best_per_workload_and_target(tmp_path, capsys):
    from unsparse_tvm.cli import main

    fast = copy_log(tmp_path, "fast")
    this = {r.target["mcpu"] for r in read_log(fast).records}  # the machine's CPU, whatever it is
    assert len(this) == 1
    this = this.pop()
    another = "haswell" if this != "haswell" else "skylake"
    slow = copy_log(tmp_path, "slow")
    _retarget(slow, this, 2.0)                  # same target, twice as slow: loses everywhere
    other = copy_log(tmp_path, "other")
    _retarget(other, another, 0.5)              # another target: kept beside, never mixed
    out = str(tmp_path / "merged")
    assert main(["logs", "merge", fast, slow, other, "-o", out]) == 0
    merged = read_log(out)
    assert merged.corrupt == 0 and len(merged.records) == 2 * TINY_TRIALS
    assert len(merged.workloads) == TINY_TRIALS  # shared by both targets
    best_fast = {json.dumps(r.trace[1]) for r in read_log(fast).records}
    by_target = {}
    for r in merged.records:
        by_target.setdefault(r.target["mcpu"], []).append(r)
    assert len(by_target[this]) == len(by_target[another]) == TINY_TRIALS
    fast_secs = sorted(r.seconds for r in read_log(fast).records)
    assert sorted(r.seconds for r in by_target[this]) == pytest.approx(fast_secs)
    assert sorted(r.seconds for r in by_target[another]) == pytest.approx([s * 0.5 for s in fast_secs])
    # TVM's own JSONDatabase reads the merged log too (the format is MetaSchedule's)
    from tvm.s_tir.meta_schedule.database import JSONDatabase

    assert len(JSONDatabase(work_dir=out, allow_missing=False).get_all_tuning_records()) == 2 * TINY_TRIALS
    # a non-empty output is never overwritten silently
    capsys.readouterr()
    assert_one_line_error(["logs", "merge", fast, "-o", out], capsys, "--force")
    assert main(["logs", "merge", fast, "-o", out, "--force"]) == 0
    assert len(read_log(out).records) == TINY_TRIALS
    assert best_fast  # the fast log itself is untouched
    assert len(read_log(fast).records) == TINY_TRIALS


def test_merge_and_show_skip_corrupt_lines(tmp_path, capsys):
    from unsparse_tvm.cli import main

    path = copy_log(tmp_path)
    with open(os.path.join(path, RECORD_FILE), "a") as f:
        f.write("garbage\n[0, [[[], [")
    with open(os.path.join(path, WORKLOAD_FILE), "a") as f:
        f.write("[\"123\", \n")
    assert main(["logs", "show", path]) == 0
    assert "3 unreadable lines skipped" in capsys.readouterr().out
    out = str(tmp_path / "merged")
    assert main(["logs", "merge", path, "-o", out]) == 0
    assert "3 unreadable lines skipped" in capsys.readouterr().out
    assert len(read_log(out).records) == TINY_TRIALS


def test_logs_errors(tmp_path, capsys):
    from unsparse_tvm.tuning.log import merge

    (tmp_path / "empty").mkdir()
    for argv in (["logs", "show", str(tmp_path / "missing")], ["logs", "show", str(tmp_path / "empty")],
                 ["logs", "merge", str(tmp_path / "missing"), "-o", str(tmp_path / "o")],
                 ["logs", "merge", tiny_log(), "-o", "/proc/unsparse-cannot-write"]):
        assert_one_line_error(argv, capsys)
    with pytest.raises(UnsparseError):
        merge([], str(tmp_path / "o"))

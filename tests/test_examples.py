"""The scripts in examples/ run end to end (small settings), so they cannot rot unnoticed."""

import os
import re
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _run(script: str, *args: str, cwd) -> str:
    sys_tmp = cwd / "tmp"  # the script's system temp folder: an example cleans up after itself
    sys_tmp.mkdir()
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, script), *args], capture_output=True,
                          text=True, timeout=600, cwd=cwd, env={**os.environ, "TMPDIR": str(sys_tmp)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    left = [f for f in os.listdir(sys_tmp) if not f.startswith("torchinductor_")]  # torch's cache, kept by design
    assert left == [], f"{script} left {left} in the temp folder"
    return proc.stdout


@pytest.mark.slow
def test_compile_and_run_matches_torch(tmp_path):
    out = _run("compile_and_run.py", cwd=tmp_path)
    err = float(re.search(r"max relative error vs PyTorch: (\S+)", out).group(1))
    assert err < 1e-5 and "sparse" in out and "same output: True" in out


@pytest.mark.slow
def test_prune_and_quantize_reports_footprint(tmp_path):
    out = _run("prune_and_quantize.py", cwd=tmp_path)
    acc = {k: float(v) for k, v in re.findall(r"^(dense|\+ int8|compiled):\s+([\d.]+)%", out, re.M)}
    assert acc["dense"] > 90 and abs(acc["compiled"] - acc["+ int8"]) < 0.5, out  # compiled = the quantised net
    assert re.search(r"sparse\s+vell4\s+int8", out), out


@pytest.mark.slow
def test_tune_and_compile_writes_records_and_compares(tmp_path):
    log = tmp_path / "log"
    out = _run("tune_and_compile.py", "--model", "smallcnn", "--trials", "6", "--log-dir", str(log), cwd=tmp_path)
    assert (log / "database_tuning_record.json").stat().st_size > 0
    assert re.search(r"default knobs [\d.]+ ms, tuned [\d.]+ ms", out)

"""EngineOptions: one set of engine options for dsrun, dsserve and the Python API;
mistakes are usage errors (exit 2) found before any artifact is read."""
from __future__ import annotations

import subprocess
import sys

import pytest

from dsflow.common.errors import DsflowError
from dsflow.runtime.engine import EngineOptions


def run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("module", ["dsflow.runtime.cli", "dsflow.runtime.server.cli"])
@pytest.mark.parametrize("args, option", [
    (["--max-batch", "0"], "--max-batch"),
    (["--prefill-chunk", "0"], "--prefill-chunk"),
    (["--max-step-tokens", "-1"], "--max-step-tokens"),
    (["--step-timeout", "0"], "--step-timeout"),
    (["--cache-mb", "0"], "--cache-mb"),
])
def test_option_mistakes_exit_2_before_the_artifacts_are_read(module, args, option, tmp_path):
    missing = tmp_path / "no-such-artifacts"
    r = run(module, "--artifacts", str(missing), "--prompt", "x", *args) \
        if module.endswith("runtime.cli") else run(module, "--artifacts", str(missing), *args)
    assert r.returncode == 2, r.stderr
    assert option in r.stderr and "no-such-artifacts" not in r.stderr
    assert "Traceback" not in r.stderr


def test_python_m_cli_runs():
    r = run("dsflow.runtime.cli", "--help")
    assert r.returncode == 0 and "--no-prefix-reuse" in r.stdout and "--step-timeout" in r.stdout


def test_engine_options_check():
    EngineOptions(max_batch=1, max_queue=1).check()
    for bad in (dict(max_batch=0), dict(max_queue=0), dict(scheduling="eager"),
                dict(device="gpu"), dict(step_timeout_s=0), dict(max_seq_len=1)):
        with pytest.raises(DsflowError):
            EngineOptions(**bad).check()

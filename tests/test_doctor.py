"""`dsexport doctor`: the environment probes (with stand-ins for CANN, npu-smi and
mindspore_lite), the comparison rule, and the whole command here, where it must run
the CPU half for real and then say what the Ascend half lacks, exiting non-zero."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dsflow.doctor.check import Run, compare
from dsflow.doctor.environment import probe

FAKES = Path(__file__).resolve().parent / "fakes"
DOCTOR_TIMEOUT_S = 600


def test_probe_reports_cann_npus_and_lite_from_the_environment(tmp_path, monkeypatch):
    cann = tmp_path / "cann"
    (cann / "compiler").mkdir(parents=True)
    (cann / "compiler" / "version.info").write_text("Version=8.2.RC1\n")
    smi = tmp_path / "bin" / "npu-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\necho '| 0  910B3 | OK | 3000 / 65536 |'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("ASCEND_HOME_PATH", str(cann))
    monkeypatch.setenv("PATH", f"{smi.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", str(FAKES))  # the child imports the fake
    monkeypatch.setenv("DSFLOW_FAKE_LITE_VERSION", "2.10.0")
    env = probe(want_ascend=True)
    lines = dict(env.lines)
    assert lines["CANN"] == f"8.2.RC1 ({cann})"
    assert lines["mindspore_lite"] == "2.10.0"
    assert "910B3" in next(v for k, v in env.lines if k.startswith("NPUs"))
    assert env.ascend_missing == []


def run_of(tokens, logits, target="cpu") -> Run:
    return Run(target, 1, tokens=list(tokens), logits=np.asarray(logits, np.float32))


def test_compare_tolerates_only_near_ties():
    ref = run_of([1, 0], [[0.0, 1.0, 0.5], [2.0, 1.0, 0.0]])
    assert compare(ref, run_of([1, 0], [[0.0, 1.0, 0.5], [2.0, 1.0, 1e-5]]))[0]
    assert not compare(ref, run_of([1, 0], [[0.0, 1.0, 0.5], [2.0, 1.0, 0.1]]))[0]
    tie = run_of([1, 0], [[0.0, 1.0, 0.99], [2.0, 1.0, 0.0]])
    ascend = run_of([2, 0], [[0.0, 0.99, 1.0], [2.0, 1.0, 0.0]], "ascend")
    ok, detail = compare(tie, ascend)
    assert ok is True and "near-tie, tolerated" in detail
    assert not compare(ref, run_of([2, 0], [[0.0, 1.0, 0.5], [2.0, 1.0, 0.0]], "ascend"))[0]


def test_doctor_here_runs_the_cpu_half_and_names_what_ascend_lacks(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME", "PYTHONPATH")}
    env["PATH"] = f"{Path(sys.executable).parent}:/usr/bin:/bin"  # no npu-smi, no converter
    proc = subprocess.run([str(Path(sys.executable).parent / "dsexport"), "doctor", "--device",
                           "ascend", "--keep", str(tmp_path / "work")], env=env,
                          capture_output=True, text=True, timeout=DOCTOR_TIMEOUT_S)
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert "Traceback" not in out + proc.stderr
    for line in ("mindspore                   2.10.0", "cpu tp1: build", "cpu tp2: build",
                 "ok: tokens identical to cpu tp1", "NOT RUN. Missing here:",
                 "mindspore_lite is not importable", "CANN is not set up",
                 "no NPU visible", "CPU half: OK; Ascend half: FAILED or NOT RUN"):
        assert line in out, out
    assert (tmp_path / "work" / "cpu-tp2" / "manifest.json").is_file()


@pytest.mark.parametrize("tp", [1, 2])
def test_ascend_half_reports_a_lite_runtime_that_disagrees(tmp_path, monkeypatch, tp):
    """The Ascend half's own path (build for ascend, run through Lite workers, compare
    with the reference), here with the fake mindspore_lite computing zeros: the doctor
    must time the run and report a MISMATCH, not a pass."""
    from dsflow.doctor.check import run_target
    from dsflow.doctor.tiny_model import write_tiny_checkpoint
    monkeypatch.setenv("PYTHONPATH", f"{FAKES}:{FAKES.parent}")
    monkeypatch.setenv("DSFLOW_FAKE_LITE_KERNEL", "lite_inputs:zero_outputs")
    monkeypatch.setenv("DSFLOW_FAKE_LITE_INPUTS", "lite_inputs:from_manifest")
    monkeypatch.setenv("DSFLOW_GE_CACHE", str(tmp_path / "ge-cache"))
    checkpoint = write_tiny_checkpoint(tmp_path / "model")
    reference = run_of([5, 6, 7, 8, 9, 10, 11, 12], np.eye(9, 320, 5, dtype=np.float32) * 3)
    monkeypatch.setenv("DSFLOW_LITE_BUILD_STAGGER_S", "0")
    run = run_target(checkpoint, tmp_path, "ascend", tp, [0, 1][:tp], forced=reference.tokens)
    assert run.error is None, run.error
    assert run.build_s > 0 and run.warm_up_s > 0 and run.logits.shape == (9, 320)
    agrees, line = compare(reference, run)
    assert not agrees and "tokens differ" in line and "NOT a tie" in line, line
    manifest = (tmp_path / f"ascend-tp{tp}" / "manifest.json").read_text()
    assert '"target": "ascend"' in manifest and '"float16"' in manifest

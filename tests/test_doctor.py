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


# The fake mindspore_lite's releases (tests/fakes/mindspore_lite): version, zero-copy.
RELEASES = {"2.7": ("2.7.2", "0"), "2026": ("2.10.0", "1")}


def fake_ascend_host(tmp_path: Path, monkeypatch, release: str) -> None:
    """CANN, an npu-smi and the fake mindspore_lite of `release` (for child processes
    too: the probe's import and the workers)."""
    version, zero_copy = RELEASES[release]
    cann = tmp_path / "cann"
    cann.mkdir(exist_ok=True)
    smi = tmp_path / "bin" / "npu-smi"
    smi.parent.mkdir(exist_ok=True)
    smi.write_text("#!/bin/sh\necho '| 0  910B3 | OK |'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("ASCEND_HOME_PATH", str(cann))
    monkeypatch.setenv("PATH", f"{smi.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", f"{FAKES}:{FAKES.parent}")
    monkeypatch.setenv("DSFLOW_FAKE_LITE_VERSION", version)
    monkeypatch.setenv("DSFLOW_FAKE_LITE_ZERO_COPY", zero_copy)
    monkeypatch.setenv("DSFLOW_FAKE_LITE_KERNEL", "lite_inputs:zero_outputs")
    monkeypatch.setenv("DSFLOW_FAKE_LITE_INPUTS", "lite_inputs:from_manifest")
    monkeypatch.setenv("DSFLOW_GE_CACHE", str(tmp_path / "ge-cache"))
    monkeypatch.setenv("DSFLOW_LITE_BUILD_STAGGER_S", "0")
    monkeypatch.delenv("DSFLOW_ALLOW_LITE_VERSION_MISMATCH", raising=False)
    monkeypatch.delenv("DSFLOW_LITE_DEVICE_TENSORS", raising=False)


def test_probe_reports_the_mindspore_lite_pair_and_what_to_do(tmp_path, monkeypatch):
    """This venv has MindSpore 2.10: with Lite 2.10 the pair matches (resident cache);
    with Lite 2.7 it does not, and the Ascend half is stopped with the command that
    fixes it, unless the mismatch override is set (then it runs in the window mode)."""
    fake_ascend_host(tmp_path, monkeypatch, "2026")
    env = probe(want_ascend=True)
    pair = dict(env.lines)["MindSpore/Lite pair"]
    assert pair.startswith("2.10.0 / 2.10.0: same release: ok; cache mode resident"), pair
    assert env.ascend_missing == [] and env.ascend_cache_mode == "resident"
    fake_ascend_host(tmp_path, monkeypatch, "2.7")
    env = probe(want_ascend=True)
    pair = dict(env.lines)["MindSpore/Lite pair"]
    assert "MISMATCH" in pair and "pip install 'mindspore==2.7.*'" in pair, pair
    assert "cache mode window" in pair and env.ascend_cache_mode == "window"
    assert len(env.ascend_missing) == 1 and "different releases" in env.ascend_missing[0]
    monkeypatch.setenv("DSFLOW_ALLOW_LITE_VERSION_MISMATCH", "1")
    env = probe(want_ascend=True)
    assert env.ascend_missing == [] and "overridden" in dict(env.lines)["MindSpore/Lite pair"]


@pytest.mark.timeout(DOCTOR_TIMEOUT_S)
@pytest.mark.parametrize("release", sorted(RELEASES))
def test_ascend_half_reaches_a_diagnosis_with_each_lite_release(tmp_path, monkeypatch,
                                                                capsys, release):
    """The Ascend half's own path (build for ascend in the cache mode the found Lite
    takes, run through Lite workers at tp 1 and 2, compare with the reference), here
    with the fake mindspore_lite computing zeros: the doctor must time the runs and
    report a MISMATCH, never a failed run. The 2.7 release runs as if MindSpore 2.7
    had exported (the mismatch override: this venv has 2.10), so in the window mode."""
    from dsflow.doctor.cli import ascend_half
    from dsflow.doctor.tiny_model import write_tiny_checkpoint
    fake_ascend_host(tmp_path, monkeypatch, release)
    if release == "2.7":
        monkeypatch.setenv("DSFLOW_ALLOW_LITE_VERSION_MISMATCH", "1")
    env = probe(want_ascend=True)
    assert env.ascend_missing == [], env.ascend_missing
    checkpoint = write_tiny_checkpoint(tmp_path / "model")
    reference = run_of([5, 6, 7, 8, 9, 10, 11, 12], np.eye(9, 320, 5, dtype=np.float32) * 3)
    capsys.readouterr()
    ok = ascend_half(env, checkpoint, tmp_path, [0, 1], reference)
    out = capsys.readouterr().out
    mode = "window" if release == "2.7" else "resident"
    assert not ok and "FAILED" not in out, out
    assert f"cache mode {mode}" in out
    for tp in (1, 2):
        assert f"ascend tp{tp}: build" in out, out
        manifest = (tmp_path / f"ascend-tp{tp}" / "manifest.json").read_text()
        assert f'"cache_mode": "{mode}"' in manifest
    assert out.count("MISMATCH: tokens differ") == 2 and "NOT a tie" in out, out

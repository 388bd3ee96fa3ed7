"""tools/crosscheck_mindformers.py: its comparisons catch what they claim to, and, where a
MindFormers 1.9.0 venv exists, the whole cross-check passes.

The whole run needs MindFormers' own venv (mindformers 1.9.0 + mindspore 2.9.0, 4 GB,
built by the tool itself) and takes minutes: it is a documented tool run, not part of CI,
so it runs only when DSFLOW_MINDFORMERS_VENV names such a venv (opt-in: CI runs on the
machine a developer used, where the tool's default venv may well exist). Otherwise it is
skipped with its reason. The comparison functions are tested everywhere.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

from conftest import REPO

TOOL = REPO / "tools" / "crosscheck_mindformers.py"
NO_VENV = ("a documented tool run, not part of CI: set DSFLOW_MINDFORMERS_VENV to a "
           "MindFormers 1.9.0 venv (tools/crosscheck_mindformers.py builds one) to run it")


def load_tool():
    spec = importlib.util.spec_from_file_location("crosscheck_mindformers", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


xcheck = load_tool()


def mindformers_venv() -> Optional[Path]:
    """The venv named by DSFLOW_MINDFORMERS_VENV, or None (opt-in only)."""
    named = os.environ.get("DSFLOW_MINDFORMERS_VENV")
    return Path(named) if named else None


def test_differences_names_every_kind_of_mismatch():
    a = {"w": ("Float32", b"\x00" * 8), "n": ("Float32", b"\x01" * 4),
         "only_a": ("Float32", b"")}
    b = {"w": ("Float32", b"\x00" * 7 + b"\x01"), "n": ("BFloat16", b"\x01" * 4),
         "only_b": ("Float32", b"")}
    diff = xcheck.differences(a, b)
    assert diff == ["only in the first: ['only_a']", "only in the second: ['only_b']",
                    "n: dtype Float32 vs BFloat16", "w: values differ"]
    assert not xcheck.same("x", a, b).ok
    assert xcheck.same("x", a, dict(a)).ok


def test_agreement_fails_on_tokens_or_logits():
    logits = np.zeros((2, xcheck.REAL_VOCAB + 5), np.float32)
    ref = ([1, 2], logits)
    assert xcheck.agreement("x", ([1, 2], logits.copy()), ref).ok
    assert not xcheck.agreement("x", ([1, 3], logits.copy()), ref).ok
    moved = logits.copy()
    moved[1, 7] = 2 * xcheck.LOGIT_TOLERANCE
    assert not xcheck.agreement("x", ([1, 2], moved), ref).ok
    # the embedding's padding rows are never compared (nobody may choose them)
    padded = logits.copy()
    padded[:, xcheck.REAL_VOCAB:] = 1.0
    assert xcheck.agreement("x", ([1, 2], padded), ref).ok
    assert not xcheck.agreement("x", ([1, 2], logits[:1]), ref).ok


def test_missing_venv_is_one_line_without_install(tmp_path):
    done = subprocess.run([sys.executable, str(TOOL), "--venv", str(tmp_path / "none"),
                           "--no-install"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"crosscheck_mindformers: --venv {tmp_path / 'none'}: no mindformers 1.9.0 there "
        "(run without --no-install to build it)"]
    assert done.stdout == ""


@pytest.mark.timeout(1800)
def test_tool_matches_mindformers(tmp_path):
    venv = mindformers_venv()
    if venv is None or not xcheck.has_mindformers(venv):
        pytest.skip(NO_VENV)
    done = subprocess.run([sys.executable, str(TOOL), "--venv", str(venv), "--no-install",
                           "--new-tokens", "8", "--keep", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=1700)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["check", "result", "detail"]
    assert "21 ok, 0 failed" in lines
    assert sum("bit-identical" in line for line in lines) == 7
    assert sum("8 greedy tokens equal" in line for line in lines) == 12


def test_error_tail_drops_mindspore_call_stack_banner():
    output = ("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
              "TypeError: Failed calling Add with \"Add()(input=Tensor, other=string)\".\n"
              "----------------------------------------------------\n"
              "- C++ Call Stack: (For framework developers)\n"
              "----------------------------------------------------\n"
              "mindspore/ccsrc/pynative/utils/pynative_utils.cc:815 PrintTypeCast\n")
    assert xcheck.error_tail(output) == (
        "Traceback (most recent call last): | File \"x.py\", line 1 | "
        "TypeError: Failed calling Add with \"Add()(input=Tensor, other=string)\".")

"""What the doctor reports about the machine, and what the Ascend half would need.

Every probe reads the environment without importing mindspore_lite into this process
(its import initialises the Ascend runtime); `mindspore_lite` is imported in a child
Python, so a broken install is reported, not raised.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from typing import Optional

from dsflow.artifacts.lite import (CPU_RELEASE, SUPPORTED_RELEASES, ZERO_COPY_RELEASE,
                                   ascend_cache_mode, release_numbers)
from dsflow.export.pipeline.lite_build import CANN_ENVS, find_cann, find_converter

PROBE_TIMEOUT_S = 60
DEFAULT_PORT_RANGE = "21500-21600"  # what the Lite backend sets when unset
# The Lite backend's override for a MindSpore/Lite release mismatch (runtime/backends/
# lite.py VERSION_OVERRIDE_ENV); the doctor honours it the same way.
MISMATCH_OVERRIDE_ENV = "DSFLOW_ALLOW_LITE_VERSION_MISMATCH"


def _release(numbers) -> str:
    return ".".join(map(str, numbers))


@dataclass
class Environment:
    lines: list[tuple[str, str]] = field(default_factory=list)
    # what the Ascend half lacks here, one self-contained sentence each
    ascend_missing: list[str] = field(default_factory=list)
    lite_version: Optional[str] = None
    mindspore_version: Optional[str] = None
    # the Ascend half's cache mode: the one the found Lite takes (artifacts/lite.py)
    ascend_cache_mode: Optional[str] = None

    def add(self, label: str, value: str) -> None:
        self.lines.append((label, value))


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _run(cmd: list[str]) -> tuple[int, str]:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        return -1, str(e)
    return p.returncode, (p.stdout + p.stderr).strip()


def _mindspore_lite(env: Environment) -> None:
    """Import mindspore_lite in a child (the backend's way: port range set first)."""
    code = ("import os; os.environ.setdefault('HCCL_NPU_SOCKET_PORT_RANGE', "
            f"'{DEFAULT_PORT_RANGE}'); import mindspore_lite as m; print(m.__version__)")
    rc, out = _run([sys.executable, "-c", code])
    if rc == 0 and out:
        env.lite_version = out.splitlines()[-1].strip()
        env.add("mindspore_lite", env.lite_version)
        return
    reason = out.splitlines()[-1] if out else f"exit {rc}"
    env.add("mindspore_lite", f"not importable ({reason})")
    env.ascend_missing.append(
        f"mindspore_lite is not importable in {sys.executable} ({reason}): install the "
        "mindspore_lite wheel of the same release as MindSpore, for this Python, after CANN")


def _cann(env: Environment) -> None:
    """CANN's set_env.sh exports ASCEND_HOME_PATH; its compiler/version.info holds a
    `Version=` line (the file mindspore-lite's _check_ascend.py reads)."""
    home = find_cann()
    if home is None:
        env.add("CANN", f"not set up ({' / '.join(CANN_ENVS)} unset)")
        env.ascend_missing.append("CANN is not set up: install the CANN toolkit and "
                                  "`source <CANN>/set_env.sh` (sets ASCEND_HOME_PATH)")
        return
    version = "version unknown"
    info = home / "compiler" / "version.info"
    if info.is_file():
        for line in info.read_text(errors="replace").splitlines():
            if line.startswith("Version="):
                version = line.split("=", 1)[1].strip()
    env.add("CANN", f"{version} ({home})")


def _npus(env: Environment) -> None:
    smi = shutil.which("npu-smi")
    if smi is None:
        env.add("NPUs", "npu-smi not found: no Ascend driver here")
        env.ascend_missing.append("no NPU visible: npu-smi (the Ascend driver's tool) is not "
                                  "on PATH; run on an Ascend host with the driver installed")
        return
    rc, out = _run([smi, "info"])
    env.add("NPUs (npu-smi info; HBM-Usage = used / total MB per card)",
            "\n" + out if rc == 0 else f"npu-smi info failed (exit {rc}): {out[-300:]}")
    if rc != 0:
        env.ascend_missing.append(f"npu-smi info failed (exit {rc}): the driver sees no card")


def _pair(env: Environment) -> None:
    """The MindSpore/Lite pair: which releases, whether they match (the graphs must be
    exported by the MindSpore of the Lite's release), which cache mode that Lite takes,
    and what to do when something is off. A mismatch stops the Ascend half unless
    $DSFLOW_ALLOW_LITE_VERSION_MISMATCH is set (then it runs, flagged)."""
    ms, lite = release_numbers(env.mindspore_version), release_numbers(env.lite_version)
    if lite is None:
        return  # mindspore_lite not importable: already reported
    supported = ", ".join(_release(r) for r in SUPPORTED_RELEASES)
    env.ascend_cache_mode = ascend_cache_mode(env.lite_version)
    mode = (f"cache mode {env.ascend_cache_mode} (device tensors "
            f"{'taken' if env.ascend_cache_mode == 'resident' else 'not taken'}: zero-copy "
            f"GE executor from Lite {_release(ZERO_COPY_RELEASE)})")
    notes = []
    if lite[:2] not in SUPPORTED_RELEASES:
        notes.append(f"Lite {env.lite_version} is not a supported release ({supported})")
        env.ascend_missing.append(
            f"mindspore_lite {env.lite_version} is not a release dsflow supports "
            f"({supported}): install the mindspore_lite (and MindSpore) of one of them")
    if ms is None or ms[:2] != lite[:2]:
        fix = (f"export the Ascend graphs with MindSpore {_release(lite[:2])}: in this venv "
               f"`pip install 'mindspore=={_release(lite[:2])}.*'` (the CPU half then needs "
               f"another venv with MindSpore {_release(CPU_RELEASE)})")
        overridden = os.environ.get(MISMATCH_OVERRIDE_ENV, "") not in ("", "0")
        notes.append(f"MISMATCH: {fix}" + ("; overridden, results may be wrong"
                                           if overridden else ""))
        if not overridden:
            env.ascend_missing.append(
                f"MindSpore {env.mindspore_version or '(none)'} and mindspore_lite "
                f"{env.lite_version} are different releases, and GE's operator adapters "
                f"differ between releases: {fix}")
    else:
        notes.append("same release: ok")
    env.add("MindSpore/Lite pair", f"{env.mindspore_version or '(none)'} / "
            f"{env.lite_version}: {'; '.join(notes)}; {mode}")


def _memory_gib() -> str:
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        total = int(info["MemTotal"].split()[0]) / 2**20
        free = int(info["MemAvailable"].split()[0]) / 2**20
        return f"{free:.1f} GiB available of {total:.1f} GiB"
    except (OSError, KeyError, ValueError):
        return "unknown"


def probe(want_ascend: bool) -> Environment:
    env = Environment()
    env.add("python", f"{platform.python_version()} ({sys.executable})")
    env.add("platform", f"{platform.platform()}, {os.cpu_count()} CPUs, {_memory_gib()}")
    env.add("dsflow", _version("dsflow") or "not installed as a package")
    env.mindspore_version = _version("mindspore")
    env.add("mindspore", env.mindspore_version or "not installed")
    _mindspore_lite(env)
    _pair(env)
    _cann(env)
    conv = find_converter()
    env.add("converter_lite", str(conv.path) if conv else "not found (PATH, $MSLITE_HOME); "
            "optional: without it the graphs load as MindSpore MindIR")
    _npus(env)
    env.add("HCCL_NPU_SOCKET_PORT_RANGE", os.environ.get("HCCL_NPU_SOCKET_PORT_RANGE")
            or f"unset (the Lite backend uses {DEFAULT_PORT_RANGE})")
    if not want_ascend:
        env.ascend_missing = []
    return env

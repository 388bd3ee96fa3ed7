"""The Lite side of the artifact contract: file names a Lite build writes and the
runtime loads, and the rank table check both sides rely on.

`dsexport build --target ascend` writes these names; `runtime.backends.lite` reads them.
Neither imports the other: both import this module.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Mapping, Optional

from dsflow.common.errors import DsflowError
from dsflow.common.paths import inside
from dsflow.graphs.signatures import RESIDENT, WINDOW

RANK_TABLE_NAME = "rank_table.json"
LITE_SUFFIX = "_lite"  # rank0/prefill.mindir -> rank0/prefill_lite.mindir
PLACEHOLDER_PREFIX = "FILL-IN"

# MindSpore/Lite releases the Ascend path supports; the graphs are exported with the
# MindSpore of the host's Lite release (GE's operator adapters change between releases:
# docs/ASCEND.md section 8). The CPU path runs MindSpore 2.10 only.
SUPPORTED_RELEASES = ((2, 5), (2, 6), (2, 7), (2, 10))
CPU_RELEASE = (2, 10)
# The first Lite release whose GE executor passes device tensors to GE as they are
# ("zero-copy", the 2026 ge_graph_executor.cc). Earlier executors (2.3-2.7) read each
# predict tensor through its host pointer and memcpy outputs into it, so the resident
# cache mode (device tensors in and out of every predict) cannot run there. Which
# release first ships the 2026 executor was read from the sources, not run: this
# variable overrides the rule ("1": this Lite takes device tensors, "0": it does not).
ZERO_COPY_RELEASE = (2, 10)
DEVICE_TENSORS_ENV = "DSFLOW_LITE_DEVICE_TENSORS"


class LiteBuildError(DsflowError):
    """Lite artifacts (configs, rank table, converted models) that cannot be used."""


def check_rank_table(path: Path, rank: int, device_id: int) -> None:
    """Fail with a clear message unless `path` maps `rank` to `device_id`, filled in."""
    try:
        table = json.loads(Path(path).read_text(encoding="utf-8"))
        devices = [d for s in table["server_list"] for d in s["device"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LiteBuildError(f"{path}: not a readable HCCL rank table ({e})") from None
    mine = [d for d in devices if str(d.get("rank_id")) == str(rank)]
    if not mine or str(mine[0].get("device_id")) != str(device_id):
        raise LiteBuildError(f"{path}: rank {rank} is not on device {device_id}; edit the "
                             "table's device_id/rank_id or pass matching --devices")
    if any(str(d.get("device_ip", "")).startswith(PLACEHOLDER_PREFIX) for d in devices):
        raise LiteBuildError(f"{path}: device_ip still holds a placeholder; fill in each "
                             "NPU's address (`hccn_tool -i <device> -ip -g`) or delete the "
                             "device_ip fields")


def converted_file(out_stem: Path) -> Optional[Path]:
    """The file a conversion to `out_stem` produced (large models: *_graph.mindir)."""
    for suffix in (".mindir", "_graph.mindir"):
        p = out_stem.with_name(out_stem.name + suffix)
        if p.is_file():
            return p
    return None


def model_file(root: Path, entry: dict) -> Path:
    """What the Lite runtime loads: the converted file if any, else the MindSpore MindIR.

    A build without converter_lite records stage "mindir"; running the generated script
    afterwards leaves `<lite_stem>.mindir` (or `_graph.mindir`), found here by name.
    """
    def path(key: str) -> Path:  # names from the manifest stay inside `root`
        return inside(root, entry[key], f"{root}: graph entry {key}", LiteBuildError)
    if entry.get("stage") == "lite":
        return path("lite_file")
    converted = converted_file(path("lite_stem")) if entry.get("lite_stem") else None
    return converted or path("file")


def release_numbers(version: Optional[str]) -> Optional[tuple[int, int, int]]:
    """'2.10.0' / '2.10.0rc1' / '2.10' -> (2, 10, 0); None if it is not a version."""
    m = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", str(version or ""))
    return (int(m[1]), int(m[2]), int(m[3] or 0)) if m else None


def supported_release(version: Optional[str]) -> bool:
    numbers = release_numbers(version)
    return numbers is not None and numbers[:2] in SUPPORTED_RELEASES


def takes_device_tensors(version: Optional[str],
                         env: Optional[Mapping[str, str]] = None) -> bool:
    """Whether the mindspore_lite of `version` accepts device tensors as predict inputs
    and outputs (the resident cache mode). No live probe: on a release without it the
    failure is a copy through a null host pointer on the card (an error or a crash),
    not something to try; so the rule is the release (ZERO_COPY_RELEASE), overridable
    by $DSFLOW_LITE_DEVICE_TENSORS for a release known better than this rule."""
    env = os.environ if env is None else env
    flag = env.get(DEVICE_TENSORS_ENV, "")
    if flag:
        return flag not in ("0", "false", "no")
    numbers = release_numbers(version)
    return numbers is not None and numbers[:2] >= ZERO_COPY_RELEASE


def ascend_cache_mode(version: Optional[str], env: Optional[Mapping[str, str]] = None) -> str:
    """The default cache mode of Ascend artifacts exported with MindSpore `version` (run
    by the Lite of the same release): resident where that Lite takes device tensors,
    else window (host cache, windows uploaded per step)."""
    return RESIDENT if takes_device_tensors(version, env) else WINDOW


def resident_refusal(version: Optional[str], what: str) -> str:
    """One line: `what` (resident artifacts, or --cache-mode resident) cannot run on the
    Lite of `version`, and how to rebuild."""
    return (f"{what}: the KV cache would stay on the card as device tensors, which "
            f"mindspore_lite {version or '(unknown)'} cannot take as predict inputs/outputs "
            f"(its GE executor copies through host pointers; device tensors need Lite "
            f"{'.'.join(map(str, ZERO_COPY_RELEASE))} or later); rebuild with "
            "`dsexport build --target ascend --cache-mode window` using the MindSpore of "
            f"this Lite's release (or set {DEVICE_TENSORS_ENV}=1 if this Lite is known to "
            "take device tensors)")

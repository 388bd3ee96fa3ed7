"""The Lite side of the artifact contract: file names a Lite build writes and the
runtime loads, and the rank table check both sides rely on.

`dsexport build --target ascend` writes these names; `runtime.backends.lite` reads them.
Neither imports the other: both import this module.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from dsflow.common.errors import DsflowError
from dsflow.common.paths import inside

RANK_TABLE_NAME = "rank_table.json"
LITE_SUFFIX = "_lite"  # rank0/prefill.mindir -> rank0/prefill_lite.mindir
PLACEHOLDER_PREFIX = "FILL-IN"


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

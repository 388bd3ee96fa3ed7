"""sha256 and sizes of written files: the manifest's checksums, shard verification and
the commands' `--json` reports all use these."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def files_with_checksums(root: Path, skip: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """Every file below `root` (names in `skip` excepted): relative path -> sha256, bytes."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file() and p.name not in skip:
            out[p.relative_to(root).as_posix()] = {"sha256": sha256_file(p),
                                                   "bytes": p.stat().st_size}
    return out

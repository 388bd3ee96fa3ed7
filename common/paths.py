"""Paths read from untrusted files stay inside the directory those files describe.

A checkpoint's `model.safetensors.index.json`, a shards index and an artifacts manifest
all name files relative to their own directory. Those names come from a file someone
else wrote: `../../home/user/.ssh/id_rsa`, `/etc/passwd` or a symlink planted in the
directory that points elsewhere must not be followed. `inside` is the one check every
reader uses (export/checkpoint/reader.py, export/weights/rank_files.py,
artifacts/manifest.py, artifacts/lite.py).

The one place a checkpoint legitimately holds symlinks that leave its directory is the
HuggingFace hub cache: `<repo>/snapshots/<rev>/model.safetensors -> ../../blobs/<sha>`.
`hub_cache_root` names that repo directory, which callers pass as the symlink bound.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Optional

from dsflow.common.errors import DsflowError


class PathEscapeError(DsflowError):
    """A path named by a file that would leave the directory it must stay in."""


def inside(directory: Path, name: object, where: str,
           error: type[DsflowError] = PathEscapeError,
           symlink_root: Optional[Path] = None) -> Path:
    """`directory / name`, refused unless it stays inside `directory`.

    `name` is what the untrusted file says (any JSON value); `where` names the entry
    for the message (e.g. "model.safetensors.index.json: tensor 'lm_head.weight'").
    Refused: a non-string or empty name, an absolute path (POSIX or Windows), a
    `..` component, and a path whose existing symlinks resolve outside `symlink_root`
    (default: `directory`). A path that does not exist yet is allowed: its caller
    reports it missing in its own words.
    """
    if not isinstance(name, str) or not name or "\0" in name:
        raise error(f"{where}: path {name!r} is not a file name")
    if (PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute()
            or PureWindowsPath(name).drive):
        raise error(f"{where}: path {name!r} is absolute; it must be relative to "
                    f"{directory}")
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if ".." in parts:
        raise error(f"{where}: path {name!r} leaves {directory} (a '..' component)")
    path = Path(directory) / name
    bound = Path(symlink_root if symlink_root is not None else directory).resolve()
    try:
        resolved = path.resolve(strict=False)
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise error(f"{where}: path {name!r} cannot be resolved ({e})") from None
    if not _is_within(resolved, bound):
        raise error(f"{where}: path {name!r} is a symlink to {resolved}, outside {bound}")
    return path


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def hub_cache_root(directory: Path) -> Optional[Path]:
    """The repo folder of a HuggingFace hub cache snapshot (`<repo>/snapshots/<rev>`,
    beside `<repo>/blobs`), whose files are symlinks into `<repo>/blobs`; else None."""
    d = Path(directory).absolute()
    repo = d.parent.parent
    if d.parent.name == "snapshots" and (repo / "blobs").is_dir():
        return repo
    return None

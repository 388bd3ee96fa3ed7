"""Reading the versioned JSON document that marks a dsflow output directory finished
(the shards index and the artifacts manifest), with one clear error
for each way it can be wrong."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dsflow.graphs.config import ModelConfig
from dsflow.common.errors import DsflowError
from dsflow.common.json_io import read_json_object


def read_json_document(path: Path, fmt: str, version: int, error: type[DsflowError],
                       unfinished: str, oldest: int = 0, rebuild: str = "") -> dict:
    """The document at `path` if it is `fmt` of a version in oldest..version;
    `unfinished` says what its absence means, `rebuild` how to replace an old one."""
    if not path.is_file():
        raise error(f"{path}: missing; {unfinished}")
    data = read_json_object(path, error)
    if data.get("format") != fmt:
        raise error(f"{path}: not a {fmt} document")
    if data.get("format_version", 0) > version:
        raise error(f"{path}: format version {data['format_version']} is newer than this "
                    f"dsflow understands ({version}); upgrade dsflow")
    if data.get("format_version", 0) < oldest:
        raise error(f"{path}: format version {data.get('format_version', 0)} is older than "
                    f"this dsflow reads ({oldest}..{version}); {rebuild}")
    return data


@dataclass(frozen=True)
class ModelDocument:
    """What the manifest and the shards index both record: the model, tp and dtype."""

    root: Path
    data: dict

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.data["model"])

    @property
    def tp(self) -> int:
        return int(self.data["tp"])

    @property
    def dtype(self) -> str:
        return self.data["dtype"]

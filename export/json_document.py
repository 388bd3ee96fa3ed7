"""Reading the versioned JSON document that marks a dsflow output directory finished
(the shards index; the artifacts manifest has the same shape), with one clear error
for each way it can be wrong."""
from __future__ import annotations

import json
from pathlib import Path

from ..graphs.errors import DsflowError


def read_json_document(path: Path, fmt: str, version: int, error: type[DsflowError],
                       unfinished: str) -> dict:
    """The document at `path` if it is `fmt` at most `version`; `unfinished` says what
    its absence means."""
    if not path.is_file():
        raise error(f"{path}: missing; {unfinished}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise error(f"{path}: not a {fmt} document")
    if data.get("format_version", 0) > version:
        raise error(f"{path}: format version {data['format_version']} is newer than this "
                    f"dsflow understands ({version}); upgrade dsflow")
    return data

"""Reading a JSON object from a file with one clear error naming the file.

It lives in dsflow.common (the lowest layer): config.json (graphs), the
artifacts manifest and the shards index read through it too."""
from __future__ import annotations

import json
from pathlib import Path

from dsflow.common.errors import DsflowError


def read_json_object(path: Path, error: type[DsflowError]) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    return data

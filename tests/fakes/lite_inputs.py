"""INPUTS hook for the fake mindspore_lite: a graph's inputs as the artifacts' manifest
records them (the signature), so the fake's get_inputs() returns what a real build of
that graph would: one tensor per input, in order, dynamic axes as -1."""
from __future__ import annotations

import json
import re
from pathlib import Path

DTYPES = {"int32": "INT32", "float16": "FLOAT16", "float32": "FLOAT32", "bfloat16": "BFLOAT16"}


def from_manifest(model_path: str) -> list:
    import mindspore_lite as fake
    path = Path(model_path).resolve()
    root = next(p for p in path.parents if (p / "manifest.json").is_file())
    rank = int(re.fullmatch(r"rank(\d+)", path.parent.name).group(1))
    kind = "prefill" if path.name.startswith("prefill") else "decode"
    data = json.loads((root / "manifest.json").read_text())
    graph = next(g for g in data["graphs"] if g["rank"] == rank and g["kind"] == kind)
    return [([d if isinstance(d, int) else -1 for d in t["shape"]],
             getattr(fake.DataType, DTYPES[t["dtype"]])) for t in graph["inputs"]]

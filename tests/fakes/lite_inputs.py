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


def zero_outputs(model_path: str, arrays: list) -> list:
    """KERNEL for the fake: outputs of the graph's recorded shapes, all zeros: a runtime
    that computes nothing, for checking that whoever compares results notices."""
    import numpy as np
    path = Path(model_path).resolve()
    root = next(p for p in path.parents if (p / "manifest.json").is_file())
    data = json.loads((root / "manifest.json").read_text())
    kv = data["kv_cache"]
    batch = arrays[0].shape[0]
    vocab = next(g for g in data["graphs"] if g["kind"] == "decode")["outputs"][0]["shape"][1]
    logits = np.zeros((batch, vocab), np.float32)
    if kv.get("cache_mode") == "resident":  # the whole caches come back (unchanged here)
        return [logits, arrays[1], arrays[-1]]
    new = 1 if path.name.startswith("decode") else arrays[0].shape[1]  # tokens per row
    shape = (kv["layers"], batch, kv["kv_heads_per_rank"], new, kv["head_dim"])
    return [logits, np.zeros(shape, np.float16), np.zeros(shape, np.float16)]

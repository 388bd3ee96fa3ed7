"""Read an exported ONNX model without loading its weights or running it.

The same report as export/pipeline/inspect_mindir.py gives for MindIR (inputs, outputs,
operator counts, parameters, communication groups), so `dsexport inspect` prints both
kinds of build alike. Operators of ONNX Runtime's contrib domain are shown as
`com.microsoft.<Op>`. Weights live in external data: their bytes are the recorded
lengths, and the data file is not read.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from dsflow.common.errors import DsflowError

# ONNX TensorProto.DataType -> (dtype name used by graphs.signatures, bytes)
DTYPES = {1: ("float32", 4), 2: ("uint8", 1), 3: ("int8", 1), 6: ("int32", 4),
          7: ("int64", 8), 10: ("float16", 2), 11: ("float64", 8), 16: ("bfloat16", 2)}


class InspectError(DsflowError):
    """A file that is not a readable ONNX model."""


def load_onnx(path: str | Path, external_data: bool = False):
    """Parse an ONNX file (graph only unless `external_data`); a damaged one is named."""
    import onnx
    from google.protobuf.message import DecodeError
    p = Path(path)
    if not p.is_file():
        raise InspectError(f"{p}: no such ONNX file")
    try:
        return onnx.load(str(p), load_external_data=external_data)
    except (DecodeError, ValueError, OSError, RuntimeError) as e:
        raise InspectError(f"{p}: not a readable ONNX model ({type(e).__name__}: {e}); "
                           "rebuild the artifacts") from None


def _shape(t) -> list[int]:
    return [d.dim_value if d.HasField("dim_value") else -1 for d in t.type.tensor_type.shape.dim]


def _value(t) -> dict:
    return {"name": t.name, "shape": _shape(t),
            "dtype": DTYPES.get(t.type.tensor_type.elem_type, ("?", 0))[0]}


def _bytes(init) -> int:
    if init.raw_data:
        return len(init.raw_data)
    for entry in init.external_data:
        if entry.key == "length":
            return int(entry.value)
    count = 1
    for d in init.dims:
        count *= d
    return count * DTYPES.get(init.data_type, ("?", 4))[1]


def inspect_onnx_graph(path: str | Path, tensors: bool = False) -> dict:
    """{"file", "inputs", "outputs", "ops", "parameters", "comm_groups"} of one model."""
    model = load_onnx(path)
    g = model.graph
    ops = Counter((f"{n.domain}.{n.op_type}" if n.domain else n.op_type) for n in g.node)
    inits = list(g.initializer)
    params: dict[str, Any] = {"count": len(inits), "bytes": sum(_bytes(i) for i in inits)}
    external = sorted({e.value for i in inits for e in i.external_data if e.key == "location"})
    if external:
        params["external_files"] = external
    if tensors:
        params["tensors"] = [{"name": i.name, "shape": list(i.dims),
                              "dtype": DTYPES.get(i.data_type, ("?", 0))[0]} for i in inits]
    return {"file": str(path), "inputs": [_value(t) for t in g.input],
            "outputs": [_value(t) for t in g.output], "ops": dict(ops),
            "parameters": params, "comm_groups": []}

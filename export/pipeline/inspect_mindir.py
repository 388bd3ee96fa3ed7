"""Read exported MindIR files (the protobuf MindSpore ships) without loading or compiling them.

What a build produced is otherwise only knowable by running it, which the Ascend graphs
cannot do on CPU. This reports, per graph: inputs and outputs (name, shape with -1 for
dynamic axes, dtype), operator counts by type, parameters (count, bytes, and on request
each name/shape/dtype) and the communication groups of collective operators.

MindIR details this relies on (MindSpore 2.10, see docs/ASCEND_GRAPHS.md):
- a node's `op_type` is "REF::<Name>:<N>", naming an entry of `ModelProto.primitives`
  whose `op_type` is the operator type; other nodes (e.g. "Constant") name it directly;
- a tuple output is one ValueInfo whose `attr_info.values[k].tensors[0]` are the
  elements, and outputs carry no user-facing names (`output<k>`, or the manifest's);
- scalar arguments of new-style primitives are inputs pointing at Constant nodes;
  old-style primitives (AllReduce) keep real attributes such as `group`;
- over 1 GB of parameters the export is `<stem>_graph.mindir` + `<stem>_variables/data_N`
  and each parameter has `external_data` (location, offset, length) instead of raw_data.
"""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from dsflow.common.errors import DsflowError

# Collective operators whose `group` attribute names a communication group.
COLLECTIVES = ("AllReduce", "AllGather", "ReduceScatter", "Broadcast", "AlltoAll",
               "AllToAll", "AlltoAllV", "Send", "Receive", "Reduce", "BatchISendIRecv")

# MindIR TensorProto.DataType name -> (dtype name used by graphs.signatures, bytes)
DTYPES = {"FLOAT": ("float32", 4), "FLOAT16": ("float16", 2), "BFLOAT16": ("bfloat16", 2),
          "DOUBLE": ("float64", 8), "FLOAT64": ("float64", 8), "INT8": ("int8", 1),
          "UINT8": ("uint8", 1), "INT16": ("int16", 2), "UINT16": ("uint16", 2),
          "INT32": ("int32", 4), "UINT32": ("uint32", 4), "INT64": ("int64", 8),
          "UINT64": ("uint64", 8), "BOOL": ("bool", 1), "COMPLEX64": ("complex64", 8),
          "COMPLEX128": ("complex128", 16)}


class InspectError(DsflowError):
    """A file that is not a readable MindIR."""


_SCHEMA = []


def _pb():
    """MindSpore's own MindIR schema (mindspore/train/mind_ir_pb2.py).

    Loaded as a standalone module when possible: it needs only protobuf, while
    `import mindspore` costs ~2 s and ~500 MB, which an inspector should not."""
    if not _SCHEMA:
        _SCHEMA.append(_load_schema())
    return _SCHEMA[0]


def _load_schema():
    import importlib.util
    import sys
    if "mindspore" not in sys.modules:
        spec = importlib.util.find_spec("mindspore")
        if spec and spec.origin:
            path = Path(spec.origin).parent / "train" / "mind_ir_pb2.py"
            mod_spec = importlib.util.spec_from_file_location("_dsflow_mind_ir_pb2", path)
            if path.is_file() and mod_spec and mod_spec.loader:
                module = importlib.util.module_from_spec(mod_spec)
                mod_spec.loader.exec_module(module)
                return module
    from mindspore.train import mind_ir_pb2
    return mind_ir_pb2


def load_model(path: str | Path):
    """Parse a MindIR file into its ModelProto (graph only: no weights are resolved)."""
    p = Path(path)
    if not p.is_file():
        raise InspectError(f"{p}: no such MindIR file")
    model = _pb().ModelProto()
    try:
        model.ParseFromString(p.read_bytes())
    except Exception as e:  # protobuf's DecodeError and friends
        raise InspectError(f"{p}: not a MindIR file ({type(e).__name__})") from None
    if not model.HasField("graph"):
        raise InspectError(f"{p}: not a MindIR file (no graph)")
    return model


def _dtype(code: int) -> tuple[str, int]:
    name = _pb().TensorProto.DataType.Name(code) if code else "UNDEFINED"
    return DTYPES.get(name, (name.lower(), 0))


def _strip_prefix(name: str) -> str:
    """'<graph prefix>:input_ids' -> 'input_ids' (exported names carry the graph's)."""
    return name.split(":", 1)[1] if ":" in name else name


def _tensor(name: str, t) -> dict:
    return {"name": name, "shape": [int(d) for d in t.dims], "dtype": _dtype(t.data_type)[0]}


def _inputs(graph) -> list[dict]:
    return [_tensor(_strip_prefix(v.name), v.tensor[0]) for v in graph.input if v.tensor]


def _outputs(graph) -> list[dict]:
    tensors = []
    for v in graph.output:
        if v.tensor:
            tensors.append(v.tensor[0])
        for value in v.attr_info.values:  # a tuple output: one ValueInfo, k elements
            tensors.extend(value.tensors[:1])
    return [_tensor(f"output{k}", t) for k, t in enumerate(tensors)]


def op_type(node, primitives: dict) -> str:
    """The operator type of a node, resolving 'REF::Name:N' through the primitives table."""
    t = node.op_type
    if t.startswith("REF::"):
        key = t[len("REF::"):]
        return primitives[key].op_type if key in primitives else key.rsplit(":", 1)[0]
    return t


def _nodes(model):
    for graph in [model.graph, *model.functions]:
        yield from graph.node


def _ops(model) -> dict[str, int]:
    prims = {p.name: p for p in model.primitives}
    counts = Counter(op_type(n, prims) for n in _nodes(model))
    return dict(sorted(counts.items()))


def _attr_value(a) -> Any:
    pb = _pb().AttributeProto
    if a.type == pb.STRING:
        return a.s.decode(errors="replace")
    if a.type in (pb.FLOAT,):
        return a.f
    if a.type in (pb.DOUBLE,):
        return a.d
    if a.type == pb.NONE:
        return None
    return a.i


def _comm_groups(model) -> list[str]:
    groups = set()
    for p in model.primitives:
        if p.op_type in COLLECTIVES:
            groups.update(str(_attr_value(a)) for a in p.attribute if a.name == "group")
    return sorted(groups)


def _param_bytes(p) -> int:
    if p.raw_data:
        return len(p.raw_data)
    if p.HasField("external_data"):
        return int(p.external_data.length)
    return math.prod(p.dims) * _dtype(p.data_type)[1]


def _parameters(model, tensors: bool) -> dict:
    params = list(model.graph.parameter)
    out: dict[str, Any] = {"count": len(params), "bytes": sum(_param_bytes(p) for p in params)}
    external = sorted({p.external_data.location for p in params if p.HasField("external_data")})
    if external:
        out["external_files"] = external
    if tensors:
        out["tensors"] = [_tensor(_strip_prefix(p.name), p) for p in params]
    return out


def inspect_graph(path: str | Path, tensors: bool = False) -> dict:
    """Describe one MindIR file (single-file or `_graph.mindir` of a split export).

    Returns {"file", "inputs", "outputs", "ops", "parameters", "comm_groups"}; with
    `tensors=True`, `parameters["tensors"]` lists every parameter's name/shape/dtype.
    Parameter bytes are the stored data lengths (raw_data, or external_data.length for
    split exports), i.e. what the weights occupy once loaded."""
    model = load_model(path)
    return {"file": str(path), "inputs": _inputs(model.graph), "outputs": _outputs(model.graph),
            "ops": _ops(model), "parameters": _parameters(model, tensors),
            "comm_groups": _comm_groups(model)}


def op_arguments(path: str | Path, op: str) -> list[list[Any]]:
    """For each node of operator type `op`: the values of its Constant inputs, in order.

    New-style primitives (PromptFlashAttention, RmsNorm, ...) export their scalar
    arguments (num_heads, scale_value, input_layout as an int, ...) this way; None
    stands for an omitted optional tensor input."""
    model = load_model(path)
    prims = {p.name: p for p in model.primitives}
    nodes = list(_nodes(model))
    constants = {n.name: n for n in nodes if n.op_type == "Constant"}
    found = []
    for n in nodes:
        if op_type(n, prims) == op:
            args = [constants[i] for i in n.input if i in constants]
            found.append([_attr_value(c.attribute[0]) if c.attribute else None for c in args])
    return found


def _with_manifest_names(graph: dict, entry: dict) -> dict:
    """Name the outputs from the manifest's signature (MindIR keeps no output names)."""
    names = [t["name"] for t in entry.get("outputs", [])]
    if len(names) == len(graph["outputs"]):
        for t, name in zip(graph["outputs"], names):
            t["name"] = name
    return graph


def inspect_artifacts(art_dir: str | Path, rank: Optional[int] = None,
                      tensors: bool = False) -> list[dict]:
    """Inspect every graph a dsflow manifest lists (or only `rank`'s), in manifest order.

    Each dict is `inspect_graph`'s plus `rank`, `graph` ("prefill"/"decode") and
    `target` from the manifest."""
    from dsflow.artifacts.manifest import ManifestError, read_manifest
    manifest = read_manifest(art_dir)
    entries = [g for g in manifest.data.get("graphs", []) if rank is None or g["rank"] == rank]
    if not entries:
        raise ManifestError(f"{manifest.root}: no graphs for rank {rank} "
                            f"(tp={manifest.tp}: ranks 0..{manifest.tp - 1})")
    out = []
    for g in entries:
        path = manifest.path(g["file"], f"rank {g['rank']} {g['kind']} graph")
        if path.suffix == ".onnx":  # --target onnx
            from dsflow.export.pipeline.inspect_onnx import inspect_onnx_graph
            info = inspect_onnx_graph(path, tensors=tensors)
        else:
            info = inspect_graph(path, tensors=tensors)
        info = {"rank": g["rank"], "graph": g["kind"], "target": manifest.target, **info}
        out.append(_with_manifest_names(info, g))
    return out

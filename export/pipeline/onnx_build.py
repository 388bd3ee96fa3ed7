"""`dsexport build --target onnx`: one rank's ONNX model, its weights and its checks.

Per rank it writes `rank<R>/model.onnx` (the graph) and `rank<R>/model.onnx.data`
(every weight, once, as ONNX external data). The one graph serves prefill and decode
(graphs/signatures.py, "inplace" mode), so the manifest lists the file under both
kinds: the weights are stored once on disk and loaded, prepacked and held once in
memory (two sessions over two graphs would each prepack their own copy of every
matrix). Each model passes `onnx.checker.check_model(full_check=True)` before the
build is declared finished.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from dsflow.common.errors import DsflowError, ExportError, OptionError
from dsflow.graphs.config import ModelConfig
from dsflow.graphs.onnx_model import ONNX_TARGET, QUANT_MODES, QuantPolicy, build_rank_graph
from dsflow.graphs.signatures import GRAPH_KINDS, INPLACE, graph_signature
from dsflow.graphs.tp_plan import weight_specs
from dsflow.export.weights.rank_files import ShardsIndex, read_rank

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
# GroupQueryAttention's CPU kernel refuses other head sizes ("head_size shall be a
# multiple of 16", measured with onnxruntime 1.32).
HEAD_DIM_MULTIPLE = 16


def check_onnx_options(tp: int, dtype: Optional[str], cache_mode: Optional[str],
                       quant: Optional[str], block_size: Optional[int] = None) -> None:
    """Options --target onnx cannot honour, refused as usage errors before any work."""
    if tp != 1:
        raise OptionError(f"--tp {tp} with --target onnx: ONNX Runtime's CPU provider has no "
                          "collective operator, so the ONNX target runs one rank; for "
                          "tensor parallelism build MindIR (--target cpu or ascend)")
    if dtype not in (None, "float32"):
        raise OptionError(f"--dtype {dtype} with --target onnx: the ONNX graphs compute in "
                          "float32; use --quant int8|int4 for smaller weights")
    if cache_mode not in (None, INPLACE):
        raise OptionError(f"--cache-mode {cache_mode} with --target onnx: the ONNX graphs "
                          "update the slot cache in place (no cache mode to choose)")
    if quant is not None and quant not in QUANT_MODES:
        raise OptionError(f"--quant {quant}: choose from {', '.join(QUANT_MODES)}")
    if block_size is not None and (block_size < 16 or block_size & (block_size - 1)):
        raise OptionError(f"--quant-block-size {block_size}: a power of two, at least 16 "
                          "(MatMulNBits)")


def check_onnx_model(cfg: ModelConfig) -> None:
    if cfg.head_dim % HEAD_DIM_MULTIPLE:
        raise ExportError(f"head_dim {cfg.head_dim} (hidden_size / num_attention_heads): "
                          "ONNX Runtime's GroupQueryAttention needs a multiple of "
                          f"{HEAD_DIM_MULTIPLE}; build this model with --target cpu")


def onnx_versions() -> dict:
    """The onnx package (needed to build); refuses a missing one in one line."""
    try:
        import onnx
    except ImportError:
        raise DsflowError("--target onnx needs the onnx package: pip install 'onnx>=1.18' "
                          "'ml_dtypes==0.5.4'") from None
    return {"onnx_version": onnx.__version__}


def export_onnx_rank(shards: ShardsIndex, rank: int, root: Path, capacity: int,
                     policy: QuantPolicy, progress: Callable) -> list[dict]:
    """Write rank `rank`'s model and weights; returns its manifest graph entries."""
    import onnx
    cfg = shards.config
    total = len(weight_specs(cfg))
    weights = {}
    for i, (name, arr) in enumerate(read_rank(shards, rank, "float32"), 1):
        weights[name] = np.array(arr, np.float32)
        progress("tensor", rank, "weights", i, total)
    model = build_rank_graph(cfg, shards.tp, weights, capacity, policy)
    del weights
    rank_dir = root / f"rank{rank}"
    rank_dir.mkdir()
    path = rank_dir / MODEL_FILE
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)
    del model
    onnx.checker.check_model(str(path), full_check=True)
    for p in (path, rank_dir / DATA_FILE):
        os.chmod(p, 0o444)  # as the MindIR files: read-only, readable by others
    progress("graph", rank, "model", 1, 1)
    rel = path.relative_to(root).as_posix()
    return [{"rank": rank, "kind": kind, "file": rel,
             **graph_signature(kind, cfg, shards.tp, "float32", INPLACE).to_dict()}
            for kind in GRAPH_KINDS]


def onnx_section(policy: QuantPolicy) -> dict:
    """The manifest's `onnx` section: the quantisation the weights carry."""
    return {"target": ONNX_TARGET, "quantization": policy.to_dict(),
            "data_file": DATA_FILE}

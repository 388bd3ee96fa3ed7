"""Export the Ascend graphs with whatever MindSpore this Python has, and check what a
Lite of the same release needs of them; prints one line per graph and a verdict.

Why: the Ascend path supports MindSpore/Lite 2.5, 2.6, 2.7 and 2.10 and exports with
the MindSpore of the host's Lite (GE's operator adapters differ between releases), but
the project's venv holds 2.10 only. Run this under another release to show the graphs
still export there, e.g. (outside the repository; dsflow installed without its pins):

    python3 -m venv /work/venv-ms27
    /work/venv-ms27/bin/pip install mindspore==2.7.2 'numpy<2'
    /work/venv-ms27/bin/python tools/verify_ascend_export.py [--json]

dsflow itself is imported from the checkout this file is in (`_use_this_checkout`), so
the other venv needs no install of it (whose pins would fight that venv's MindSpore).

Checked per exported MindIR (rank 0 of tp 1 and 2, both cache modes, both graphs),
by reading the file (export/pipeline/inspect_mindir.py), nothing compiled or run:
  - no operator without a GE adapter (KVCacheScatterUpdate);
  - the fused attention kept: PromptFlashAttention x layers (prefill),
    IncreFlashAttention x layers (decode), with inner_precise 0 (high precision) and
    num_key_value_heads = kv heads per rank among the constant arguments;
  - the graph inputs are the signature's, by name (graphs/signatures.py).
Exit 0 when every graph passes, 1 otherwise. What it cannot check: how the older GE
adapters map IFA's inputs (docs/ASCEND.md section 8); that needs a card.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

NO_GE_ADAPTER = ("KVCacheScatterUpdate",)
FUSED = {"prefill": "PromptFlashAttention", "decode": "IncreFlashAttention"}
HIGH_PRECISION = 0
# DeepSeek-Coder's shape at toy size, as tests/test_ascend_graphs.py exports it.
TINY_HF = dict(architectures=["LlamaForCausalLM"], vocab_size=1001, hidden_size=128,
               intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
               num_key_value_heads=4, rope_theta=100000.0,
               rope_scaling={"type": "linear", "factor": 4.0}, max_position_embeddings=512,
               rms_norm_eps=1e-6)


def _use_this_checkout() -> None:
    """Make `dsflow.<top>` this checkout's <top>/ (setup.py maps the top-level packages
    the same way), whatever dsflow the running Python has installed, if any."""
    package = types.ModuleType("dsflow")
    package.__path__ = [str(Path(__file__).resolve().parents[1])]
    sys.modules["dsflow"] = package


def export_rank0(root: Path, cfg, tp: int, cache_mode: str) -> dict:
    """Rank 0's graphs, as export/pipeline/build.py makes them (random weights)."""
    from dsflow.export.pipeline.mindir import export_graph
    from dsflow.graphs.kernels import TARGET_DTYPES, cache_dtype
    from dsflow.graphs.model import RankModel
    from dsflow.graphs.signatures import GRAPH_KINDS, graph_signature
    from dsflow.graphs.tp_plan import weight_specs
    dtype = TARGET_DTYPES["ascend"]
    net = RankModel(cfg, tp, dtype, target="ascend")
    rng = np.random.default_rng(0)
    net.load((s.name, rng.standard_normal(s.rank_shape(tp), dtype=np.float32) * 0.02)
             for s in weight_specs(cfg))
    out = root / f"{cache_mode}-tp{tp}"
    out.mkdir(parents=True)
    return {kind: (export_graph(net, graph_signature(kind, cfg, tp, cache_dtype("ascend", dtype),
                                                     cache_mode), out / kind),
                   graph_signature(kind, cfg, tp, cache_dtype("ascend", dtype), cache_mode))
            for kind in GRAPH_KINDS}


def check_graph(path: Path, sig, cfg, tp: int) -> list[str]:
    """What is wrong with one exported graph (empty: nothing)."""
    from dsflow.export.pipeline.inspect_mindir import inspect_graph, op_arguments
    from dsflow.graphs.tp_plan import rank_sizes
    g = inspect_graph(path)
    ops = g["ops"]
    problems = [f"{op} x{ops[op]} (no GE adapter)" for op in NO_GE_ADAPTER if op in ops]
    fused = FUSED[sig.kind]
    if ops.get(fused, 0) != cfg.num_layers:
        problems.append(f"{fused} x{ops.get(fused, 0)}, want x{cfg.num_layers}")
    kv_heads = rank_sizes(cfg, tp).kv_heads
    for args in op_arguments(path, fused):
        if args[-1] != HIGH_PRECISION:
            problems.append(f"{fused} inner_precise {args[-1]}, want {HIGH_PRECISION}")
        if kv_heads not in args:
            problems.append(f"{fused} arguments {args} lack num_key_value_heads {kv_heads}")
    names = [t["name"] for t in g["inputs"]]
    if names != list(sig.input_names()):
        problems.append(f"inputs {names}, want {list(sig.input_names())}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per graph")
    args = parser.parse_args(argv)
    _use_this_checkout()
    import mindspore as ms
    from dsflow.graphs.config import config_from_hf_dict
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    cfg = config_from_hf_dict(TINY_HF)
    failed = 0
    with tempfile.TemporaryDirectory(prefix="dsflow-verify-") as tmp:
        for cache_mode in ("window", "resident"):
            for tp in (1, 2):
                for kind, (path, sig) in export_rank0(Path(tmp), cfg, tp, cache_mode).items():
                    problems = check_graph(path, sig, cfg, tp)
                    failed += bool(problems)
                    row = {"mindspore": ms.__version__, "cache_mode": cache_mode, "tp": tp,
                           "graph": kind, "ok": not problems, "problems": problems}
                    print(json.dumps(row) if args.json else
                          f"mindspore {ms.__version__} {cache_mode:8} tp{tp} {kind:7} "
                          f"{'ok' if not problems else 'FAILED: ' + '; '.join(problems)}")
    print(f"{'all graphs pass' if not failed else f'{failed} graph(s) FAILED'} "
          f"(mindspore {ms.__version__})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Decode graph alone: ms per call at a fixed cache length (docs/BENCHMARKS.md, last table).

The end-to-end benchmark (tools/bench_decode.py) includes IPC, sampling and
detokenization; this one isolates the exported decode MindIR, which is what a change
to graphs/ can make faster or slower. Compare two builds of the graph in one process,
interleaved, because these shared 2-core machines drift by up to 2x over minutes:

    python tools/bench_decode_graph.py export /tmp/bench/before    # before the change
    python tools/bench_decode_graph.py export /tmp/bench/after     # after it
    python tools/bench_decode_graph.py time /tmp/bench/before.mindir /tmp/bench/after.mindir

Model: the 125M DeepSeek-Coder-shaped config of docs/BENCHMARKS.md (hidden 768, ffn 2048,
12 layers, 12 heads / 4 KV heads, vocab 32256), seeded random fp32 weights, tp=1,
batch 1 (--batch), kv_len 256, position 128, 2 MindSpore threads (a tp=1 worker on 2
cores). The inputs are the decode signature's: ids, positions and the K/V window.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

CONFIG = dict(vocab_size=32256, hidden_size=768, intermediate_size=2048, num_layers=12,
              num_heads=12, num_kv_heads=4, rope_theta=100000.0, rope_scaling_factor=4.0)


def export(stem: Path) -> None:
    """Export the decode graph of the current checkout's graphs/ to `<stem>.mindir`."""
    import mindspore as ms
    from dsflow.export.pipeline.mindir import export_graph
    from dsflow.graphs.config import ModelConfig
    from dsflow.graphs.model import RankModel
    from dsflow.graphs.signatures import graph_signature
    from dsflow.graphs.tp_plan import weight_specs
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    cfg = ModelConfig(**CONFIG)
    rng = np.random.default_rng(0)
    net = RankModel(cfg, 1, "float32")
    net.load((s.name, (rng.standard_normal(s.rank_shape(1), dtype=np.float32) * 0.02))
             for s in weight_specs(cfg))
    stem.parent.mkdir(parents=True, exist_ok=True)
    print(export_graph(net, graph_signature("decode", cfg, 1, "float32"), stem))


def time_graphs(paths: list[Path], rounds: int, calls: int, kv_len: int, batch: int = 1) -> None:
    """Median ms per decode call of each graph, rounds interleaved across graphs."""
    import mindspore as ms
    from mindspore import Tensor, nn
    ms.set_context(mode=ms.GRAPH_MODE, runtime_num_threads=2)
    ms.set_device("CPU")
    cfg = CONFIG
    shape = (cfg["num_layers"], batch, cfg["num_kv_heads"],
             kv_len, cfg["hidden_size"] // cfg["num_heads"])
    rng = np.random.default_rng(1)
    # decode inputs in signature (name) order: input_ids, key_window, positions, value_window
    inputs = (Tensor(np.full(batch, 123, np.int32)),
              Tensor(rng.standard_normal(shape, dtype=np.float32)),
              Tensor(np.full(batch, kv_len // 2, np.int32)),
              Tensor(rng.standard_normal(shape, dtype=np.float32)))
    graphs = [nn.GraphCell(ms.load(str(p))) for p in paths]
    for g in graphs:  # compile + warm up
        for _ in range(3):
            g(*inputs)[0].asnumpy()
    samples: list[list[float]] = [[] for _ in graphs]
    for _ in range(rounds):
        for g, s in zip(graphs, samples):
            t = time.perf_counter()
            for _ in range(calls):
                g(*inputs)[0].asnumpy()
            s.append((time.perf_counter() - t) * 1e3 / calls)
    for p, s in zip(paths, samples):
        print(f"{p}: median {statistics.median(s):.1f} ms/call "
              f"(min {min(s):.1f}, max {max(s):.1f}, {rounds} rounds x {calls} calls)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("stem", type=Path)
    t = sub.add_parser("time")
    t.add_argument("paths", type=Path, nargs="+")
    t.add_argument("--rounds", type=int, default=9)
    t.add_argument("--calls", type=int, default=20)
    t.add_argument("--kv-len", type=int, default=256)
    t.add_argument("--batch", type=int, default=1, help="rows per call (cache windows of "
                   "--kv-len each: the slot-cache decode graph)")
    args = p.parse_args()
    if args.cmd == "export":
        export(args.stem)
    else:
        time_graphs(args.paths, args.rounds, args.calls, args.kv_len, args.batch)


if __name__ == "__main__":
    main()

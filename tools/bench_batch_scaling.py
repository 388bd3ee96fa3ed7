#!/usr/bin/env python3
"""What batching can buy on this machine: one decode step at batch B against batch 1.

Continuous batching multiplies throughput only as far as a step of B sequences costs
less than B steps of one. This measures that ratio where the serving benchmark
(tools/bench_serve.py) runs, on the same 125M model and artifacts:

- "decode step": the exported decode graph through the worker backend
  (runtime/backends/mindspore.py: window gather, graph, K/V write), B rows at
  --position in a window of --kv-len;
- "matmuls only": the model's weight matrices (every projection of every layer and the
  lm_head, the same shapes) multiplied by B rows with MindSpore's MatMul, the op the
  graphs use: the arithmetic floor of a step, with no attention or glue.

From a step costing x times batch 1's follow the serving figures no scheduler can beat:
aggregate tokens/s at B streams <= B / x times one stream's, and the gap between a
stream's tokens >= x times one stream's, before any prompt is prefilled.

    python tools/bench_batch_scaling.py --workdir /tmp/dsflow-bench-serve   # ~1 minute
    python tools/bench_batch_scaling.py --workdir /tmp/dsflow-bench-serve --profile /tmp/prof
`--profile DIR` adds MindSpore's profiler's per-op-type time of the decode step at
batch 1 and at the largest batch (which ops the extra rows cost).
Needs the test extra (torch, transformers) to make the checkpoint if the workdir has none.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import model_arguments  # noqa: E402
from bench_serve import serve_artifacts  # noqa: E402


def interleaved_ms(calls: dict[int, Callable[[], object]], repeats: int) -> dict[int, float]:
    """Median ms of each call, the calls taking turns (shared VMs drift by 2x over
    minutes: every batch size must see the same machine)."""
    for fn in calls.values():
        fn()
        fn()  # compile and warm the shape
    times: dict[int, list[float]] = {b: [] for b in calls}
    for _ in range(repeats):
        for b, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[b].append(time.perf_counter() - t0)
    return {b: statistics.median(t) * 1e3 for b, t in times.items()}


def decode_calls(art: Path, batches: list[int], kv_len: int,
                 position: int) -> dict[int, Callable[[], object]]:
    """One decode step of b rows through the worker backend, for each b."""
    from dsflow.artifacts.manifest import read_manifest
    from dsflow.runtime.backends.mindspore import MindSporeBackend
    backend = MindSporeBackend(read_manifest(art), 0)
    backend.configure(max(batches), kv_len)

    def call(b: int) -> Callable[[], object]:
        slots = np.arange(b, dtype=np.int32)
        ids, pos = np.full(b, 5, np.int32), np.full(b, position, np.int32)
        return lambda: backend.decode(slots, ids, pos, kv_len)
    return {b: call(b) for b in batches}


def op_profile(call: Callable[[], object], steps: int, out: Path) -> dict[str, float]:
    """ms per step of each op type, from MindSpore's CPU profiler (its
    cpu_op_type_info CSV: total_compute_time in ms over the profiled steps)."""
    from mindspore import Profiler
    call()
    profiler = Profiler(output_path=str(out))
    for _ in range(steps):
        call()
    profiler.analyse()
    table = next(out.rglob("cpu_op_type_info_*.csv"))
    with open(table, newline="") as f:
        return {r["op_type"]: float(r["total_compute_time"]) / steps for r in csv.DictReader(f)}


def print_profiles(calls: dict, low: int, high: int, steps: int, out: Path) -> None:
    ops = {b: op_profile(calls[b], steps, out / f"batch{b}") for b in (low, high)}
    total = {b: sum(ops[b].values()) for b in ops}
    print(f"\n| op type | batch {low} ms/step | share | batch {high} ms/step | share |")
    print("|---|---|---|---|---|")
    for name in sorted(ops[high], key=lambda n: -ops[high][n])[:6]:
        a, b = ops[low].get(name, 0.0), ops[high][name]
        print(f"| {name} | {a:.1f} | {a / total[low]:.0%} | {b:.1f} | {b / total[high]:.0%} |")
    print(f"| all ops | {total[low]:.1f} | | {total[high]:.1f} | |")


def matmuls(art: Path, batches: list[int], repeats: int) -> dict[int, float]:
    """Every weight matrix of the model times B rows (random data: only time counts)."""
    import mindspore as ms
    from mindspore import Parameter, Tensor, nn, ops
    from dsflow.artifacts.manifest import read_manifest
    from dsflow.graphs.tp_plan import weight_specs
    cfg = read_manifest(art).config
    shapes = [s.rank_shape(1) for s in weight_specs(cfg)
              if len(s.rank_shape(1)) == 2 and "embed_tokens" not in s.name]
    widths = [cfg.hidden_size, cfg.intermediate_size]  # what the projections take in

    class Products(nn.Cell):
        def __init__(self):
            super().__init__()
            rng = np.random.default_rng(0)
            self.weights = ms.ParameterTuple(
                Parameter(Tensor(rng.standard_normal(shape, np.float32) * 0.02),
                          name=f"w{i}") for i, shape in enumerate(shapes))
            self.matmul = ops.MatMul(transpose_b=True)
            self.which = tuple(widths.index(shape[1]) for shape in shapes)  # 0 or 1

        def construct(self, hidden, ffn):
            total = ops.zeros((), ms.float32)
            for w, i in zip(self.weights, self.which):  # each on rows of its own width
                # one element of each product is kept, so none is optimised away and
                # only a scalar leaves the graph (as the step returns only logits)
                total = total + self.matmul(ffn if i else hidden, w)[0, 0]
            return total

    net = Products()
    rng = np.random.default_rng(1)

    def call(b: int) -> Callable[[], object]:
        x = [Tensor(rng.standard_normal((b, w), np.float32)) for w in widths]
        return lambda: net(*x).asnumpy()
    return interleaved_ms({b: call(b) for b in batches}, repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batches", default="1,2,4,8,16")
    p.add_argument("--kv-len", type=int, default=128)
    p.add_argument("--position", type=int, default=100)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--profile", type=Path, default=None,
                   help="also profile the decode step's ops into this directory")
    model_arguments(p)
    args = p.parse_args()
    import mindspore as ms
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    ms.set_context(runtime_num_threads=os.cpu_count())  # what a tp=1 worker gets
    batches = sorted({1, *(int(b) for b in args.batches.split(","))})
    art = serve_artifacts(args.workdir, args)
    calls = decode_calls(art, batches, args.kv_len, args.position)
    step = interleaved_ms(calls, args.repeats)
    floor = matmuls(art, batches, args.repeats)
    print(f"\ntp=1, {os.cpu_count()} cores, window {args.kv_len}, position {args.position}, "
          f"median of {args.repeats}; load average now {os.getloadavg()[0]:.1f}\n")
    print("| batch | decode step ms | x batch 1 | tokens/s bound (x 1 stream) | "
          "matmuls only ms | x batch 1 |")
    print("|---|---|---|---|---|---|")
    for b in batches:
        x = step[b] / step[1]
        print(f"| {b} | {step[b]:.1f} | {x:.2f} | {b / x:.2f} | {floor[b]:.1f} | "
              f"{floor[b] / floor[1]:.2f} |")
    if args.profile:
        print_profiles(calls, 1, 8 if 8 in calls else max(calls), args.repeats, args.profile)


if __name__ == "__main__":
    main()

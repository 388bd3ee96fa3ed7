#!/usr/bin/env python3
"""Window vs resident KV-cache graphs on CPU (docs/BENCHMARKS.md, "Cache modes").

The resident graphs (the Ascend default, graphs/signatures.py) take and return the
whole slot cache each step: a copy of the cache into the output plus a gather of the
batch's slots at full capacity, where the window graphs copy only what the sequences
hold. This measures what that costs where both run, on the embedded default model
(4 layers, 4 KV heads of 32, fp32: 4 KiB per cached token), both builds served by one
engine each, runs interleaved (these shared machines drift), and prints the ratio:

    python tools/bench_cache_mode.py /tmp/bench-cache --max-seq-len 4096 --max-batch 8

On a device the trade is different (a window crosses PCIe every step); see
docs/ASCEND.md section 5.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

PROMPTS = ["def quick_sort(arr):", "# parse a CSV file", "class Stack:", "import os\n"]


def artifacts(work: Path, mode: str, max_seq_len: int) -> Path:
    from dsflow.export.pipeline.build import BuildOptions, build
    from dsflow.export.pipeline.default_model import default_model_dir
    out = work / f"{mode}-{max_seq_len}"
    if not (out / "manifest.json").is_file():
        build(BuildOptions(model_dir=default_model_dir(), out=out, max_seq_len=max_seq_len,
                           cache_mode=mode))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--max-seq-len", type=int, default=4096)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from dsflow.runtime import Engine, SamplingParams
    args.work.mkdir(parents=True, exist_ok=True)
    modes = ("window", "resident")
    engines = {m: Engine(artifacts(args.work, m, args.max_seq_len), max_batch=args.max_batch)
               for m in modes}
    params = SamplingParams(max_new_tokens=args.tokens, ignore_eos=True)
    try:
        times: dict[str, list[float]] = {m: [] for m in modes}
        outputs = {}
        for i in range(args.repeats + 1):  # the first round compiles the shapes
            for m in modes:
                t0 = time.perf_counter()
                outputs[m] = [r.token_ids for r in engines[m].generate(PROMPTS, params)]
                if i:
                    times[m].append(time.perf_counter() - t0)
        same = outputs["window"] == outputs["resident"]
        print(f"{len(PROMPTS)} prompts x {args.tokens} tokens, {args.max_batch} slots x "
              f"{args.max_seq_len} positions, median of {args.repeats}:")
        for m in modes:
            print(f"  {m:9s} {statistics.median(times[m]):6.2f} s  "
                  f"({engines[m].plan.describe()})")
        ratio = statistics.median(times["resident"]) / statistics.median(times["window"])
        print(f"  resident / window = {ratio:.2f}x; same tokens: {same}")
    finally:
        for e in engines.values():
            e.close()


if __name__ == "__main__":
    main()

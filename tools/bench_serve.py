#!/usr/bin/env python3
"""Serving benchmark: N concurrent streaming clients on one Engine, continuous batching
next to one-batch-at-a-time, in the same run.

Builds (or reuses, in --workdir) the ~100M-parameter DeepSeek-Coder-shaped checkpoint of
tools/bench_decode.py, exports it at tp=1, and starts two engines on it: scheduling
"continuous" (requests join and leave the running batch at every step) and "static"
(a batch is admitted only when the previous one has finished: the old behaviour).
For each N in --clients, N threads each send --requests requests one after another
(prompts of 16..72 tokens from a fixed set, --new-tokens greedy tokens each, streamed)
and the figures of vLLM's serving benchmark are taken: aggregate output tokens/s, time
to first token (TTFT) p50/p99, inter-token latency (ITL: gap between a request's
consecutive tokens) p50/p99. Ratios are against N=1 of the same engine. Every (N,
mode) is run once untimed first, so compiles of new shapes (~0.5 s each on an idle
CPU) are not measured; then --rounds rounds run every (N, mode) in turn, so all see
the same machine (shared 2-core VMs drift by 2-3x over minutes): tokens/s is the
median over rounds, TTFT/ITL percentiles pool every round's samples.

    python tools/bench_serve.py --workdir /tmp/dsflow-bench-serve      # ~10 minutes on 2 cores
    python tools/bench_serve.py --clients 1,8 --rounds 3 --prefill-chunk 64
    python tools/bench_serve.py --clients 1,8 --rounds 3 --modes continuous --target onnx
    python tools/bench_serve.py --clients 1,8 --modes continuous --max-step-tokens 100000
                                  # no step budget: a whole chunk joins running decodes
Needs the test extra (torch, transformers) to make the checkpoint.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import model_arguments, prompt_ids, workdir_checkpoint  # noqa: E402

PROMPT_LENS = (16, 24, 32, 40, 48, 56, 64, 72)


def serve_artifacts(work: Path, args) -> Path:
    """The benchmark model's checkpoint and tp=1 artifacts in `work`, made if missing
    (also used by tools/bench_batch_scaling.py, which measures the same model)."""
    target = getattr(args, "target", "cpu")
    ckpt = workdir_checkpoint(work, args)
    art = work / ("art-serve-tp1" if target == "cpu" else f"art-serve-{target}")
    if not (art / "manifest.json").exists():
        from dsflow.export.pipeline.build import BuildOptions, build
        build(BuildOptions(model_dir=ckpt, out=art, tp=1, max_seq_len=1024, target=target))
    return art


def run_clients(engine, clients: int, requests: int, new_tokens: int) -> dict:
    """One round: raw TTFT and ITL samples (s), output tokens and wall time."""
    from dsflow.runtime import SamplingParams
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    ttft, itl, tokens = [], [], []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        start.wait()
        for r in range(requests):
            prompt = prompt_ids(PROMPT_LENS[(c * requests + r) % len(PROMPT_LENS)])
            t0 = time.perf_counter()
            stamps = [time.perf_counter() for _ in engine.submit(prompt, params)]
            with lock:
                ttft.append(stamps[0] - t0)
                itl.extend(np.diff(stamps).tolist())
                tokens.append(len(stamps))
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return {"ttft": ttft, "itl": itl, "tokens": sum(tokens), "wall": time.perf_counter() - t0}


def summary(rounds: list[dict]) -> dict:
    """Median tokens/s over rounds; TTFT and ITL percentiles over every round's samples."""
    ttft = [x for r in rounds for x in r["ttft"]]
    itl = [x for r in rounds for x in r["itl"]]
    ms = lambda xs, q: float(np.percentile(xs, q)) * 1e3  # noqa: E731
    return {"tok_s": statistics.median(r["tokens"] / r["wall"] for r in rounds),
            "ttft_p50": ms(ttft, 50), "ttft_p99": ms(ttft, 99),
            "itl_p50": ms(itl, 50), "itl_p99": ms(itl, 99)}


def table(results: dict, clients: list[int]) -> str:
    lines = ["| scheduler | clients | output tok/s | x vs 1 client | TTFT p50 / p99 (ms) | "
             "ITL p50 / p99 (ms) | ITL p99 x vs 1 client |",
             "|---|---|---|---|---|---|---|"]
    for mode in results:
        one = results[mode][clients[0]]
        for n in clients:
            r = results[mode][n]
            lines.append(f"| {mode} | {n} | {r['tok_s']:.1f} | {r['tok_s'] / one['tok_s']:.2f} | "
                         f"{r['ttft_p50']:.0f} / {r['ttft_p99']:.0f} | "
                         f"{r['itl_p50']:.0f} / {r['itl_p99']:.0f} | "
                         f"{r['itl_p99'] / one['itl_p99']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", default="1,4,8,16")
    p.add_argument("--requests", type=int, default=2, help="requests per client, in a row")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prefill-chunk", type=int, default=None)
    p.add_argument("--max-step-tokens", type=int, default=None)
    p.add_argument("--modes", default="continuous,static")
    p.add_argument("--target", choices=["cpu", "onnx"], default="cpu",
                   help="artifacts to serve: MindIR on MindSpore, or ONNX on ONNX Runtime")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every (clients, mode) this many times, interleaved")
    model_arguments(p)
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dsflow-bench-serve-"))
    art = serve_artifacts(work, args)
    from dsflow.runtime import Engine
    modes = args.modes.split(",")
    engines = {m: Engine(art, max_batch=max(clients), prefill_chunk=args.prefill_chunk,
                         max_step_tokens=args.max_step_tokens, scheduling=m) for m in modes}
    print(engines[modes[0]].plan.describe(), flush=True)
    raw: dict = {(m, n): [] for m in modes for n in clients}
    try:
        for n in clients:
            for m in modes:  # the same load untimed first: compiles its shapes
                run_clients(engines[m], n, args.requests, args.new_tokens)
        for i in range(args.rounds):
            for n in clients:
                for m in modes:
                    raw[m, n].append(run_clients(engines[m], n, args.requests, args.new_tokens))
                    r = summary(raw[m, n][-1:])
                    print(f"round {i + 1}: {m:>10} clients={n:<3} {r['tok_s']:7.1f} tok/s  "
                          f"TTFT p50 {r['ttft_p50']:.0f} ms  ITL p50 {r['itl_p50']:.0f} / p99 "
                          f"{r['itl_p99']:.0f} ms", flush=True)
    finally:
        for e in engines.values():
            e.close()
    results = {m: {n: summary(raw[m, n]) for n in clients} for m in modes}
    print(f"\n{args.requests} requests per client, {args.new_tokens} greedy tokens each, "
          f"prompts {PROMPT_LENS[0]}..{PROMPT_LENS[-1]} tokens, tp=1, {os.cpu_count()} cores, "
          f"{args.rounds} interleaved round(s); load average now {os.getloadavg()[0]:.1f}\n")
    print(table(results, clients))


if __name__ == "__main__":
    main()

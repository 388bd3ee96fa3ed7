#!/usr/bin/env python3
"""Decode benchmark: dsflow (MindSpore, tp=1 and tp=N) next to transformers, same weights.

Builds a ~100M-parameter DeepSeek-Coder-shaped checkpoint (random weights, fp32),
exports it with dsflow, then measures in this one run:
  - cold start: process start -> first generated token (a fresh process each);
  - prefill ms for the prompt, decode ms/token (warm: shapes compiled by a first run;
    median of --repeat runs);
  - peak RSS per process (per rank for dsflow).
transformers is the reference: its own KV-cache loop (prefill forward, then one
forward per token, greedy), fp32, torch CPU threads = cores. Ratios are dsflow /
transformers (< 1 is faster / smaller).

    python tools/bench_decode.py                     # about 5 minutes on 2 cores
    python tools/bench_decode.py --tp 1,2,4 --layers 12 --new-tokens 64
Needs the test extra (torch, transformers): pip install -e '.[test]'.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOKENIZER_ENV = "DSFLOW_BENCH_TOKENIZER"


def make_checkpoint(path: Path, args) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from dsflow.export.default_model import ensure_default_model
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32256, hidden_size=args.hidden, intermediate_size=args.ffn,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, rope_theta=100000.0,
                      rope_scaling={"type": "linear", "factor": 4.0},
                      max_position_embeddings=4096, tie_word_embeddings=False,
                      bos_token_id=32013, eos_token_id=32021)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path, safe_serialization=True)
    tok = ensure_default_model()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (path / f).write_bytes((tok / f).read_bytes())
    n = sum(p.numel() for p in model.parameters())
    print(f"checkpoint: {n / 1e6:.0f}M parameters, {args.layers} layers, hidden {args.hidden}, "
          f"{args.heads} heads / {args.kv_heads} KV heads", flush=True)


def prompt_ids(n: int) -> list[int]:
    return [32013] + [(7919 * i) % 30000 + 100 for i in range(n - 1)]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- measured in child processes -------------------------------------------------
def child_hf(args) -> dict:
    t0 = float(os.environ["BENCH_T0"])
    import torch
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(args.ckpt, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids(args.prompt_len)])

    def run(n_new: int) -> tuple[float, float, list[int]]:
        with torch.no_grad():
            t = time.perf_counter()
            out = model(ids, use_cache=True)
            prefill = time.perf_counter() - t
            cache, tok, toks = out.past_key_values, out.logits[:, -1].argmax(-1), []
            t = time.perf_counter()
            for _ in range(n_new - 1):
                toks.append(int(tok))
                out = model(tok[:, None], past_key_values=cache, use_cache=True)
                cache, tok = out.past_key_values, out.logits[:, -1].argmax(-1)
            return prefill * 1e3, (time.perf_counter() - t) * 1e3 / max(n_new - 1, 1), toks

    run(1)
    ttft = time.time() - t0
    samples = [run(args.new_tokens) for _ in range(args.repeat)]
    return {"ttft_s": ttft, "prefill_ms": statistics.median(s[0] for s in samples),
            "decode_ms": statistics.median(s[1] for s in samples), "rss_mb": [peak_rss_mb()],
            "tokens": samples[0][2]}


def child_dsflow(args) -> dict:
    t0 = float(os.environ["BENCH_T0"])
    from dsflow.runtime import Engine, SamplingParams
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    with Engine(args.artifacts) as engine:
        next(iter(engine.stream(prompt_ids(args.prompt_len), params)))
        ttft = time.time() - t0
        for _ in engine.stream(prompt_ids(args.prompt_len), params):  # finish compiling shapes
            pass
        runs = [engine.generate(prompt_ids(args.prompt_len), params)[0] for _ in range(args.repeat)]
    stats = engine.cluster.final_stats
    return {"ttft_s": ttft, "prefill_ms": statistics.median(r.prefill_ms for r in runs),
            "decode_ms": statistics.median(r.decode_ms_per_token for r in runs),
            "rss_mb": [s["rss_peak_bytes"] / 2**20 for s in stats],
            "tokens": runs[0].token_ids[:-1]}


def run_child(kind: str, args, **extra) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--ckpt", str(args.ckpt),
           "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
           "--repeat", str(args.repeat)]
    for k, v in extra.items():
        cmd += [f"--{k}", str(v)]
    env = dict(os.environ, BENCH_T0=repr(time.time()))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{kind} benchmark failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[tuple[str, dict]], ref: dict) -> str:
    head = ("| run | command to first token (s) | prefill ms | decode ms/token | "
            "decode ratio vs HF | peak RSS per process (MB) |\n|---|---|---|---|---|---|")
    lines = [head]
    for name, r in rows:
        lines.append(f"| {name} | {r['ttft_s']:.1f} | {r['prefill_ms']:.1f} | "
                     f"{r['decode_ms']:.1f} | {r['decode_ms'] / ref['decode_ms']:.2f} | "
                     f"{', '.join(f'{m:.0f}' for m in r['rss_mb'])} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tp", default="1,4", help="comma-separated tp degrees (default 1,4)")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--child", choices=["hf", "dsflow"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--artifacts", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        result = child_hf(args) if args.child == "hf" else child_dsflow(args)
        print(json.dumps(result))
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dsflow-bench-"))
    args.ckpt = work / "ckpt"
    if not (args.ckpt / "config.json").exists():
        make_checkpoint(args.ckpt, args)
    from dsflow.export.build import BuildOptions, build
    rows = []
    ref = run_child("hf", args)
    rows.append(("transformers (torch, reference)", ref))
    for tp in [int(t) for t in args.tp.split(",")]:
        art = work / f"art-tp{tp}"
        if not (art / "manifest.json").exists():
            build(BuildOptions(model_dir=args.ckpt, out=art, tp=tp))
        r = run_child("dsflow", args, artifacts=art)
        same = r["tokens"] == ref["tokens"][:len(r["tokens"])]
        rows.append((f"dsflow tp={tp}" + ("" if same else " (TOKENS DIFFER)"), r))
    print(f"\nprompt {args.prompt_len} tokens, {args.new_tokens} greedy new tokens, batch 1, "
          f"{os.cpu_count()} cores, median of {args.repeat}\n")
    print(table(rows, ref))


if __name__ == "__main__":
    main()

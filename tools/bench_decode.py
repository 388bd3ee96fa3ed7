#!/usr/bin/env python3
"""Decode benchmark: dsflow (MindSpore, tp=1 and tp=N) next to transformers, same weights.

Builds a ~100M-parameter DeepSeek-Coder-shaped checkpoint (random weights, fp32),
exports it with dsflow, then measures in this one run:
  - cold start: process start -> first generated token (a fresh process each);
  - prefill ms for the prompt, decode ms/token (warm: shapes compiled by a first run;
    median of --repeat runs, interleaved across contenders);
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
from typing import Optional


def make_checkpoint(path: Path, args) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from dsflow.export.pipeline.default_model import default_model_dir
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32256, hidden_size=args.hidden, intermediate_size=args.ffn,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, rope_theta=100000.0,
                      rope_scaling={"type": "linear", "factor": 4.0},
                      max_position_embeddings=4096, tie_word_embeddings=False,
                      bos_token_id=32013, eos_token_id=32021)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path, safe_serialization=True)
    tok = default_model_dir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (path / f).write_bytes((tok / f).read_bytes())
    n = sum(p.numel() for p in model.parameters())
    print(f"checkpoint: {n / 1e6:.0f}M parameters, {args.layers} layers, hidden {args.hidden}, "
          f"{args.heads} heads / {args.kv_heads} KV heads", flush=True)


def workdir_checkpoint(work: Path, args) -> Path:
    """The benchmark checkpoint in `work` (work/ckpt), made if missing: one model shared
    by the tools that take a --workdir (bench_decode, bench_serve, bench_onnx)."""
    ckpt = work / "ckpt"
    if not (ckpt / "config.json").exists():
        make_checkpoint(ckpt, args)
    return ckpt


def shared_tokenizer() -> Optional[Path]:
    """The real DeepSeek-Coder tokenizer files: $DSFLOW_SHARED/models, else shared/models
    beside or above the checkout (as tests/conftest.py finds it); None if absent."""
    roots = [Path(os.environ["DSFLOW_SHARED"])] if os.environ.get("DSFLOW_SHARED") else []
    roots += [p / "shared" for p in Path(__file__).resolve().parents[1].parents]
    for root in roots:
        path = root / "models" / "deepseek-coder-tokenizer"
        if path.is_dir():
            return path
    return None


def prompt_ids(n: int) -> list[int]:
    return [32013] + [(7919 * i) % 30000 + 100 for i in range(n - 1)]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_now_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


# ---- measured in child processes ---------------------------------------------------
# A child loads its model, reports its cold start, then answers "run" lines on stdin
# with one measured generation each, and "exit" with its peak RSS. The parent
# interleaves the children's runs, so every contender sees the same machine state
# (these shared 2-core machines vary by 2x over minutes).

def hf_session(args):
    import torch
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(args.ckpt, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids(args.prompt_len)])

    def run(n_new: int) -> dict:
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
            return {"prefill_ms": prefill * 1e3, "tokens": toks,
                    "decode_ms": (time.perf_counter() - t) * 1e3 / max(n_new - 1, 1)}
    run(1)
    return run, lambda: [(peak_rss_mb(), rss_now_mb())]


def dsflow_session(args):
    from dsflow.runtime import Engine, SamplingParams
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    engine = Engine(args.artifacts)
    next(iter(engine.stream(prompt_ids(args.prompt_len), params)))

    def run(n_new: int) -> dict:
        r = engine.generate(prompt_ids(args.prompt_len), params)[0]
        return {"prefill_ms": r.prefill_ms, "decode_ms": r.decode_ms_per_token,
                "tokens": r.token_ids[:-1]}

    def rss() -> list:
        engine.close()
        return [(s["rss_peak_bytes"] / 2**20, s["rss_bytes"] / 2**20)
                for s in engine.cluster.final_stats]
    return run, rss


def child_main(args) -> None:
    t0 = float(os.environ["BENCH_T0"])
    run, rss = (hf_session if args.child == "hf" else dsflow_session)(args)
    print(json.dumps({"ttft_s": time.time() - t0}), flush=True)
    for line in sys.stdin:
        if line.strip() == "run":
            print(json.dumps(run(args.new_tokens)), flush=True)
        else:
            print(json.dumps({"rss_mb": rss()}), flush=True)
            return


class Contender:
    def __init__(self, name: str, kind: str, args, **extra):
        cmd = [sys.executable, __file__, "--child", kind, "--ckpt", str(args.ckpt),
               "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens)]
        for k, v in extra.items():
            cmd += [f"--{k}", str(v)]
        self.name, self.runs = name, []
        self.proc = subprocess.Popen(cmd, env=dict(os.environ, BENCH_T0=repr(time.time())),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ttft_s = self._read()["ttft_s"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            sys.exit(f"{self.name}: benchmark child failed (exit {self.proc.wait()})")
        return json.loads(line)

    def run(self) -> None:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        self.runs.append(self._read())

    def finish(self) -> dict:
        self.proc.stdin.write("exit\n")
        self.proc.stdin.flush()
        rss = self._read()["rss_mb"]
        self.proc.wait()
        return {"ttft_s": self.ttft_s, "rss_mb": rss,
                "prefill_ms": statistics.median(r["prefill_ms"] for r in self.runs),
                "decode_ms": statistics.median(r["decode_ms"] for r in self.runs),
                "tokens": self.runs[0]["tokens"]}


def table(rows: list[tuple[str, dict]], ref: dict) -> str:
    head = ("| run | command to first token (s) | prefill ms | decode ms/token | "
            "decode ratio vs HF | RSS per process, peak / at end (MB) |\n|---|---|---|---|---|---|")
    lines = [head]
    for name, r in rows:
        lines.append(f"| {name} | {r['ttft_s']:.1f} | {r['prefill_ms']:.1f} | "
                     f"{r['decode_ms']:.1f} | {r['decode_ms'] / ref['decode_ms']:.2f} | "
                     f"{', '.join(f'{p:.0f} / {n:.0f}' for p, n in r['rss_mb'])} |")
    return "\n".join(lines)


def model_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark model's shape (default: the ~125M configuration); make_checkpoint
    reads these."""
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tp", default="1,4", help="comma-separated tp degrees (default 1,4)")
    model_arguments(p)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--child", choices=["hf", "dsflow"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--artifacts", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child_main(args)
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dsflow-bench-"))
    args.ckpt = workdir_checkpoint(work, args)
    from dsflow.export.pipeline.build import BuildOptions, build
    tps = [int(t) for t in args.tp.split(",")]
    for tp in tps:
        art = work / f"art-tp{tp}"
        if not (art / "manifest.json").exists():
            build(BuildOptions(model_dir=args.ckpt, out=art, tp=tp))
    # started one at a time, so each cold start has the machine to itself
    contenders = [Contender("transformers (torch, reference)", "hf", args)]
    contenders += [Contender(f"dsflow tp={tp}", "dsflow", args, artifacts=work / f"art-tp{tp}")
                   for tp in tps]
    for _ in range(args.repeat):
        for c in contenders:
            c.run()
    results = [(c.name, c.finish()) for c in contenders]
    ref = results[0][1]
    rows = [(name if r["tokens"] == ref["tokens"][:len(r["tokens"])] else
             name + " (TOKENS DIFFER)", r) for name, r in results]
    print(f"\nprompt {args.prompt_len} tokens, {args.new_tokens} greedy new tokens, batch 1, "
          f"{os.cpu_count()} cores, median of {args.repeat} interleaved runs\n")
    print(table(rows, ref))


if __name__ == "__main__":
    main()

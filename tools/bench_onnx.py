#!/usr/bin/env python3
"""Decode speed of the ONNX target against dsflow's MindSpore artifacts and
onnxruntime-genai's model builder, on the same 125M checkpoint (tools/bench_decode.py's
shape: hidden 768, 12 layers, 12 heads / 4 KV heads, intermediate 2048, vocab 32256).

Every contender runs in a process of its own (one library per process: two thread
pools in one process steal each other's cores), loads its model, prefills --batch rows of
a --prompt-len prompt and then waits. The parent asks each in turn for --steps decode
steps at batch B (A, B, C, then B, C, A, ...: every contender sees the same machine), for
--rounds rounds, all of that --epochs times with fresh processes (one process can be ~10%
off for its whole life), and reports the median step time over every round. dsflow
contenders are measured at the worker backend (runtime/backends/*.py: what a worker runs
per step, slot cache included); onnxruntime-genai through its Generator
(generate_next_token).

Contenders (--contenders, comma-separated):
  onnx-fp32, onnx-int8, onnx-int4   dsflow --target onnx [--quant], the backend's default
                                    thread spinning (bounded, DSFLOW_ORT_SPIN)
  onnx-fp32-nospin, onnx-fp32-spin  the same with spinning off / unbounded ("on")
  onnx-int4-b32 (any quant, -bN)    a quantisation block size other than the default
  mindspore                         dsflow --target cpu (MindIR on MindSpore)
  genai-fp32, genai-int4            onnxruntime-genai's builder output (-e cpu); needs
                                    `pip install onnxruntime-genai` (a reference only)
  matvec-fp32                       the memory floor: numpy matrix-vector products over
                                    the weights an fp32 step reads, nothing else
  llama-f32, llama-f16, llama-q8_0, llama-q4_0
                                    llama.cpp on GGUFs of the same checkpoint, run by
                                    tools/bench_llamacpp.py's --child under --llama-py (its
                                    own venv; see that file); each request there is a fresh
                                    prefill then --steps timed steps (each with the argmax)
Also `--rss`: resident memory of a serving engine's worker on the fp32 ONNX artifacts
after 8 concurrent requests, against weight bytes + KV-cache bytes.

    python tools/bench_onnx.py --workdir /tmp/dsflow-bench-serve            # ~10 min
    python tools/bench_onnx.py --workdir /tmp/dsflow-bench-serve --rss --contenders onnx-fp32
Needs the test extra (torch, transformers) to make the checkpoint if the workdir has none.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import (model_arguments, prompt_ids, shared_tokenizer,  # noqa: E402
                          workdir_checkpoint)

DEFAULT = "onnx-fp32,onnx-fp32-nospin,onnx-int8,onnx-int4,mindspore,genai-fp32,genai-int4"
SPIN = {"nospin": "off", "spin": "on"}  # contender suffix -> DSFLOW_ORT_SPIN setting
LLAMA_TOOL = Path(__file__).resolve().parent / "bench_llamacpp.py"


# ---- artifacts (parent) ----------------------------------------------------------------
def llama_files(work: Path, formats: list[str], args) -> dict[str, Path]:
    """GGUFs of the checkpoint, made (or found fresh) by bench_llamacpp.py --prepare."""
    if not args.llama_py:
        sys.exit("bench_onnx: llama-* contenders need --llama-py (or DSFLOW_LLAMA_PY): the "
                 "python of a venv with llama-cpp-python, see tools/bench_llamacpp.py")
    cmd = [args.llama_py, str(LLAMA_TOOL), "--ckpt", str(workdir_checkpoint(work, args)),
           "--workdir", str(work / "llamacpp"), "--formats", ",".join(formats), "--threads",
           str(args.threads), "--prepare", "--json", "-"]
    if args.llama_tokenizer:
        cmd += ["--tokenizer", str(args.llama_tokenizer)]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        sys.exit(f"bench_onnx: {' '.join(cmd)} failed (exit {out.returncode})")
    report = json.loads(out.stdout)
    return {f: Path(report["formats"][f]["file"]) for f in formats}


def artifacts(work: Path, contender: str, args) -> Path:
    """The contender's model directory in `work`, built if missing."""
    ckpt = workdir_checkpoint(work, args)
    from dsflow.export.pipeline.build import BuildOptions, build
    if contender == "matvec-fp32":
        return ckpt
    if contender == "mindspore":
        out = work / "art-serve-tp1"  # the one tools/bench_serve.py builds
        if not (out / "manifest.json").exists():
            build(BuildOptions(model_dir=ckpt, out=out, tp=1, max_seq_len=1024))
        return out
    if contender.startswith("onnx-"):
        quant, *rest = contender.split("-")[1:]
        block = next((int(r[1:]) for r in rest if r[:1] == "b" and r[1:].isdigit()), None)
        if quant == "fp32":
            out = work / "art-onnx-fp32"
        else:
            from dsflow.graphs.onnx_model import DEFAULT_BLOCK_SIZE
            block = block or DEFAULT_BLOCK_SIZE
            out = work / f"art-onnx-{quant}-b{block}"
        if not (out / "manifest.json").exists():
            build(BuildOptions(model_dir=ckpt, out=out, target="onnx", max_seq_len=1024,
                               quant=None if quant == "fp32" else quant,
                               quant_block_size=None if quant == "fp32" else block))
        return out
    precision = contender.split("-")[1]
    out = work / f"genai-{precision}"
    if not (out / "genai_config.json").exists():
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt),
                        "-o", str(out), "-p", precision, "-e", "cpu",
                        "-c", str(work / "genai-cache")], check=True,
                       stdout=subprocess.DEVNULL)
    return out


# ---- runners (child) ------------------------------------------------------------------------
class BackendRunner:
    """A dsflow worker backend: slots 0..batch-1 prefilled, decode steps on the first b."""

    def __init__(self, contender: str, path: Path, batch: int, prompt: list[int]):
        from dsflow.artifacts.manifest import read_manifest
        manifest = read_manifest(path)
        if contender == "mindspore":
            from dsflow.runtime.backends.mindspore import MindSporeBackend, init_mindspore
            init_mindspore(1)
            self.backend = MindSporeBackend(manifest, 0)
        else:
            from dsflow.runtime.backends.onnxrt import OnnxRuntimeBackend
            suffix = contender.rsplit("-", 1)[-1]
            self.backend = OnnxRuntimeBackend(manifest, 0, spin=SPIN.get(suffix))
        self.backend.configure(batch, 1024)
        n = len(prompt)
        self.prompt_len = n
        for s in range(batch):
            self.backend.prefill(np.array([s], np.int32), np.array([prompt], np.int32),
                                 np.array([0], np.int32), np.array([n], np.int32), n)

    def steps(self, b: int, count: int) -> list[float]:
        slots = np.arange(b, dtype=np.int32)
        times = []
        for i in range(count):
            pos = np.full(b, self.prompt_len + i, np.int32)
            t0 = time.perf_counter()
            self.backend.decode(slots, np.full(b, 5, np.int32), pos,
                                self.prompt_len + count)
            times.append(time.perf_counter() - t0)
        return times


class MatvecRunner:
    """The memory floor of an fp32 decode step: numpy (OpenBLAS) multiplies the step's
    rows by every matrix a step reads (the checkpoint's linear layers and the lm_head,
    fp32, in layer order) and nothing else. A batch-1 step is a matrix-vector product
    per weight, bound by how fast the weights stream from memory: a runner within a few
    percent of this line cannot get faster without reading fewer bytes."""

    def __init__(self, ckpt: Path):
        from safetensors.numpy import load_file
        weights = {}
        for f in sorted(ckpt.glob("*.safetensors")):
            weights.update(load_file(f))
        self.mats = [np.ascontiguousarray(w.T, np.float32) for name, w in weights.items()
                     if w.ndim == 2 and "embed_tokens" not in name]

    def steps(self, b: int, count: int) -> list[float]:
        x = np.ones((b, max(m.shape[0] for m in self.mats)), np.float32)
        times = []
        for _ in range(count):
            t0 = time.perf_counter()
            for m in self.mats:
                x[:, :m.shape[0]] @ m
            times.append(time.perf_counter() - t0)
        return times


class GenaiRunner:
    """onnxruntime-genai's Generator: a fresh generator per measurement (its batch is
    fixed at creation), prompt appended untimed, then timed generate_next_token calls."""

    def __init__(self, path: Path, prompt: list[int]):
        import onnxruntime_genai as og
        self.og, self.model, self.prompt = og, og.Model(str(path)), prompt

    def steps(self, b: int, count: int) -> list[float]:
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(batch_size=b, max_length=len(self.prompt) + count + 2,
                                  do_sample=False)
        gen = og.Generator(self.model, params)
        gen.append_tokens(np.array([self.prompt] * b, np.int32))
        times = []
        for _ in range(count):
            t0 = time.perf_counter()
            gen.generate_next_token()
            times.append(time.perf_counter() - t0)
        return times


def child(args) -> None:
    prompt = prompt_ids(args.prompt_len)
    path = Path(args.path)
    if args.child.startswith("genai"):
        runner = GenaiRunner(path, prompt)
    elif args.child == "matvec-fp32":
        runner = MatvecRunner(path)
    else:
        runner = BackendRunner(args.child, path, max(args.batches_list), prompt)
    rss = int(next(line.split()[1] for line in open("/proc/self/status")
                   if line.startswith("VmRSS:"))) * 1024
    print(json.dumps({"ready": True, "rss": rss}), flush=True)
    for line in sys.stdin:
        b = int(line)
        print(json.dumps({"times": runner.steps(b, args.steps)}), flush=True)


# ---- parent -----------------------------------------------------------------------------
def start(contender: str, path: Path, args) -> subprocess.Popen:
    if contender.startswith("llama-"):  # bench_llamacpp.py speaks the same protocol
        cmd = [args.llama_py, str(LLAMA_TOOL), "--child", contender[len("llama-"):],
               "--threads", str(args.threads)]
    else:
        cmd = [sys.executable, __file__, "--child", contender]
    cmd += ["--path", str(path), "--batches", args.batches, "--steps", str(args.steps),
            "--prompt-len", str(args.prompt_len)]
    env = dict(os.environ, DSFLOW_THREADS=str(args.threads),
               OPENBLAS_NUM_THREADS=str(args.threads))
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env)
    ready = json.loads(proc.stdout.readline())
    print(f"{contender}: ready, RSS {ready['rss'] / 2**20:.0f} MiB", flush=True)
    return proc


def ask(proc: subprocess.Popen, b: int) -> list[float]:
    proc.stdin.write(f"{b}\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())["times"]


def rss_check(work: Path, args) -> None:
    """Worker RSS of an Engine serving 8 requests on the fp32 ONNX artifacts."""
    from dsflow.runtime import Engine, SamplingParams
    art = artifacts(work, "onnx-fp32", args)
    weights = (art / "rank0" / "model.onnx.data").stat().st_size
    with Engine(art, max_batch=8, max_seq_len=1024) as engine:
        params = SamplingParams(max_new_tokens=64, ignore_eos=True)
        handles = [engine.submit(prompt_ids(64 + 8 * i), params) for i in range(8)]
        for h in handles:
            h.result()
        rss = engine.cluster.request("stats", {})[0]["rss_bytes"]
        kv = engine.plan.slots * engine.plan.capacity * engine.manifest.kv_bytes_per_token
    print(f"\nserving worker RSS {rss / 2**20:.0f} MiB; weights {weights / 2**20:.0f} MiB + KV "
          f"cache {kv / 2**20:.0f} MiB ({engine.plan.slots} x {engine.plan.capacity}) = "
          f"{(weights + kv) / 2**20:.0f} MiB; ratio {rss / (weights + kv):.2f}; load "
          f"{os.getloadavg()[0]:.1f}")


def spread(values: list[float]) -> str:
    return f"{min(values):.1f}-{max(values):.1f}"


def run_epoch(names: list[str], paths: dict, args, loads: list[float]) -> dict:
    """One process per contender, warmed, then --rounds rounds; each round starts at the
    next contender (rotation: no contender always runs first or after the same one).
    Fresh processes each epoch because one process's speed stays off by up to ~10% for
    its whole life (the same model in two processes: 15.2 vs 16.8 ms/step on this host,
    stable across rounds; its memory placement, presumably), which rounds cannot average
    out and processes can."""
    procs = {c: start(c, paths[c], args) for c in names}
    times: dict = {(c, b): [] for c in names for b in args.batches_list}
    # --busy N: N spinning processes beside the contenders, a host shared with others
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(args.busy)]
    try:
        for c in names:  # warm every shape untimed
            for b in args.batches_list:
                ask(procs[c], b)
        for r in range(args.rounds):
            loads.append(os.getloadavg()[0])
            order = names[r % len(names):] + names[:r % len(names)]
            for b in args.batches_list:
                for c in order:
                    times[c, b].append(statistics.median(ask(procs[c], b)))
            print(f"round {r + 1}: " + "  ".join(
                f"{c}@{b} {times[c, b][-1] * 1e3:.1f}" for b in args.batches_list for c in names),
                flush=True)
    finally:
        for proc in busy:
            proc.kill()
        for proc in procs.values():
            proc.stdin.close()
            proc.wait(60)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--contenders", default=DEFAULT)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5, help="rounds per epoch")
    p.add_argument("--epochs", type=int, default=3,
                   help="each with fresh contender processes (see run_epoch)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--workdir", type=Path, default=Path("/tmp/dsflow-bench-serve"))
    p.add_argument("--rss", action="store_true")
    p.add_argument("--busy", type=int, default=0, metavar="N",
                   help="run N busy-looping processes during the rounds (a shared host)")
    p.add_argument("--llama-py", default=os.environ.get("DSFLOW_LLAMA_PY"),
                   help="python of the llama-cpp-python venv (llama-* contenders)")
    # the original files: the GGUF converter hashes the pre-tokenizer's output
    p.add_argument("--llama-tokenizer", type=Path, default=shared_tokenizer(),
                   help="original DeepSeek-Coder tokenizer files for the GGUF converter")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    model_arguments(p)
    args = p.parse_args()
    args.batches_list = [int(b) for b in args.batches.split(",")]
    if args.child:
        child(args)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    names = [c for c in args.contenders.split(",") if c]
    known = re.compile(r"(onnx-(fp32|int8|int4)(-b\d+)?(-nospin|-spin)?|mindspore|matvec-fp32"
                       r"|genai-(fp32|int4)|llama-(f32|f16|q8_0|q4_0))$")
    unknown = [c for c in names if not known.match(c)]
    if unknown or not names:
        p.error(f"--contenders: {','.join(unknown) or 'none given'} (see the list above)")
    if args.rounds < 1 or args.epochs < 1:
        p.error("--rounds and --epochs must be at least 1")
    workdir_checkpoint(args.workdir, args)
    formats = [c[len("llama-"):] for c in names if c.startswith("llama-")]
    paths = {c: artifacts(args.workdir, c, args) for c in names if not c.startswith("llama-")}
    if formats:
        paths.update({f"llama-{f}": path
                      for f, path in llama_files(args.workdir, formats, args).items()})
    times: dict = {(c, b): [] for c in names for b in args.batches_list}
    per_process: dict = {(c, b): [] for c in names for b in args.batches_list}
    loads: list[float] = []
    for epoch in range(args.epochs):
        print(f"epoch {epoch + 1} of {args.epochs}: fresh processes", flush=True)
        epoch_times = run_epoch(names, paths, args, loads)
        for key, samples in epoch_times.items():
            times[key] += samples
            per_process[key].append(statistics.median(samples) * 1e3)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    ms = med.get(("mindspore", 1))
    ga = med.get(("genai-fp32", 1))
    print(f"\n{args.threads} threads, {args.busy} busy processes, prompt {args.prompt_len}, "
          f"median step of {args.steps} steps, median over {args.epochs} x {args.rounds} "
          f"interleaved rounds ({args.epochs} processes per contender); load average "
          f"{min(loads):.1f}-{max(loads):.1f} during the rounds\n")
    cols = " | ".join(f"batch {b} ms/step" for b in args.batches_list)
    print(f"| contender | {cols} | b1 x MindSpore | b1 x genai fp32 |")
    print("|---|" + "---|" * (len(args.batches_list) + 2))
    for c in names:
        row = " | ".join(f"{med[c, b]:.1f} ({spread(per_process[c, b])})"
                         for b in args.batches_list)
        x_ms = f"{med[c, 1] / ms:.2f}" if ms and 1 in args.batches_list else "-"
        x_ga = f"{med[c, 1] / ga:.2f}" if ga and 1 in args.batches_list else "-"
        print(f"| {c} | {row} | {x_ms} | {x_ga} |")
    print("(in brackets: the lowest and highest of the per-process medians)")
    if args.rss:
        rss_check(args.workdir, args)


if __name__ == "__main__":
    main()

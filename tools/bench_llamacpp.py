#!/usr/bin/env python3
"""llama.cpp reference for dsflow's decode benchmarks (issue 19: "int8 and int4 at or below
llama.cpp's q8_0 and q4_0 on the same weights").

RUN IT WITH THE LLAMA VENV'S PYTHON, not dsflow's: it needs llama-cpp-python (built from
its sdist), transformers 4.57.x (the vendored converter refuses the DeepSeek-Coder
pre-tokenizer under 5.x), torch and numpy<2, and it never imports dsflow. Setup and
build log: docs/BENCHMARKS.md, section "llama.cpp reference".

    /work/venv-llama/bin/python tools/bench_llamacpp.py --ckpt /tmp/dsflow-bench-serve/ckpt \
        --tokenizer ../shared/models/deepseek-coder-tokenizer
    /work/venv-llama/bin/python tools/bench_llamacpp.py --ckpt DIR --json -     # JSON on stdout

Given a LlamaForCausalLM checkpoint directory (DeepSeek-Coder shape; e.g. the 125M one that
tools/bench_serve.py and tools/bench_onnx.py make in WORKDIR/ckpt), it
1. converts it to GGUF f32 and f16 with llama.cpp's own convert_hf_to_gguf.py (the copy
   vendored in the llama-cpp-python sdist) and quantises the f32 file to q8_0 and q4_0
   with llama_cpp.llama_model_quantize (what the llama-quantize CLI calls; its defaults,
   so output.weight becomes q6_K in q4_0: the table lists the tensor types). Files go to
   --workdir (default: a "llamacpp" folder beside the checkpoint) and are reused while
   newer than the checkpoint's weights;
2. checks every GGUF keeps the checkpoint's rope (type, factor, theta: GGUF metadata) and
   compares greedy tokens and logits with transformers (fp32) on the same prompt, plus a
   control: transformers with the rope scaling removed, which a correct GGUF must NOT
   match. f32 must match (all --check-tokens tokens, logits within --tol of the largest
   logit: llama.cpp's defaults, f16 KV cache and flash attention, cost ~1e-3 of it;
   `--kv-type f32 --flash-attn off` matches to ~1e-6) or it exits 1;
3. measures batch-B decode (default B=1; prompt --prompt-len, --new-tokens greedy tokens:
   the first comes from the prefill, each other from one llama_decode step, timed with
   reading the logits and the argmax), one process per format (one library per process),
   formats taking turns for --runs rounds; reports the median over runs of each run's mean
   ms/token, with the load average during the rounds.

Threads: --threads for llama.cpp's n_threads and n_threads_batch. OMP_WAIT_POLICY is
left to the environment (PASSIVE makes llama.cpp 3-6x slower on 2 cores; the JSON
records it).

Interface for other benchmarks (tools/bench_onnx.py runs dsflow's venv):
- one shot: `LLAMA_PY tools/bench_llamacpp.py --ckpt DIR --json -` prints one JSON object
  on stdout (progress goes to stderr); exit 0 ok, 1 failure (one line on stderr), 2 usage.
- interleaved: `LLAMA_PY tools/bench_llamacpp.py --child q4_0 --path FILE.gguf --steps N
  --prompt-len P --batches 1,8 --threads T` speaks bench_onnx's child protocol: one JSON
  line {"ready": true, "rss": bytes, ...} once loaded, then for every stdin line "B" one
  line {"times": [N step seconds], "prefill_ms": ..., "tokens": [...]} (B sequences, N
  decode steps after a fresh prefill); "check K" answers {"tokens", "logits"} (.npy path);
  EOF ends it. `--prepare --json -` makes the GGUFs and prints their paths without timing.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
# bench_decode imports only the standard library at module level: its prompt is the
# one every dsflow decode benchmark uses (one source of truth for the token ids).
from bench_decode import prompt_ids  # noqa: E402

FORMATS = ("f32", "f16", "q8_0", "q4_0")
FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}      # enum llama_flash_attn_type
CONVERTED = {"f32": "f32", "f16": "f16"}          # convert_hf_to_gguf.py --outtype
QUANTISED = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",   # llama_model_quantize from the f32 file
             "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Failure(Exception):
    """One line for the user; main() prints it and exits 1."""


# ---- GGUF files (parent) --------------------------------------------------------------
def convert_script(given: Path | None) -> Path:
    """llama.cpp's converter: --convert-script, $LLAMACPP_CONVERT, or the sdist unpacked
    under the venv (sys.prefix/src/llama_cpp_python-*/vendor/llama.cpp)."""
    if given is None and os.environ.get("LLAMACPP_CONVERT"):
        given = Path(os.environ["LLAMACPP_CONVERT"])
    if given is None:
        found = sorted(Path(sys.prefix, "src").glob(
            "llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
        if not found:
            raise Failure(f"no convert_hf_to_gguf.py under {sys.prefix}/src: unpack the "
                          "llama-cpp-python sdist there or pass --convert-script")
        given = found[-1]
    if not given.is_file():
        raise Failure(f"--convert-script {given}: no such file")
    return given


def weights_mtime(ckpt: Path) -> float:
    files = list(ckpt.glob("*.safetensors")) + list(ckpt.glob("*.bin"))
    if not files:
        raise Failure(f"{ckpt}: no *.safetensors or *.bin weights")
    return max(f.stat().st_mtime for f in files)


def fresh(path: Path, since: float) -> bool:
    return path.is_file() and path.stat().st_mtime > since


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json")


def staged(ckpt: Path, tokenizer: Path | None, work: Path) -> Path:
    """The checkpoint as the converter should read it: itself, or (with --tokenizer) a
    folder of symbolic links to its files with the tokenizer files taken from `tokenizer`.
    The converter recognises a pre-tokenizer by hashing its output, so a tokenizer.json
    re-serialised by another tokenizers release (dsflow's embedded default model's) is
    refused where the original DeepSeek-Coder files pass."""
    if tokenizer is None:
        return ckpt
    if not (tokenizer / "tokenizer.json").is_file():
        raise Failure(f"--tokenizer {tokenizer}: no tokenizer.json")
    stage = work / "hf-stage"
    if stage.exists():
        for f in stage.iterdir():
            f.unlink()
    stage.mkdir(parents=True, exist_ok=True)
    for f in ckpt.iterdir():
        if f.is_file() and f.name not in TOKENIZER_FILES:
            (stage / f.name).symlink_to(f)
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            (stage / name).symlink_to((tokenizer / name).resolve())
    return stage


def convert(ckpt: Path, out: Path, outtype: str, script: Path) -> None:
    """One convert_hf_to_gguf.py run into a temporary name, renamed when it succeeded."""
    tmp = out.with_suffix(".partial")
    cmd = [sys.executable, str(script), str(ckpt), "--outfile", str(tmp), "--outtype", outtype]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        hint = (" (pass --tokenizer with the original DeepSeek-Coder tokenizer files; the "
                "converter needs transformers 4.57.x)" if "pre-tokenizer" in last else "")
        raise Failure(f"convert_hf_to_gguf.py --outtype {outtype} failed on {ckpt}: "
                      f"{last}{hint}")
    tmp.replace(out)


def quantize(src: Path, out: Path, fmt: str, threads: int) -> None:
    """llama-quantize's default recipe through the library (the CLI is not built by the
    Python package)."""
    llama_cpp = quiet_llama()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTISED[fmt])
    params.nthread = threads
    tmp = out.with_suffix(".partial")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(),
                                        ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise Failure(f"llama_model_quantize {src} -> {fmt} returned {rc}")
    tmp.replace(out)


def make_ggufs(ckpt: Path, work: Path, formats: list[str], script: Path, threads: int,
               tokenizer: Path | None = None) -> dict[str, Path]:
    since = weights_mtime(ckpt)
    work.mkdir(parents=True, exist_ok=True)
    source = staged(ckpt, tokenizer, work)
    paths = {f: work / f"model-{f}.gguf" for f in FORMATS}
    needed = set(formats) | ({"f32"} if set(formats) & set(QUANTISED) else set())
    for fmt in FORMATS:
        if fmt not in needed or fresh(paths[fmt], since):
            continue
        t0 = time.time()
        if fmt in CONVERTED:
            convert(source, paths[fmt], CONVERTED[fmt], script)
        else:
            quantize(paths["f32"], paths[fmt], fmt, threads)
        log(f"{fmt}: {paths[fmt]} made in {time.time() - t0:.0f} s")
    return {f: paths[f] for f in formats}


def gguf_facts(path: Path) -> dict[str, Any]:
    """Rope metadata and tensor types of a GGUF file, read with the gguf package."""
    from gguf import GGUFReader
    reader = GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    meta = {key: reader.fields[f"{arch}.{key}"].contents()
            for key in ("rope.scaling.type", "rope.scaling.factor", "rope.freq_base")
            if f"{arch}.{key}" in reader.fields}
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    out_type = next((t.tensor_type.name for t in reader.tensors if t.name == "output.weight"),
                    None)
    return {"file": str(path), "bytes": path.stat().st_size, "architecture": arch,
            "rope": meta, "tensor_types": types, "output_weight_type": out_type}


def rope_of(config: dict) -> tuple[float, str, float]:
    """(theta, scaling type, factor) from a config.json in either layout: transformers
    4.x's rope_theta + rope_scaling, or 5.x's rope_parameters (what tools/bench_decode.py
    writes under transformers 5, and what transformers 4.57 does not read)."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default")) or "default"
    return theta, kind, float(rope.get("factor", 1.0))


def rope_problem(facts: dict, config: dict) -> str | None:
    """None when the GGUF's rope metadata says what the checkpoint's config.json says."""
    theta, kind, factor = rope_of(config)
    rope = facts["rope"]
    if kind != "default":
        if rope.get("rope.scaling.type") != kind:
            return f"rope scaling type {rope.get('rope.scaling.type')!r}, config {kind!r}"
        if abs(float(rope.get("rope.scaling.factor", 0)) - factor) > 1e-6:
            return f"rope scaling factor {rope.get('rope.scaling.factor')}, config {factor}"
    if abs(float(rope.get("rope.freq_base", theta)) - theta) > 1e-3 * theta:
        return f"rope theta {rope.get('rope.freq_base')}, config {theta}"
    return None


# ---- runners (children) -----------------------------------------------------------------
def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


_QUIET_LOG = None  # the ctypes callback must outlive every llama.cpp call


def quiet_llama():
    """llama_cpp with llama.cpp's own logging (a line per tensor and layer) switched off."""
    global _QUIET_LOG
    import llama_cpp
    if _QUIET_LOG is None:
        _QUIET_LOG = llama_cpp.llama_log_callback(lambda level, text, data: None)
        llama_cpp.llama_log_set(_QUIET_LOG, ctypes.c_void_p())
    return llama_cpp


class LlamaRunner:
    """One GGUF through llama.cpp's C API (the high-level Llama class samples and keeps
    Python-side state per token; the C API times what llama.cpp itself does)."""

    def __init__(self, path: Path, threads: int, max_batch: int, prompt_len: int,
                 steps: int, kv_type: str = "f16", flash_attn: str = "auto"):
        self.L = L = quiet_llama()
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(str(path).encode(),
                                                  L.llama_model_default_params())
        if not self.model:
            raise Failure(f"llama.cpp could not load {path}")
        # room for the timed steps and for a "check" of up to 256 tokens
        self.per_seq = per_seq = -(-(prompt_len + max(steps, 256) + 8) // 256) * 256
        self.n_batch = max(512, max_batch * prompt_len)
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_seq_max = per_seq * max_batch, max_batch
        cp.n_batch = cp.n_ubatch = self.n_batch
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = True
        cp.type_k = cp.type_v = L.GGML_TYPE_F32 if kv_type == "f32" else L.GGML_TYPE_F16
        cp.flash_attn_type = FLASH_ATTN[flash_attn]
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise Failure(f"llama.cpp could not make a context for {path}")
        self.mem = L.llama_get_memory(self.ctx)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(self.n_batch, 0, 1)

    def _decode(self, rows: list[tuple[int, int, int, bool]]) -> None:
        """rows of (token, position, sequence, wants logits)."""
        b = self.batch
        b.n_tokens = len(rows)
        for j, (tok, pos, seq, out) in enumerate(rows):
            b.token[j], b.pos[j], b.n_seq_id[j], b.logits[j] = tok, pos, 1, out
            b.seq_id[j][0] = seq
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            raise Failure(f"llama_decode returned {rc}")

    def _logits(self, i: int) -> np.ndarray:
        ptr = self.L.llama_get_logits_ith(self.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def generate(self, b: int, prompt: list[int], steps: int,
                 keep_logits: bool = False) -> dict:
        """Fresh prefill of `prompt` in b sequences, then `steps` greedy decode steps."""
        self.L.llama_memory_clear(self.mem, True)
        n = len(prompt)
        t0 = time.perf_counter()
        self._decode([(tok, p, s, p == n - 1) for s in range(b) for p, tok in enumerate(prompt)])
        # llama_get_logits_ith takes the row's index in the batch: sequence s ends at s*n+n-1
        nxt = [int(np.argmax(self._logits(s * n + n - 1))) for s in range(b)]
        prefill_ms = (time.perf_counter() - t0) * 1e3
        logits = [self._logits(n - 1).copy()] if keep_logits else []
        tokens, times = [nxt[0]], []
        for i in range(steps):
            t0 = time.perf_counter()
            if n + i >= self.per_seq:
                raise Failure(f"{n + i} positions exceed the context of {self.per_seq}")
            self._decode([(nxt[s], n + i, s, True) for s in range(b)])
            nxt = [int(np.argmax(self._logits(s))) for s in range(b)]
            times.append(time.perf_counter() - t0)
            tokens.append(nxt[0])
            if keep_logits:
                logits.append(self._logits(0).copy())
        return {"prefill_ms": prefill_ms, "times": times, "tokens": tokens, "logits": logits}

    def check(self, prompt: list[int], k: int) -> tuple[list[int], np.ndarray]:
        r = self.generate(1, prompt, k - 1, keep_logits=True)
        return r["tokens"], np.stack(r["logits"])

    def info(self) -> dict:
        return {"system_info": self.L.llama_print_system_info().decode().strip(),
                "llama_cpp_python": self.L.__version__}


class HfRunner:
    """transformers' fp32 reference: its KV-cache loop, greedy. `unscaled` drops the rope
    scaling from the config: the control a GGUF that lost it would match instead."""

    def __init__(self, ckpt: Path, threads: int, unscaled: bool):
        import torch
        from transformers import AutoConfig, LlamaForCausalLM
        torch.set_num_threads(threads)
        theta, kind, factor = rope_of(json.loads((ckpt / "config.json").read_text()))
        if unscaled:
            kind, factor = "default", 1.0
        # set explicitly: transformers 4.57 ignores a 5.x config's rope_parameters
        config = AutoConfig.from_pretrained(ckpt)
        config.rope_theta = theta
        config.rope_scaling = None if kind == "default" else {"type": kind, "rope_type": kind,
                                                              "factor": factor}
        self.torch = torch
        self.model = LlamaForCausalLM.from_pretrained(ckpt, config=config,
                                                      dtype=torch.float32).eval()
        # the reference must rotate as the config says (linear: frequencies / factor)
        if kind in ("default", "linear"):
            self._check_rotary(config, theta, kind, factor)

    def _check_rotary(self, config, theta: float, kind: str, factor: float) -> None:
        torch = self.torch
        head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        want = 1.0 / theta ** (torch.arange(0, head, 2, dtype=torch.float64) / head) / factor
        got = self.model.model.rotary_emb.inv_freq.double()
        if not torch.allclose(got, want, rtol=1e-5):
            raise Failure(f"transformers' rotary frequencies are not {kind} x{factor}, "
                          f"theta {theta}: the reference would be wrong")

    def check(self, prompt: list[int], k: int) -> tuple[list[int], np.ndarray]:
        torch = self.torch
        with torch.no_grad():
            out = self.model(torch.tensor([prompt]), use_cache=True)
            tokens, logits = [], []
            for _ in range(k):
                last = out.logits[0, -1]
                logits.append(last.numpy().copy())
                tokens.append(int(last.argmax()))
                if len(tokens) < k:
                    out = self.model(torch.tensor([[tokens[-1]]]),
                                     past_key_values=out.past_key_values, use_cache=True)
        return tokens, np.stack(logits)

    def info(self) -> dict:
        import transformers
        return {"transformers": transformers.__version__}


def child_main(args) -> None:
    prompt = prompt_ids(args.prompt_len)
    if args.child in ("hf", "hf-unscaled"):
        runner: Any = HfRunner(Path(args.path), args.threads, args.child == "hf-unscaled")
    else:
        runner = LlamaRunner(Path(args.path), args.threads, max(batch_list(args.batches)),
                             args.prompt_len, args.steps, args.kv_type, args.flash_attn)
    print(json.dumps({"ready": True, "rss": rss_bytes(), **runner.info()}), flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "check":
            tokens, logits = runner.check(prompt, int(words[1]))
            out = Path(args.check_dir or Path(args.path).parent) / f"check-{args.child}.npy"
            np.save(out, logits)
            print(json.dumps({"tokens": tokens, "logits": str(out)}), flush=True)
        else:
            r = runner.generate(int(words[0]), prompt, args.steps)
            r.pop("logits")
            print(json.dumps(r), flush=True)


# ---- parent -------------------------------------------------------------------------------
class Child:
    """A runner in its own process, answering one JSON line per request."""

    def __init__(self, name: str, path: Path, args, python: str = sys.executable):
        cmd = [python, str(Path(__file__).resolve()), "--child", name, "--path", str(path),
               "--steps", str(args.new_tokens - 1), "--prompt-len", str(args.prompt_len),
               "--batches", args.batches, "--threads", str(args.threads),
               "--check-dir", str(args.workdir), "--kv-type", args.kv_type,
               "--flash-attn", args.flash_attn]
        self.name = name
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise Failure(f"{self.name}: benchmark child failed (exit {self.proc.wait()})")
        return json.loads(line)

    def ask(self, request: str) -> dict:
        self.proc.stdin.write(request + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(60)


def compare(ref_tokens: list[int], ref_logits: np.ndarray, tokens: list[int],
            logits: np.ndarray) -> dict:
    """Leading greedy tokens in common, and the largest logit difference over the steps
    whose inputs were still identical (step i sees tokens < i)."""
    same = 0
    while same < len(ref_tokens) and tokens[same] == ref_tokens[same]:
        same += 1
    upto = min(same + 1, len(ref_tokens))
    diff = float(np.abs(ref_logits[:upto] - logits[:upto]).max())
    scale = float(np.abs(ref_logits[:upto]).max()) or 1.0
    return {"tokens_match": same, "of": len(ref_tokens), "max_abs_logit_diff": diff,
            "relative": diff / scale}


def reference(ckpt: Path, args) -> dict[str, tuple[list[int], np.ndarray]]:
    refs = {}
    for name in ("hf", "hf-unscaled"):
        child = Child(name, ckpt, args)
        try:
            r = child.ask(f"check {args.check_tokens}")
            refs[name] = (r["tokens"], np.load(r["logits"]))
            refs[name + "-info"] = child.ready
        finally:
            child.close()
    return refs


def measure(children: dict[str, Child], batches: list[int], runs: int,
            check: Callable[[str, Child], None]) -> tuple[dict, list[float]]:
    for name, child in children.items():
        check(name, child)
        for b in batches:
            child.ask(str(b))  # warm every shape, untimed
    res: dict = {(n, b): [] for n in children for b in batches}
    loads = []
    for r in range(runs):
        loads.append(os.getloadavg()[0])
        for b in batches:
            for name, child in children.items():
                res[name, b].append(child.ask(str(b)))
        log(f"round {r + 1}: " + "  ".join(
            f"{n}@{b} {statistics.mean(res[n, b][-1]['times']) * 1e3:.2f}"
            for b in batches for n in children))
    loads.append(os.getloadavg()[0])
    return res, loads


def summarise(runs: list[dict]) -> dict:
    per_run = [statistics.mean(r["times"]) * 1e3 for r in runs]
    return {"ms_per_token": statistics.median(per_run), "ms_per_token_runs": per_run,
            "prefill_ms": statistics.median(r["prefill_ms"] for r in runs),
            "tokens_per_s": 1e3 / statistics.median(per_run)}


def table(report: dict, batches: list[int]) -> str:
    cols = " | ".join(f"batch {b} ms/step (min-max)" for b in batches)
    lines = [f"| format | file MiB | tensor types | vs transformers: greedy tokens, max abs "
             f"logit diff | {cols} | prefill {report['prompt_len']} ms |",
             "|---|---|---|---|" + "---|" * len(batches) + "---|"]
    for fmt, r in report["formats"].items():
        types = ", ".join(f"{n} {t}" for t, n in sorted(r["tensor_types"].items()))
        chk = r.get("check")
        chk_s = f"{chk['tokens_match']}/{chk['of']}, {chk['max_abs_logit_diff']:.2g}" if chk else "-"
        speed = " | ".join(
            f"{r['batch'][str(b)]['ms_per_token']:.2f} ({min(r['batch'][str(b)]['ms_per_token_runs']):.2f}"
            f"-{max(r['batch'][str(b)]['ms_per_token_runs']):.2f})" for b in batches)
        lines.append(f"| {fmt} | {r['bytes'] / 2**20:.0f} | {types} | {chk_s} | {speed} | "
                     f"{r['batch'][str(batches[0])]['prefill_ms']:.1f} |")
    return "\n".join(lines)


def batch_list(text: str) -> list[int]:
    return [int(b) for b in text.split(",") if b]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, help="HF checkpoint directory (LlamaForCausalLM)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer files for the converter, if not the checkpoint's own "
                        "(e.g. ../shared/models/deepseek-coder-tokenizer)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the GGUF files go (default: CKPT/../llamacpp)")
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--runs", type=int, default=5, help="interleaved rounds; median over them")
    p.add_argument("--batches", default="1", help="sequences decoded together, e.g. 1,8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--check-tokens", type=int, default=16)
    p.add_argument("--kv-type", choices=("f16", "f32"), default="f16",
                   help="llama.cpp's KV cache type (its default: f16)")
    p.add_argument("--flash-attn", choices=tuple(FLASH_ATTN), default="auto",
                   help="llama.cpp's flash attention (its default, auto, turns it on for CPU)")
    p.add_argument("--tol", type=float, default=5e-3,
                   help="f32: max abs logit diff allowed, relative to the largest |logit| "
                        "(flash attention costs ~1e-3; --kv-type f32 --flash-attn off "
                        "meets 1e-5)")
    p.add_argument("--no-check", action="store_true", help="skip the transformers comparison")
    p.add_argument("--convert-script", type=Path, default=None)
    p.add_argument("--prepare", action="store_true", help="make the GGUFs only")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON ('-': stdout)")
    p.add_argument("--child", help="serve one runner on stdin/stdout (see the docstring)")
    p.add_argument("--path", help="--child: the GGUF file (or checkpoint for hf)")
    p.add_argument("--steps", type=int, default=47, help="--child: decode steps per request")
    p.add_argument("--check-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    try:
        batch_list(args.batches)
    except ValueError:
        p.error(f"--batches {args.batches!r}: comma-separated integers")
    if args.child:
        if not args.path:
            p.error("--child needs --path")
        return args
    if args.ckpt is None:
        p.error("--ckpt is required")
    bad = [f for f in args.formats.split(",") if f not in FORMATS]
    if bad or not args.formats:
        p.error(f"--formats: {','.join(bad) or 'empty'} not among {','.join(FORMATS)}")
    if args.new_tokens < 2 or args.prompt_len < 1 or args.runs < 1 or args.check_tokens < 1:
        p.error("--new-tokens must be >= 2, --prompt-len, --runs and --check-tokens >= 1")
    return args


def read_config(ckpt: Path) -> dict:
    cfg_path = ckpt / "config.json"
    if not cfg_path.is_file():
        raise Failure(f"--ckpt {ckpt}: no config.json")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise Failure(f"{cfg_path}: not JSON ({e})") from None
    if "LlamaForCausalLM" not in config.get("architectures", []):
        raise Failure(f"{cfg_path}: architectures {config.get('architectures')}, "
                      "want LlamaForCausalLM")
    return config


def run(args) -> dict:
    ckpt = args.ckpt.resolve()
    config = read_config(ckpt)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise Failure(f"llama_cpp is not importable from {sys.executable}: run this tool "
                      "with the llama venv's python (see the top of tools/bench_llamacpp.py)")
    args.workdir = (args.workdir or ckpt.parent / "llamacpp").resolve()
    formats = args.formats.split(",")
    batches = batch_list(args.batches)
    paths = make_ggufs(ckpt, args.workdir, formats, convert_script(args.convert_script),
                       args.threads, args.tokenizer and args.tokenizer.resolve())
    report: dict = {"tool": "bench_llamacpp", "ckpt": str(ckpt), "threads": args.threads,
                    "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                    "runs": args.runs, "batches": batches,
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                    "kv_type": args.kv_type, "flash_attn": args.flash_attn,
                    "formats": {f: gguf_facts(p) for f, p in paths.items()}}
    for fmt, facts in report["formats"].items():
        problem = rope_problem(facts, config)
        if problem:
            raise Failure(f"{facts['file']}: {problem}")
    if args.prepare:
        return report
    refs = {} if args.no_check else reference(ckpt, args)
    if refs:
        report["reference"] = refs["hf-info"]

    def check(name: str, child: Child) -> None:
        if not refs:
            return
        r = child.ask(f"check {args.check_tokens}")
        tokens, logits = r["tokens"], np.load(r["logits"])
        result = compare(*refs["hf"], tokens, logits)
        result["unscaled_control"] = compare(*refs["hf-unscaled"], tokens, logits)
        report["formats"][name]["check"] = result
        log(f"{name}: {result['tokens_match']}/{result['of']} greedy tokens as transformers, "
            f"max abs logit diff {result['max_abs_logit_diff']:.3g} (rope scaling removed: "
            f"{result['unscaled_control']['tokens_match']} tokens, "
            f"{result['unscaled_control']['max_abs_logit_diff']:.3g})")

    children: dict[str, Child] = {}
    try:
        for fmt, path in paths.items():
            children[fmt] = Child(fmt, path, args)
            report["formats"][fmt]["rss_loaded"] = children[fmt].ready["rss"]
        report.update({k: v for k, v in next(iter(children.values())).ready.items()
                       if k in ("system_info", "llama_cpp_python")})
        res, loads = measure(children, batches, args.runs, check)
    finally:
        for child in children.values():
            child.close()
    report["load_average"] = [min(loads), max(loads)]
    for fmt in paths:
        report["formats"][fmt]["batch"] = {str(b): summarise(res[fmt, b]) for b in batches}
    return report


def verdict(report: dict, tol: float) -> str | None:
    chk = report["formats"].get("f32", {}).get("check")
    if chk and (chk["tokens_match"] < chk["of"] or chk["relative"] > tol):
        return (f"llama.cpp f32 does not match transformers: {chk['tokens_match']}/{chk['of']} "
                f"tokens, max abs logit diff {chk['max_abs_logit_diff']:.3g}, "
                f"{chk['relative']:.2g} of the largest logit (tol {tol})")
    return None


def main() -> None:
    args = parse_args()
    try:
        if args.child:
            child_main(args)
            return
        report = run(args)
    except Failure as e:
        print(f"bench_llamacpp: {e}", file=sys.stderr)
        sys.exit(1)
    text = sys.stderr if args.json == "-" else sys.stdout
    if not args.prepare:
        print(f"\nllama-cpp-python {report.get('llama_cpp_python')}, {args.threads} threads, "
              f"KV cache {args.kv_type}, flash attention {args.flash_attn}, "
              f"OMP_WAIT_POLICY={report['omp_wait_policy'] or 'unset'}; prompt "
              f"{args.prompt_len}, {args.new_tokens} new tokens; median of {args.runs} "
              f"interleaved runs; load average {report['load_average'][0]:.1f}-"
              f"{report['load_average'][1]:.1f}\n", file=text)
        print(table(report, report["batches"]), file=text)
    if args.json:
        out = json.dumps(report, indent=1)
        if args.json == "-":
            print(out)
        else:
            Path(args.json).write_text(out + "\n")
    problem = verdict(report, args.tol)
    if problem:
        print(f"bench_llamacpp: {problem}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

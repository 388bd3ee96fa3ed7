"""Cross-check dsflow against the seed's own stack, MindFormers 1.9.0, on one random model.

DeepSeek-Coder is a LLaMA model, so MindFormers' llama code is the reference the seed
used: its converters (mindformers/models/llama/convert_weight.py, convert_reversed.py)
and its LlamaForCausalLM (mindformers/models/llama/llama.py). This tool checks:

1. conversion HF -> .ckpt: MindFormers' converter and tools/convert_weight.py write the
   same tensor names, dtypes and bytes (fp32, bf16, and fp32 rounded to bf16);
2. conversion .ckpt -> HF: MindFormers' convert_reversed and tools/convert_reversed.py
   give back the same tensors as the original checkpoint;
3. `dsexport build` reads MindFormers' .ckpt (fp32 and bf16) with a MindFormers predict
   yaml as its only config;
4. numerics: greedy tokens of MindFormers' LlamaForCausalLM (its own generate()), of the
   dsflow artifacts built from MindFormers' .ckpt (Engine) and of transformers are
   identical, and their logits (after the prompt and each generated token) agree.

MindFormers 1.9.0 needs mindspore 2.9.0, dsflow 2.10.0; the two cannot share a process,
so the MindFormers half (tools/mindformers_side.py) runs in its own venv, built here on
first use (about 3 minutes, 4 GB; outside the repository). Run with the project venv:

    .venv/bin/python tools/crosscheck_mindformers.py [--venv DIR] [--tp 2] [--keep DIR]

Prints one table; exit 0 when everything matches, 1 on any mismatch or failure.
Not part of CI (see docs/WEIGHTS.md for the recorded run).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
from bench_decode import shared_tokenizer  # noqa: E402  (the standard library only)

SIDE = TOOLS / "mindformers_side.py"
DEFAULT_VENV = Path.home() / ".cache" / "dsflow" / "mindformers-venv"
# what the MindFormers venv holds: mindformers 1.9.0 resolves only with mindspore 2.9.0
# (../shared/notes/mindspore-on-cpu.md); its converters import torch; mindspore 2.9 is
# built against numpy 1.x
MF_PACKAGES = ("mindformers==1.9.0", "mindspore==2.9.0", "torch==2.13.0", "numpy<2")
MF_VERSION = "1.9.0"

# DeepSeek-Coder's shape at toy size, as tests/conftest.py TINY: the real vocabulary
# (32256 rows, 32022 real tokens), rope theta 1e5 with linear scaling 4, GQA.
REAL_VOCAB = 32022
SHAPE = dict(vocab_size=32256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=4, rope_theta=100000.0,
             rope_scaling={"type": "linear", "factor": 4.0}, max_position_embeddings=512,
             rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.1,
             bos_token_id=32013, eos_token_id=32021)
PROMPTS = ["#write a quick sort algorithm",
           'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
           "// binary search\nint search(const int *a, int n, int x) {\n"]
LOGIT_TOLERANCE = 1e-4  # fp32, as tests/test_parity.py
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class CrossCheckError(Exception):
    """A step that could not run at all (not a mismatch): one line, exit 1."""


@dataclass
class Row:
    check: str
    ok: bool
    detail: str


Tensors = dict[str, tuple[str, bytes]]


# ---- the MindFormers venv ------------------------------------------------------------

def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def has_mindformers(venv: Path) -> bool:
    """True when the venv imports mindformers at the pinned version and torch."""
    python = venv_python(venv)
    if not python.is_file():
        return False
    probe = "import mindformers, torch; print(mindformers.__version__)"
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    return done.returncode == 0 and done.stdout.strip().endswith(MF_VERSION)


def ensure_venv(venv: Path, install: bool) -> Path:
    """The venv's python, building the venv first when it lacks MindFormers."""
    if has_mindformers(venv):
        return venv_python(venv)
    if not install:
        raise CrossCheckError(f"--venv {venv}: no mindformers {MF_VERSION} there "
                              "(run without --no-install to build it)")
    print(f"building the MindFormers venv in {venv} (a few minutes)...", file=sys.stderr)
    venv.parent.mkdir(parents=True, exist_ok=True)
    _run([_base_python(), "-m", "venv", str(venv)])
    _run([str(venv_python(venv)), "-m", "pip", "install", "-q", *MF_PACKAGES])
    if not has_mindformers(venv):
        raise CrossCheckError(f"--venv {venv}: mindformers {MF_VERSION} still not importable")
    return venv_python(venv)


def _base_python() -> str:
    """The interpreter the project venv was made from (a venv of a venv works too, but
    this keeps the MindFormers venv independent of the project's)."""
    return getattr(sys, "_base_executable", sys.executable)


def _run(cmd: list[str], cwd: Optional[Path] = None) -> str:
    """Run a command, return its stdout; its output's last lines become the error when
    it fails (GLOG_v=3 keeps MindSpore's log lines out)."""
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "GLOG_v": "3", "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        what = " ".join(Path(c).name if "/" in c else c for c in cmd[:3])
        raise CrossCheckError(f"{what}: exit {done.returncode}: "
                              f"{error_tail(done.stderr or done.stdout)}")
    return done.stdout


def error_tail(output: str) -> str:
    """The last lines of a failed command's output that say what failed: MindSpore ends
    its errors with a C++ call stack banner, which is cut off."""
    lines = [line.strip() for line in output.split("- C++ Call Stack")[0].splitlines()
             if line.strip() and not set(line.strip()) <= {"-"}]
    return " | ".join(lines[-3:])


def mindformers(python: Path, work: Path, *args: str) -> None:
    """One tools/mindformers_side.py command in the MindFormers venv, run in the work
    directory: MindFormers writes its logs to ./output/log."""
    _run([str(python), str(SIDE), *args], cwd=work)


def dsflow_tool(name: str, *args: str) -> None:
    """tools/convert_weight.py or convert_reversed.py with this (the project's) python."""
    _run([sys.executable, str(TOOLS / f"{name}.py"), *args])


# ---- the random checkpoint -----------------------------------------------------------

def tokenizer_dir() -> Path:
    """The real DeepSeek-Coder tokenizer (bench_decode.shared_tokenizer)."""
    path = shared_tokenizer()
    if path is not None:
        return path
    raise CrossCheckError("the DeepSeek-Coder tokenizer was not found in shared/models "
                          "(set DSFLOW_SHARED)")


def quiet_transformers() -> None:
    """No progress bars from transformers and the hub on this tool's output."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging
    disable_progress_bars()
    logging.disable_progress_bar()


def make_checkpoint(path: Path, dtype: str, seed: int) -> None:
    """A random LlamaForCausalLM of SHAPE saved as safetensors, the real tokenizer beside."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()
    model.to(getattr(torch, dtype)).save_pretrained(path, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir() / name, path / name)


def reference_model(path: Path):
    """transformers' model of a saved checkpoint, computing in fp32 (as dsflow's CPU
    build and MindFormers on CPU do). Loaded afresh rather than upcast in memory: a
    model cast to bf16 has its rotary inv_freq buffer rounded to bf16 too."""
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(path, dtype="float32").eval()


def predict_yaml() -> str:
    """A MindFormers predict yaml for SHAPE (the keys of research/deepseek/
    predict_deepseek_33b.yaml); both dsflow and MindFormers' model read this one file.
    Floats keep a decimal point: YAML 1.1 (PyYAML) reads `1e-06` as a string."""
    return f"""\
model:
  model_config:
    type: LlamaConfig
    seq_length: {SHAPE['max_position_embeddings']}
    hidden_size: {SHAPE['hidden_size']}
    num_layers: {SHAPE['num_hidden_layers']}
    num_heads: {SHAPE['num_attention_heads']}
    n_kv_heads: {SHAPE['num_key_value_heads']}
    vocab_size: {SHAPE['vocab_size']}
    intermediate_size: {SHAPE['intermediate_size']}
    rms_norm_eps: {SHAPE['rms_norm_eps']:.1e}
    theta: {SHAPE['rope_theta']}
    extend_method: "PI"
    scaling_factor: {SHAPE['rope_scaling']['factor']}
    bos_token_id: {SHAPE['bos_token_id']}
    eos_token_id: {SHAPE['eos_token_id']}
    pad_token_id: {SHAPE['eos_token_id']}
    param_init_type: "float32"
    compute_dtype: "float32"
  arch:
    type: LlamaForCausalLM
"""


# ---- reading tensors independently of dsflow's readers -------------------------------

def ckpt_tensors(path: Path) -> Tensors:
    """name -> (dtype, bytes) of a .ckpt, read by MindSpore itself."""
    import mindspore as ms
    return {name: (str(p.dtype), p.asnumpy().tobytes())
            for name, p in ms.load_checkpoint(str(path)).items()}


def torch_tensors(path: Path) -> Tensors:
    """name -> (dtype, bytes) of a torch .bin state dict or a safetensors directory."""
    import torch
    if path.is_dir():
        from safetensors.torch import load_file
        state = {}
        for f in sorted(path.glob("*.safetensors")):
            state.update(load_file(f))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    return {name: (str(t.dtype).replace("torch.", ""),
                   t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            for name, t in state.items() if not name.endswith("rotary_emb.inv_freq")}


def differences(a: Tensors, b: Tensors) -> list[str]:
    """What differs between two tensor sets: names, then dtypes, then bytes."""
    out = [f"only in the first: {sorted(set(a) - set(b))}"] if set(a) - set(b) else []
    out += [f"only in the second: {sorted(set(b) - set(a))}"] if set(b) - set(a) else []
    for name in sorted(set(a) & set(b)):
        if a[name][0] != b[name][0]:
            out.append(f"{name}: dtype {a[name][0]} vs {b[name][0]}")
        elif a[name][1] != b[name][1]:
            out.append(f"{name}: values differ")
    return out


def same(check: str, a: Tensors, b: Tensors) -> Row:
    diff = differences(a, b)
    dtypes = sorted({d for d, _ in a.values()})
    detail = (f"{len(a)} tensors, {'/'.join(dtypes)}, bit-identical" if not diff
              else f"{len(diff)} differences, first: {diff[0]}")
    return Row(check, not diff, detail)


# ---- the checks ----------------------------------------------------------------------

def check_conversions(python: Path, work: Path, hf: dict[str, Path]) -> list[Row]:
    """HF -> .ckpt by both converters; .ckpt -> HF by both reverse converters."""
    rows = []
    # (source checkpoint, .ckpt dtype): fp32 -> bf16 also compares the rounding
    for source, dtype in (("fp32", "fp32"), ("bf16", "bf16"), ("fp32", "bf16")):
        tag = f"{source}->{dtype}"
        mf_ckpt, ds_ckpt = work / f"mf-{tag}.ckpt", work / f"ds-{tag}.ckpt"
        mindformers(python, work, "convert", "--hf", str(hf[source]), "--out", str(mf_ckpt),
                    "--dtype", dtype)
        dsflow_tool("convert_weight", "--torch_ckpt_path", str(hf[source]),
                    "--mindspore_ckpt_path", str(ds_ckpt), "--dtype", dtype)
        rows.append(same(f"HF {source} -> .ckpt {dtype}: MindFormers = dsflow",
                         ckpt_tensors(mf_ckpt), ckpt_tensors(ds_ckpt)))
    for dtype in ("fp32", "bf16"):
        mf_ckpt = work / f"mf-{dtype}->{dtype}.ckpt"
        mf_bin, ds_dir = work / f"mf-back-{dtype}.bin", work / f"ds-back-{dtype}"
        mindformers(python, work, "reverse", "--ckpt", str(mf_ckpt), "--out", str(mf_bin),
                    "--dtype", dtype)
        dsflow_tool("convert_reversed", "--mindspore_ckpt_path", str(mf_ckpt),
                    "--torch_ckpt_path", str(ds_dir), "--config", str(hf[dtype] / "config.json"))
        original = torch_tensors(hf[dtype])
        rows.append(same(f".ckpt {dtype} -> HF: MindFormers = original",
                         torch_tensors(mf_bin), original))
        rows.append(same(f".ckpt {dtype} -> HF: dsflow = original",
                         torch_tensors(ds_dir), original))
    return rows


def mindformers_dir(work: Path, ckpt: Path, name: str) -> Path:
    """A directory as MindFormers users have it: the .ckpt, a predict yaml, the
    tokenizer; no config.json."""
    d = work / name
    d.mkdir()
    shutil.copyfile(ckpt, d / f"{name}.ckpt")
    (d / f"predict_{name}.yaml").write_text(predict_yaml())
    for f in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir() / f, d / f)
    return d


def build_from_ckpt(work: Path, dtype: str, tp: int) -> tuple[Row, Path]:
    """`dsexport build` of MindFormers' .ckpt with only its predict yaml as config."""
    d = mindformers_dir(work, work / f"mf-{dtype}->{dtype}.ckpt", f"deepseek_tiny_{dtype}")
    out = work / f"art-{dtype}"
    dsexport = Path(sys.executable).parent / "dsexport"
    report = json.loads(_run([str(dsexport), "build", "--model", str(d / f"{d.name}.ckpt"),
                              "--tp", str(tp), "--out", str(out), "--json"]))
    manifest = json.loads((out / "manifest.json").read_text())
    return Row(f"dsexport build: MindFormers .ckpt {dtype} + predict yaml", True,
               f"tp={tp}, {len(report['files'])} files, {manifest['dtype']} graphs"), out


def transformers_run(model, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """Greedy tokens never choosing the padding rows, and the logits that chose them."""
    import torch
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1].numpy()
            ids.append(int(np.argmax(logits[:REAL_VOCAB])))
        full = model(torch.tensor([ids[:-1]])).logits[0, len(prompt) - 1:].numpy()
    return ids[len(prompt):], full


def dsflow_run(artifacts: Path, prompts: list[list[int]], n: int
               ) -> list[tuple[list[int], np.ndarray]]:
    from dsflow.runtime.engine import Engine
    from dsflow.runtime.sampling import SamplingParams
    with Engine(artifacts) as engine:
        done = engine.generate(prompts, SamplingParams(max_new_tokens=n, ignore_eos=True))
        tokens = [r.token_ids for r in done]
        logits = engine.forced_logits(prompts, [t[:-1] for t in tokens])
    return [(t, logits[b]) for b, t in enumerate(tokens)]


def mindformers_run(python: Path, work: Path, prompts: list[list[int]], n: int
                    ) -> list[tuple[list[int], np.ndarray]]:
    d = work / "deepseek_tiny_fp32"
    (work / "prompts.json").write_text(json.dumps(prompts))
    mindformers(python, work, "generate", "--yaml", str(d / "predict_deepseek_tiny_fp32.yaml"),
                "--ckpt", str(d / "deepseek_tiny_fp32.ckpt"), "--prompts",
                str(work / "prompts.json"), "--new-tokens", str(n),
                "--real-vocab", str(REAL_VOCAB), "--out", str(work / "mf-run.json"))
    runs = json.loads((work / "mf-run.json").read_text())["runs"]
    return [(r["tokens"], np.asarray(r["logits"], np.float32)) for r in runs]


Run = list[tuple[list[int], np.ndarray]]  # per prompt: greedy tokens, their logits


def agreement(check: str, got: tuple[list[int], np.ndarray],
              ref: tuple[list[int], np.ndarray]) -> Row:
    """Same greedy tokens, and logits (real vocabulary) within LOGIT_TOLERANCE."""
    (tokens, logits), (ref_tokens, ref_logits) = got, ref
    diff = (float(np.max(np.abs(logits[:, :REAL_VOCAB] - ref_logits[:, :REAL_VOCAB])))
            if logits.shape == ref_logits.shape else float("inf"))
    same_tokens = tokens == ref_tokens
    detail = (f"{len(ref_tokens)} greedy tokens {'equal' if same_tokens else 'DIFFER'}, "
              f"max |logit diff| {diff:.2e}")
    if not same_tokens:
        detail += f"; {tokens} vs {ref_tokens}"
    return Row(check, same_tokens and diff <= LOGIT_TOLERANCE, detail)


def check_numerics(python: Path, work: Path, models: dict, built: dict[str, Path], n: int
                   ) -> tuple[list[Row], dict[str, Run]]:
    """Greedy tokens and logits on every prompt: dsflow's build of each MindFormers .ckpt
    and MindFormers' own model (fp32: the only dtype it runs on CPU) against transformers
    on the same weights (bf16 weights computed in fp32, as dsflow's CPU build does)."""
    from dsflow.runtime.tokenizer import Tokenizer
    tok = Tokenizer(tokenizer_dir())
    prompts = [tok.encode(p) for p in PROMPTS]
    rows, references = [], {}
    for dtype, artifacts in built.items():
        ref = references[dtype] = [transformers_run(models[dtype], p, n) for p in prompts]
        runs = {f"dsflow(.ckpt {dtype})": dsflow_run(artifacts, prompts, n)}
        if dtype == "fp32":
            runs["MindFormers(.ckpt fp32)"] = mindformers_run(python, work, prompts, n)
        for name, run in runs.items():
            rows += [agreement(f"prompt {i} ({len(p)} tokens): {name} = transformers",
                               run[i], ref[i]) for i, p in enumerate(prompts)]
        if len(runs) == 2:
            ours, theirs = runs.values()
            rows += [agreement(f"prompt {i}: dsflow = MindFormers", ours[i], theirs[i])
                     for i in range(len(prompts))]
    return rows, references


# ---- driver --------------------------------------------------------------------------

def run_checks(python: Path, work: Path, tp: int, new_tokens: int
               ) -> tuple[list[Row], dict[str, Run]]:
    hf = {"fp32": work / "hf-fp32", "bf16": work / "hf-bf16"}
    quiet_transformers()
    make_checkpoint(hf["fp32"], "float32", seed=0)
    make_checkpoint(hf["bf16"], "bfloat16", seed=0)
    models = {dtype: reference_model(path) for dtype, path in hf.items()}
    rows = check_conversions(python, work, hf)
    built: dict[str, Path] = {}
    for dtype in ("fp32", "bf16"):
        row, built[dtype] = build_from_ckpt(work, dtype, tp)
        rows.append(row)
    numeric_rows, references = check_numerics(python, work, models, built, new_tokens)
    return rows + numeric_rows, references


def print_table(rows: list[Row]) -> None:
    width = max(len(r.check) for r in rows)
    print(f"{'check':<{width}}  result  detail")
    for r in rows:
        print(f"{r.check:<{width}}  {'ok' if r.ok else 'FAIL':<6}  {r.detail}")
    failed = sum(not r.ok for r in rows)
    print(f"{len(rows) - failed} ok, {failed} failed")


def print_tokens(references: dict[str, Run]) -> None:
    """transformers' greedy tokens per prompt (what every other run was compared with)."""
    for dtype, run in references.items():
        for i, (tokens, _) in enumerate(run):
            print(f"tokens, {dtype} weights, prompt {i}: {' '.join(map(str, tokens))}")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV,
                   help=f"the MindFormers venv, built when absent (default {DEFAULT_VENV})")
    p.add_argument("--no-install", action="store_true",
                   help="fail instead of building a missing MindFormers venv")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks of the build")
    p.add_argument("--new-tokens", type=int, default=16, help="greedy tokens per prompt")
    p.add_argument("--keep", type=Path, default=None,
                   help="work in this new directory and keep it (default: a temporary one)")
    args = p.parse_args(argv)
    if args.tp < 1 or args.new_tokens < 1:
        p.error("--tp and --new-tokens must be at least 1")
    if args.keep is not None and args.keep.exists():
        p.error(f"--keep {args.keep}: already exists")
    return args


Result = tuple[list[Row], dict[str, Run]]


def with_workdir(keep: Optional[Path], body: Callable[[Path], Result]) -> Result:
    if keep is not None:
        keep.mkdir(parents=True)
        return body(keep)
    with tempfile.TemporaryDirectory(prefix="dsflow-xcheck-") as tmp:
        return body(Path(tmp))


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        python = ensure_venv(args.venv.expanduser(), install=not args.no_install)
        rows, references = with_workdir(args.keep, lambda work: run_checks(
            python, work, args.tp, args.new_tokens))
    except CrossCheckError as exc:
        print(f"crosscheck_mindformers: {exc}", file=sys.stderr)
        return 1
    print_table(rows)
    print_tokens(references)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""tools/bench_llamacpp.py, the llama.cpp reference of the ONNX benchmark (issue 19).

The pure parts (rope metadata from either config layout, the GGUF rope check, the token /
logit comparison) and the bad-input paths run in dsflow's venv. The end-to-end run needs
llama-cpp-python, which is built from its sdist in a venv of its own (~12+ minutes on 2
cores, transformers 4.57 for its converter): it runs only where DSFLOW_LLAMA_PY names that
venv's python (docs/BENCHMARKS.md, "llama.cpp reference").
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, make_hf_checkpoint

TOOL = REPO / "tools" / "bench_llamacpp.py"


def _tool():
    spec = importlib.util.spec_from_file_location("bench_llamacpp", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rope_of_reads_transformers_4_and_5_layouts():
    t = _tool()
    v4 = {"rope_theta": 100000.0, "rope_scaling": {"type": "linear", "factor": 4.0}}
    v5 = {"rope_parameters": {"rope_theta": 100000.0, "rope_type": "linear", "factor": 4.0}}
    assert t.rope_of(v4) == t.rope_of(v5) == (100000.0, "linear", 4.0)
    assert t.rope_of({}) == (10000.0, "default", 1.0)


def test_rope_problem_names_a_gguf_that_lost_the_scaling():
    t = _tool()
    config = {"rope_parameters": {"rope_theta": 1e5, "rope_type": "linear", "factor": 4.0}}
    good = {"rope": {"rope.scaling.type": "linear", "rope.scaling.factor": 4.0,
                     "rope.freq_base": 1e5}}
    assert t.rope_problem(good, config) is None
    assert "type None" in t.rope_problem({"rope": {"rope.freq_base": 1e5}}, config)
    half = {"rope": {**good["rope"], "rope.scaling.factor": 2.0}}
    assert "factor 2.0, config 4.0" in t.rope_problem(half, config)
    theta = {"rope": {**good["rope"], "rope.freq_base": 1e4}}
    assert "theta" in t.rope_problem(theta, config)


def test_compare_counts_the_common_prefix_and_diffs_only_identical_inputs():
    t = _tool()
    ref = np.zeros((4, 5))
    other = ref.copy()
    other[1, 0] = 0.25   # step 1: its input (token 0) is shared: counted
    other[3, 0] = 9.0    # step 3 follows a different token 2: not counted
    r = t.compare([1, 2, 3, 4], ref, [1, 2, 0, 4], other)
    assert r == {"tokens_match": 2, "of": 4, "max_abs_logit_diff": 0.25, "relative": 0.25}
    assert t.compare([1, 2], ref[:2], [1, 2], ref[:2])["tokens_match"] == 2


def _run(*argv, python=sys.executable, timeout=60):
    return subprocess.run([python, str(TOOL), *map(str, argv)], capture_output=True,
                          text=True, timeout=timeout)


def test_bad_input_is_one_line(tmp_path):
    r = _run("--ckpt", tmp_path)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"bench_llamacpp: --ckpt {tmp_path.resolve()}: no config.json"]
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    r = _run("--ckpt", tmp_path)
    assert r.returncode == 1 and "want LlamaForCausalLM" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = _run("--ckpt", tmp_path, "--formats", "q5_k")
    assert r.returncode == 2 and "--formats: q5_k not among" in r.stderr


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is not None,
                    reason="llama_cpp is importable here")
def test_without_llama_cpp_it_says_which_python_to_use(tmp_path):
    make_hf_checkpoint(tmp_path)
    r = _run("--ckpt", tmp_path)
    assert r.returncode == 1 and "run this tool with the llama venv's python" in r.stderr
    assert not (tmp_path.parent / "llamacpp").exists()


LLAMA_PY = os.environ.get("DSFLOW_LLAMA_PY")


@pytest.mark.timeout(900)
@pytest.mark.skipif(not LLAMA_PY, reason="needs llama-cpp-python, built from source in its "
                    "own venv outside the project: set DSFLOW_LLAMA_PY to that venv's python")
def test_end_to_end_on_a_tiny_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    make_hf_checkpoint(ckpt)   # transformers 5 writes rope_parameters: the 4.57 side must cope
    r = _run("--ckpt", ckpt, "--formats", "f32,q4_0", "--runs", "2", "--new-tokens", "6",
             "--check-tokens", "8", "--kv-type", "f32", "--flash-attn", "off",
             "--tol", "1e-4", "--json", "-",
             python=LLAMA_PY, timeout=800)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout)
    f32, q4 = rep["formats"]["f32"], rep["formats"]["q4_0"]
    assert f32["rope"]["rope.scaling.type"] == "linear"
    assert f32["rope"]["rope.scaling.factor"] == 4.0
    assert f32["check"]["tokens_match"] == 8 and f32["check"]["relative"] < 1e-4
    # the control: transformers without the scaling is measurably different
    assert f32["check"]["unscaled_control"]["max_abs_logit_diff"] > 100 * max(
        f32["check"]["max_abs_logit_diff"], 1e-5)
    assert q4["tensor_types"].get("Q4_0", 0) > 0 and q4["bytes"] < f32["bytes"] / 3
    for fmt in (f32, q4):
        b1 = fmt["batch"]["1"]
        assert len(b1["ms_per_token_runs"]) == 2 and b1["ms_per_token"] > 0
    assert sorted(p.name for p in (tmp_path / "llamacpp").glob("*.gguf")) == [
        "model-f32.gguf", "model-q4_0.gguf"]


def test_staged_checkpoint_takes_the_tokenizer_from_tokenizer_dir(tmp_path):
    t = _tool()
    ckpt, tok, work = tmp_path / "ckpt", tmp_path / "tok", tmp_path / "work"
    ckpt.mkdir(), tok.mkdir()
    for name, text in (("config.json", "{}"), ("model.safetensors", "w"),
                       ("tokenizer.json", "re-serialised"), ("tokenizer_config.json", "c")):
        (ckpt / name).write_text(text)
    (tok / "tokenizer.json").write_text("original")
    assert t.staged(ckpt, None, work) == ckpt
    stage = t.staged(ckpt, tok, work)
    assert (stage / "tokenizer.json").read_text() == "original"
    assert (stage / "model.safetensors").resolve() == (ckpt / "model.safetensors").resolve()
    assert not (stage / "tokenizer_config.json").exists()  # not mixed from two tokenizers
    assert t.staged(ckpt, tok, work) == stage               # again: replaced, not appended
    with pytest.raises(t.Failure, match="no tokenizer.json"):
        t.staged(ckpt, tmp_path, work)

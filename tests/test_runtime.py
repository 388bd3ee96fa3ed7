"""The runtime as users drive it: dsrun, the Python API, and failures that must not hang."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import hf_greedy
from dsflow.runtime.engine import Engine
from dsflow.runtime import WorkerError
from dsflow.runtime.sampling import SamplingParams

DSRUN = [sys.executable, "-c", "from dsflow.runtime.cli import main; main()"]


def dsrun(*args, timeout=240, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*DSRUN, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kw)


def worker_pids(parent: int) -> list[int]:
    """Live dsflow worker/scheduler processes started by `parent`."""
    out = subprocess.run(["pgrep", "-f", f"dsflow.runtime.worker --parent-pid {parent}"],
                         capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_json_output_has_the_documented_fields(export_tiny, hf_model, engine_for):
    prompts = ["def add(a, b):", "# 中文注释 😀"]
    r = dsrun("--artifacts", export_tiny(1), "--prompt", prompts[0],
              "--prompt", prompts[1], "--max-new-tokens", 6, "--json")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(lines) == 2
    tokenizer = engine_for(1).tokenizer
    for prompt, obj in zip(prompts, lines):
        assert obj["prompt_token_ids"] == tokenizer.encode(prompt)
        assert obj["prompt_token_ids"][0] == 32013
        # transformers' greedy tokens on the same weights, up to dsflow's stop at EOS
        ids = obj["token_ids"]
        reference = hf_greedy(hf_model, obj["prompt_token_ids"], 6)
        if obj["finish_reason"] == "length":
            assert ids == reference
        else:
            assert obj["finish_reason"] == "stop"
            assert ids == reference[:len(ids)] and reference[len(ids)] in tokenizer.eos_ids
        assert obj["text"] == tokenizer.decode(ids)
        assert obj["timings"]["prefill_ms"] > 0
        assert "decode_ms_per_token" in obj["timings"]
    assert "[INFO]" not in r.stderr and "[WARNING]" not in r.stderr


def test_fill_in_the_middle_via_cli_shows_prompt_ids(export_tiny):
    r = dsrun("--artifacts", export_tiny(1), "--prompt", "def f(a", "--suffix", "return a\n",
              "--max-new-tokens", 3, "--json")
    assert r.returncode == 0, r.stderr
    ids = json.loads(r.stdout)["prompt_token_ids"]
    assert ids[:2] == [32013, 32016] and ids[-1] == 32017  # BOS, fim_begin ... fim_end
    assert 32015 in ids  # fim_hole


def test_streamed_text_equals_api_text(export_tiny, engine_for):
    art = export_tiny(1)
    prompt = "def quick_sort(arr):"
    expected = engine_for(1).generate(prompt, SamplingParams(max_new_tokens=10))[0].text
    r = dsrun("--artifacts", art, "--prompt", prompt, "--max-new-tokens", 10, "-q")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"


def test_api_stream_and_chat(engine_for):
    engine = engine_for(2)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    events = list(engine.stream(["x = 1", "long prompt " * 5], params))
    finished = [e.finished for e in events if e.finished]
    assert sorted(c.index for c in finished) == [0, 1]
    for c in finished:
        assert "".join(e.text for e in events if e.index == c.index) == c.text
        assert len(c.token_ids) == 8
    chat = engine.generate("hello", params, chat=True)[0]
    assert chat.prompt_token_ids == engine.tokenizer.encode_chat("hello")


def test_stop_string_via_cli(export_tiny, engine_for):
    art = export_tiny(1)
    full = engine_for(1).generate("print(", SamplingParams(max_new_tokens=12))[0].text
    assert len(full) > 3
    stop = full[2:4]
    r = dsrun("--artifacts", art, "--prompt", "print(", "--max-new-tokens", 12,
              "--stop", stop, "--json")
    obj = json.loads(r.stdout)
    assert obj["finish_reason"] == "stop" and obj["text"] == full[:full.find(stop)]


def test_prompt_too_long_for_cache(engine_for):
    with pytest.raises(Exception, match="exceeds the maximum sequence length"):
        engine_for(1).generate([1] * 500, SamplingParams(max_new_tokens=20))


def test_bad_inputs_give_one_line(export_tiny, tmp_path):
    r = dsrun("--artifacts", tmp_path / "missing", "--prompt", "x")
    assert r.returncode == 1 and "no such artifacts directory" in r.stderr
    assert "Traceback" not in r.stderr
    r = dsrun("--artifacts", export_tiny(1), "--prompt", "x", "--top-p", "1.5")
    assert r.returncode == 2 and "--top-p" in r.stderr and "Traceback" not in r.stderr


def test_altered_artifact_is_detected_by_verify(export_tiny, tmp_path):
    import shutil
    art = tmp_path / "art"
    shutil.copytree(export_tiny(1), art)
    target = art / "rank0" / "decode.mindir"
    target.chmod(0o644)
    data = bytearray(target.read_bytes())
    data[-10] ^= 0xFF
    target.write_bytes(bytes(data))
    r = dsrun("--artifacts", art, "--prompt", "x", "--verify")
    assert r.returncode == 1 and "decode.mindir" in r.stderr and "sha256" in r.stderr


def test_failing_rank_is_reported_and_cluster_torn_down(export_tiny, tmp_path):
    import shutil
    art = tmp_path / "art"
    shutil.copytree(export_tiny(2), art)
    bad = art / "rank1" / "prefill.mindir"
    bad.chmod(0o644)
    bad.write_bytes(b"not a mindir")
    before = set(worker_pids(os.getpid()))  # the session's shared clusters
    start = time.monotonic()
    with pytest.raises(WorkerError, match="rank 1"):
        Engine(art)
    assert time.monotonic() - start < 120
    assert set(worker_pids(os.getpid())) <= before


def test_killed_worker_mid_generation_does_not_hang(export_tiny):
    before = set(worker_pids(os.getpid()))
    engine = Engine(export_tiny(2))
    try:
        victim = engine.cluster.procs["rank1"]
        stream = engine.stream("hello", SamplingParams(max_new_tokens=400, ignore_eos=True))
        next(stream)
        victim.send_signal(signal.SIGKILL)
        with pytest.raises(WorkerError, match="rank1|rank 1"):
            for _ in stream:
                pass
    finally:
        engine.close()
    assert set(worker_pids(os.getpid())) <= before


def test_ctrl_c_ends_everything(export_tiny):
    proc = subprocess.Popen([*DSRUN, "--artifacts", str(export_tiny(2)), "--prompt", "x",
                             "--max-new-tokens", "400"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.read(1)  # generation has started
        assert worker_pids(proc.pid), "workers should be running"
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert b"interrupted" in proc.stderr.read()
    assert worker_pids(proc.pid) == []


def test_artifacts_with_another_signature_are_refused(export_tiny, tmp_path):
    """Artifacts from a dsflow whose decode took (input_ids, positions, key_cache,
    value_cache) would be fed the tensors in the wrong order: refused, naming the file."""
    import shutil
    from dsflow.common.errors import DsflowError
    art = tmp_path / "art"
    shutil.copytree(export_tiny(1), art)
    manifest = json.loads((art / "manifest.json").read_text())
    decode = next(g for g in manifest["graphs"] if g["kind"] == "decode")
    ids, key, pos, value = decode["inputs"]
    decode["inputs"] = [ids, pos, key, value]
    (art / "manifest.json").chmod(0o644)
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DsflowError, match=r"decode.mindir: its inputs differ .* rebuild"):
        Engine(art)

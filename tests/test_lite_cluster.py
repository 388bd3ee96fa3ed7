"""The Ascend path through real worker processes: `--device ascend` with the fake
mindspore_lite (tests/fakes) standing in for the cards and a deterministic kernel
standing in for the graphs. Proves the coordinator, the worker protocol, the cluster
wiring, bucketed shapes and the Lite backend's cache hand-over together; nothing of
real Lite or Ascend runs here."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import TOKENIZER_DIR, require_shared
from dsflow.export.pipeline import lite_build as lb
from dsflow.artifacts.manifest import write_manifest
from dsflow.graphs.config import config_from_hf_dict
from dsflow.graphs.signatures import graph_signature
from dsflow.runtime.engine import Engine
from dsflow.runtime.sampling import SamplingParams

FAKES = Path(__file__).resolve().parent / "fakes"
CFG = config_from_hf_dict({
    "architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 64, "head_dim": 8})
BUCKETS = [16, 32, 64]


def ascend_artifacts(root: Path, tp: int, cache_mode: str = "window") -> Path:
    """Artifacts as `dsexport build --target ascend` lays them out (placeholder MindIR
    files: the fake runtime never parses them), with Lite configs from lite_stage."""
    require_shared()
    graphs = []
    for rank in range(tp):
        for kind in ("prefill", "decode"):
            f = root / f"rank{rank}" / f"{kind}.mindir"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(b"placeholder")
            graphs.append({"rank": rank, "kind": kind, "file": f.relative_to(root).as_posix(),
                           **graph_signature(kind, CFG, tp, "float16", cache_mode).to_dict()})
    (root / "tokenizer").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TOKENIZER_DIR / name, root / "tokenizer" / name)
    data = {"target": "ascend", "dtype": "bfloat16", "tp": tp, "model": CFG.to_dict(),
            # exported by the MindSpore of the (fake) Lite's release
            "mindspore_version": os.environ.get("DSFLOW_FAKE_LITE_VERSION") or "2.10.0",
            "buckets": BUCKETS,
            "kv_cache": {"dtype": "float16", "max_seq_len": 64, "cache_mode": cache_mode},
            "graphs": graphs}
    result = lb.lite_stage(root, data, batch_sizes=(1, 2), env={"PATH": ""})
    lb.apply_lite_entries(graphs, result)
    data["lite"] = result["section"]
    data["kv_cache"].update(result["kv_cache"])
    if tp > 1:  # fill the rank-table template as a user would on the host
        table = json.loads((root / "rank_table.json").read_text())
        for dev in table["server_list"][0]["device"]:
            dev["device_ip"] = f"10.0.0.{dev['device_id']}"  # never contacted: fake Lite
        (root / "rank_table.json").write_text(json.dumps(table))
    write_manifest(root, data)
    return root


def expected_tokens(prompt: list[int], n: int) -> list[int]:
    from fakes.token_sum_kernel import next_token
    seq, out = list(prompt), []
    for _ in range(n):
        out.append(next_token(sum(seq)))
        seq.append(out[-1])
    return out


# The fake mindspore_lite's releases (tests/fakes/mindspore_lite): version, zero-copy.
RELEASES = {"2.7": ("2.7.2", "0"), "2026": ("2.10.0", "1")}


def _fake_env(monkeypatch, tmp_path, release: str) -> None:
    version, zero_copy = RELEASES[release]
    monkeypatch.setenv("DSFLOW_FAKE_LITE_VERSION", version)
    monkeypatch.setenv("DSFLOW_FAKE_LITE_ZERO_COPY", zero_copy)
    monkeypatch.delenv("DSFLOW_LITE_DEVICE_TENSORS", raising=False)
    monkeypatch.delenv("DSFLOW_ALLOW_LITE_VERSION_MISMATCH", raising=False)
    monkeypatch.setenv("PYTHONPATH", f"{FAKES}:{FAKES.parent}")
    monkeypatch.setenv("DSFLOW_FAKE_LITE_KERNEL", "token_sum_kernel:kernel")
    monkeypatch.setenv("DSFLOW_FAKE_LITE_INPUTS", "lite_inputs:from_manifest")
    monkeypatch.setenv("DSFLOW_GE_CACHE", str(tmp_path / "ge-cache"))
    monkeypatch.setenv("DSFLOW_LITE_BUILD_STAGGER_S", "0")
    monkeypatch.syspath_prepend(str(FAKES.parent))


@pytest.fixture(params=sorted(RELEASES))
def fake_lite_env(request, monkeypatch, tmp_path):
    """Workers import the fake mindspore_lite of each release in turn."""
    _fake_env(monkeypatch, tmp_path, request.param)
    return request.param


@pytest.fixture
def zero_copy_env(monkeypatch, tmp_path):
    """The 2026 release only: the resident cache mode needs device tensors."""
    _fake_env(monkeypatch, tmp_path, "2026")


@pytest.mark.parametrize("tp", [1, 2])
def test_ascend_device_generates_through_worker_processes(tmp_path, fake_lite_env,
                                                          monkeypatch, capfd, tp):
    monkeypatch.setenv("DSFLOW_FAKE_TP", str(tp))
    art = ascend_artifacts(tmp_path / "art", tp)
    prompts = [[3, 4, 5], [7] * 20]  # buckets 16 and 32 for the prompt
    with Engine(art, device="ascend", device_ids=list(range(tp))) as engine:
        warm = capfd.readouterr().err  # every rank warmed all 2 x 3 gears up at start-up
        results = engine.generate(prompts, SamplingParams(max_new_tokens=9, ignore_eos=True))
    for rank in range(tp):
        assert f"rank {rank}: warm-up 6/6 (batch 2, length 64)" in warm
    assert all(r["warm_up_s"] > 0 for r in engine.cluster.ready)
    for p, r in zip(prompts, results):
        assert r.token_ids == expected_tokens(p, 9)
    caches = sorted(p.name for p in (tmp_path / "ge-cache").glob("*/rank*"))
    assert caches == [f"rank{r}" for r in range(tp)]  # one GE compile cache per rank


@pytest.mark.parametrize("tp", [1, 2])
def test_resident_cache_generates_through_worker_processes(tmp_path, zero_copy_env,
                                                           monkeypatch, capfd, tp):
    """The device-resident cache (the Ascend default): 2 slots x 64 positions fixed at
    build, requests sharing steps, a chunked prompt; the token-sum kernel reads every
    row's whole sequence out of the cache pair it is given, so a write lost in the
    ping-pong, into the wrong slot or by a padding row changes the tokens."""
    monkeypatch.setenv("DSFLOW_FAKE_TP", str(tp))
    art = ascend_artifacts(tmp_path / "art", tp, "resident")
    prompts = [[3, 4, 5], [7] * 20, [9, 2]]  # 3 requests for 2 slots: one waits
    with Engine(art, device="ascend", device_ids=list(range(tp))) as engine:
        warm = capfd.readouterr().err
        assert (engine.plan.slots, engine.plan.capacity, engine.plan.copies) == (2, 64, 2)
        results = engine.generate(prompts, SamplingParams(max_new_tokens=9, ignore_eos=True))
        # n = 2: no device-side slot copy (configure says so), each sample is prefilled
        assert engine.scheduler.copy_slot is False
        samples = engine.submit([5, 6], SamplingParams(max_new_tokens=4, n=2,
                                                       ignore_eos=True)).result(timeout=60)
    assert [c.token_ids for c in samples] == [expected_tokens([5, 6], 4)] * 2
    for rank in range(tp):
        assert f"rank {rank}: warm-up 2/2 (batch 2, cache 64)" in warm
    for p, r in zip(prompts, results):
        assert r.token_ids == expected_tokens(p, 9)
    with pytest.raises(Exception, match="--max-batch 4: these artifacts keep the KV cache "
                                        "on the device as 2 slots x 64 positions"):
        Engine(art, device="ascend", device_ids=list(range(tp)), max_batch=4)


def test_cpu_artifacts_refused_on_ascend_and_vice_versa(tmp_path, export_tiny):
    with pytest.raises(Exception, match="--target cpu; it cannot run on --device ascend"):
        Engine(export_tiny(1), device="ascend")
    art = ascend_artifacts(tmp_path / "art", 1)
    with pytest.raises(Exception, match="fused Ascend operators have no CPU kernels"):
        Engine(art, device="cpu")
    with pytest.raises(Exception, match="--devices needs 2 distinct"):
        Engine(ascend_artifacts(tmp_path / "art2", 2), device="ascend", device_ids=[0, 0])


def test_devices_that_contradict_the_rank_table_are_reported(tmp_path, fake_lite_env,
                                                            monkeypatch):
    monkeypatch.setenv("DSFLOW_FAKE_TP", "2")
    art = ascend_artifacts(tmp_path / "art", 2)
    with pytest.raises(Exception, match=r"rank_table.json: rank \d is not on device \d"):
        Engine(art, device="ascend", device_ids=[1, 0])


def test_mismatched_lite_version_is_refused_by_every_rank(tmp_path, fake_lite_env,
                                                         monkeypatch):
    monkeypatch.setenv("DSFLOW_FAKE_TP", "1")
    art = ascend_artifacts(tmp_path / "art", 1)
    exported = os.environ["DSFLOW_FAKE_LITE_VERSION"]
    monkeypatch.setenv("DSFLOW_FAKE_LITE_VERSION", "2.9.1")
    with pytest.raises(Exception, match=rf"MindSpore {exported}, but this mindspore_lite is "
                                        r"2\.9\.1"):
        Engine(art, device="ascend")


def test_resident_artifacts_are_refused_by_a_lite_without_device_tensors(tmp_path, monkeypatch):
    """Lite 2.7 (host-pointer GE executor): resident artifacts stop at start-up with the
    one line saying how to rebuild, from the workers, not at the first predict."""
    _fake_env(monkeypatch, tmp_path, "2.7")
    monkeypatch.setenv("DSFLOW_FAKE_TP", "1")
    art = ascend_artifacts(tmp_path / "art", 1, "resident")
    with pytest.raises(Exception, match=r"mindspore_lite 2\.7\.2 cannot take .*"
                                        r"--cache-mode window"):
        Engine(art, device="ascend")

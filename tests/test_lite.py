"""The Ascend / MindSpore Lite path, everything but the mindspore_lite calls themselves:
ini generation (tiny and 33B configs), the rank table, converter discovery and the
generated script, and the Lite backend's call sequence against a recording fake
`mindspore_lite` (tests/fakes). No NPU, no mindspore_lite, no mindspore import."""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import CONFIGS_DIR
from dsflow.export.pipeline import lite_build as lb
from dsflow.artifacts import lite as lite_names
from dsflow.artifacts.manifest import Manifest, write_manifest
from dsflow.graphs.config import config_from_hf_dict, load_config
from dsflow.graphs.signatures import graph_signature

FAKES = Path(__file__).resolve().parent / "fakes"
BUCKETS = [16, 32, 64]
SMALL = {"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32,
         "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 64}
CFG = config_from_hf_dict(SMALL)


# The fake mindspore_lite's two releases (tests/fakes/mindspore_lite): (version, zero-copy
# GE executor). The artifacts of a test are exported "with the matching MindSpore".
RELEASES = {"2.7": ("2.7.2", False), "2026": ("2.10.0", True)}


# ---- helpers ------------------------------------------------------------------------
def exporting_mindspore() -> str:
    """The MindSpore release the test's artifacts claim: the fake Lite's, as a build on
    the host of that Lite records it."""
    return os.environ.get("DSFLOW_FAKE_LITE_VERSION") or "2.10.0"


def manifest_data(tp: int, dtype: str = "float16", buckets=BUCKETS,
                  cache_mode: str = "window") -> dict:
    graphs = [{"rank": r, "kind": k, "file": f"rank{r}/{k}.mindir",
               **graph_signature(k, CFG, tp, dtype, cache_mode).to_dict()}
              for r in range(tp) for k in ("prefill", "decode")]
    return {"model": CFG.to_dict(), "tp": tp, "dtype": dtype, "buckets": buckets,
            "mindspore_version": exporting_mindspore(),
            "created": "2026-11-30T12:00:00+0000",
            "kv_cache": {"max_seq_len": 64, "dtype": dtype, "cache_mode": cache_mode},
            "graphs": graphs}


def artifacts(root: Path, tp: int, dtype: str = "float16", env=None, cache_mode="window",
              **kw) -> tuple[Manifest, dict]:
    data = manifest_data(tp, dtype, cache_mode=cache_mode)
    for g in data["graphs"]:
        (root / g["file"]).parent.mkdir(parents=True, exist_ok=True)
        (root / g["file"]).write_bytes(b"mindir")
    result = lb.lite_stage(root, data, env=env if env is not None else {"PATH": ""}, **kw)
    lb.apply_lite_entries(data["graphs"], result)
    data["lite"] = result["section"]
    data["kv_cache"].update(result["kv_cache"])
    write_manifest(root, data)  # the fake's get_inputs() reads the signatures there
    return Manifest(root, data), result


def with_cann(tmp_path: Path, env: dict) -> dict:
    """`env` plus what CANN's set_env.sh exports (the converter tests need CANN)."""
    (tmp_path / "cann").mkdir(exist_ok=True)
    return {**env, "ASCEND_HOME_PATH": str(tmp_path / "cann")}


def fake_converter(bin_dir: Path, rc: int = 0, says: str = "CONVERT RESULT FAILED:-1") -> Path:
    bin_dir.mkdir(parents=True, exist_ok=True)
    conv = bin_dir / "converter_lite"
    conv.write_text(f"""#!/usr/bin/env bash
echo "$@ LD=${{LD_LIBRARY_PATH:-}}" >> "{bin_dir}/calls.log"
for a in "$@"; do case "$a" in --outputFile=*) out="${{a#--outputFile=}}";;
  --modelFile=*) in="${{a#--modelFile=}}";; esac; done
[ -f "$in" ] || {{ echo "no model $in"; exit 3; }}
echo partial > "$out.mindir"
if [ {rc} -ne 0 ]; then echo "{says}"; exit {rc}; fi
echo converted > "$out.mindir"; echo "CONVERT RESULT SUCCESS:0"
""")
    conv.chmod(0o755)
    return conv


def graph_options(text: str) -> dict:
    return lb.parse_ini(text)["ge_graph_options"]


# ---- gears and ini ------------------------------------------------------------------
def test_ini_tiny_batch1_matches_signature_and_buckets():
    for kind in ("prefill", "decode"):
        sig = graph_signature(kind, CFG, 2, "float16")
        ini = lb.parse_ini(lb.lite_config(sig, BUCKETS, rank_table_file="rank_table.json"))
        assert ini["ascend_context"] == {"plugin_custom_ops": "All", "provider": "ge",
                                         "rank_table_file": "rank_table.json"}
        assert ini["ge_session_options"] == dict(lb.SESSION_OPTIONS)
        shape = ini["ge_graph_options"]["ge.inputShape"].split(";")
        assert [s.split(":")[0] for s in shape] == sorted(t.name for t in sig.inputs)
        gears = [g.split(",") for g in ini["ge_graph_options"]["ge.dynamicDims"].split(";")]
        # only kv_len varies (a prefill chunk's seq is static: the smallest bucket)
        assert [set(map(int, g)) for g in gears] == [{b} for b in BUCKETS]
        assert ini["ge_graph_options"]["ge.dynamicNodeType"] == "1"


def test_ini_33b_tp4():
    cfg = load_config(CONFIGS_DIR / "deepseek-coder-33b-instruct.config.json")
    buckets = [512, 1024, 2048, 4096, 8192, 16384]
    pre = graph_options(lb.lite_config(graph_signature("prefill", cfg, 4, "bfloat16"), buckets))
    dec = graph_options(lb.lite_config(graph_signature("decode", cfg, 4, "bfloat16"), buckets))
    window = "62,1,2,-1,128"  # [layers, batch, kv heads per rank, kv_len, head dim]
    assert pre["ge.inputShape"] == (f"input_ids:1,512;key_window:{window};start:1;"
                                    f"valid_length:1;value_window:{window}")
    assert pre["ge.dynamicDims"] == ";".join(f"{b},{b}" for b in buckets)
    assert dec["ge.inputShape"] == (f"input_ids:1;key_window:{window};positions:1;"
                                    f"value_window:{window}")
    assert dec["ge.dynamicDims"] == ";".join(f"{b},{b}" for b in buckets)


def test_batch_gears_and_limit():
    sig = graph_signature("decode", CFG, 1, "float16")
    assert lb.ge_input_shape(sig, [16, 32], [1, 4]) == (
        "input_ids:-1;key_window:2,-1,2,-1,8;positions:-1;value_window:2,-1,2,-1,8")
    dims = lb.ge_dynamic_dims(sig, [16, 32], [4, 1]).split(";")
    assert dims == ["1,1,16,1,1,16", "1,1,32,1,1,32", "4,4,16,4,4,16", "4,4,32,4,4,32"]
    prefill = graph_signature("prefill", CFG, 1, "float16")  # chunk: the smallest bucket
    assert lb.ge_input_shape(prefill, [16], [1, 2]) == (
        "input_ids:-1,16;key_window:2,-1,2,16,8;start:-1;valid_length:-1;"
        "value_window:2,-1,2,16,8")
    assert lb.ge_dynamic_dims(prefill, [16], [1, 2]) == "1,1,1,1,1;2,2,2,2,2"
    with pytest.raises(lb.LiteBuildError, match="at most 100"):
        lb.gears(list(range(1, 12)), list(range(1, 11)))
    with pytest.raises(lb.LiteBuildError, match="positive"):
        lb.gears([0, 16])


@pytest.mark.parametrize("buckets", [[4096], [64]])
def test_one_gear_is_written_as_static_shapes(buckets):
    """GE refuses dynamicDims with fewer than 2 gears (E10035): `--buckets 4096`, or a
    --max-seq-len <= 512 whose only bucket is max_seq, must give static shapes."""
    n = buckets[0]
    pre = graph_options(lb.lite_config(graph_signature("prefill", CFG, 1, "float16"), buckets))
    dec = graph_options(lb.lite_config(graph_signature("decode", CFG, 2, "float16"), buckets))
    assert pre == {"ge.inputShape": f"input_ids:1,{n};key_window:2,1,2,{n},8;start:1;"
                                    f"valid_length:1;value_window:2,1,2,{n},8"}
    assert dec == {"ge.inputShape": f"input_ids:1;key_window:2,1,1,{n},8;positions:1;"
                                    f"value_window:2,1,1,{n},8"}


def ge_shapes_per_gear(graph_input_names: list, ini_text: str, by_name: bool) -> list:
    """What GE does with the ini, after CANN ge compiler/graph/preprocess/
    multi_batch_options.cc: Data nodes sorted by name (SortDataNodesByName; older GE: in
    graph order); the i-th ge.inputShape entry goes to the i-th node (UpdateNameOfData),
    and each gear's values fill the -1s entry after entry (ParserDataToDynamicInfo).
    -> per gear, {node name: shape}; a single static gear when there is no dynamicDims."""
    opts = graph_options(ini_text)
    entries = [e.rsplit(":", 1)[1] for e in opts["ge.inputShape"].split(";")]
    shapes = [[int(d) for d in e.split(",")] for e in entries]
    nodes = sorted(graph_input_names, key=str.encode) if by_name else list(graph_input_names)
    assert len(nodes) == len(shapes)
    gears = [[int(v) for v in g.split(",")] for g in opts["ge.dynamicDims"].split(";")] \
        if "ge.dynamicDims" in opts else [[]]
    out = []
    for gear in gears:
        values = iter(gear)
        out.append({node: [next(values) if d == -1 else d for d in shape]
                    for node, shape in zip(nodes, shapes)})
    return out


@pytest.mark.parametrize("by_name", [True, False])  # current GE, older GE
@pytest.mark.parametrize("kind", ["prefill", "decode"])
@pytest.mark.parametrize("batch_sizes", [[1], [1, 2]])
def test_ge_pairs_every_input_with_its_own_shape_in_every_gear(kind, batch_sizes, by_name):
    sig = graph_signature(kind, CFG, 2, "float16")
    got = ge_shapes_per_gear([t.name for t in sig.inputs],
                             lb.lite_config(sig, BUCKETS, batch_sizes), by_name)
    want = []
    for batch, length in lb.gears(BUCKETS, batch_sizes):
        dims = {"batch": batch, "seq": BUCKETS[0], "kv_len": length}  # chunk: smallest bucket
        want.append({t.name: [d if isinstance(d, int) else dims[d] for d in t.shape]
                     for t in sig.inputs})
    assert got == want


def test_signatures_out_of_name_order_are_refused():
    from dsflow.graphs.signatures import GraphSignature, TensorSpec, check_input_order
    sig = GraphSignature("decode", (TensorSpec("positions", ("batch",), "int32"),
                                    TensorSpec("key_cache", ("batch",), "float16")), ())
    with pytest.raises(ValueError, match="not in name order"):
        check_input_order(sig)
    with pytest.raises(ValueError, match="not in name order"):
        lb.lite_config(sig, BUCKETS)


# ---- rank table ---------------------------------------------------------------------
def test_rank_table_template_and_check(tmp_path):
    table = lb.rank_table(4, [4, 5, 6, 7])
    devs = table["server_list"][0]["device"]
    assert [(d["device_id"], d["rank_id"]) for d in devs] == [("4", "0"), ("5", "1"),
                                                              ("6", "2"), ("7", "3")]
    assert table["status"] == "completed" and table["server_count"] == "1"
    path = tmp_path / "rt.json"
    path.write_text(json.dumps(table))
    with pytest.raises(lb.LiteBuildError, match="hccn_tool"):
        lite_names.check_rank_table(path, 1, 5)
    path.write_text(json.dumps(lb.rank_table(4, [4, 5, 6, 7], [f"10.0.0.{i}" for i in range(4)])))
    lite_names.check_rank_table(path, 1, 5)
    with pytest.raises(lb.LiteBuildError, match="rank 1 is not on device 2"):
        lite_names.check_rank_table(path, 1, 2)
    with pytest.raises(lb.LiteBuildError, match="distinct"):
        lb.rank_table(2, [0, 0])


# ---- converter ----------------------------------------------------------------------
def test_converter_on_path_converts_every_graph(tmp_path):
    conv = fake_converter(tmp_path / "bin")
    manifest, result = artifacts(tmp_path / "art", 2,
                                 env=with_cann(tmp_path, {"PATH": str(conv.parent)}))
    assert result["notice"].startswith("Fill in device_ip")  # converted; rank table to fill
    assert not (tmp_path / "art" / lb.SCRIPT_NAME).exists()
    for r in range(2):
        for kind in ("prefill", "decode"):
            entry = result["graphs"][f"rank{r}/{kind}"]
            assert entry == {"stage": "lite", "lite_stem": f"rank{r}/{kind}_lite",
                             "lite_file": f"rank{r}/{kind}_lite.mindir",
                             "config": f"rank{r}/{kind}.ini"}
            assert lite_names.model_file(manifest.root, manifest.graph(r, kind)).is_file()
    calls = (conv.parent / "calls.log").read_text().splitlines()
    assert len(calls) == 4 and all("--fmk=MINDIR" in c and "--optimize=ascend_oriented" in c
                                   and "--saveType=MINDIR" in c and "--configFile=" in c
                                   for c in calls)


def test_converter_under_mslite_home_gets_its_libs(tmp_path):
    home = tmp_path / "mindspore-lite-2.x-linux-aarch64"
    conv = fake_converter(home / "tools/converter/converter")
    (home / "tools/converter/lib").mkdir()
    found = lb.find_converter({"PATH": "", "MSLITE_HOME": str(home)})
    assert found.path == conv
    assert found.env["LD_LIBRARY_PATH"].split(":")[0] == str(home / "tools/converter/lib")
    assert lb.find_converter({"PATH": "", "MSLITE_HOME": str(tmp_path / "nowhere")}) is None
    _, result = artifacts(tmp_path / "art", 1,
                          env=with_cann(tmp_path, {"PATH": "", "MSLITE_HOME_PATH": str(home)}))
    assert {e["stage"] for e in result["graphs"].values()} == {"lite"}
    log = (conv.parent / "calls.log").read_text()
    assert log.count(f"LD={home / 'tools/converter/lib'}") == 2


def test_failing_converter_reports_its_output(tmp_path):
    conv = fake_converter(tmp_path / "bin", rc=2)
    with pytest.raises(lb.LiteBuildError, match="exit 2.*\n.*CONVERT RESULT FAILED"):
        artifacts(tmp_path / "art", 1, env=with_cann(tmp_path, {"PATH": str(conv.parent)}))


def assert_left_to_the_script(manifest, result, why: str) -> None:
    assert why in result["notice"] and lb.SCRIPT_NAME in result["notice"]
    assert all(e["stage"] == "mindir" for e in result["graphs"].values())
    assert (manifest.root / lb.SCRIPT_NAME).is_file()
    for r in range(manifest.tp):  # no partial conversion output is left to be picked up
        for kind in ("prefill", "decode"):
            assert lite_names.model_file(manifest.root, manifest.graph(r, kind)).name == f"{kind}.mindir"


def test_converter_without_cann_falls_back_to_the_script(tmp_path):
    conv = fake_converter(tmp_path / "bin")
    manifest, result = artifacts(tmp_path / "art", 2, env={"PATH": str(conv.parent)})
    assert_left_to_the_script(manifest, result, "but no CANN set up here")
    assert "ASCEND_HOME_PATH" in result["notice"] and "set_env.sh" in result["notice"]
    assert not (conv.parent / "calls.log").exists()  # not even tried


def test_conversion_failing_for_lack_of_cann_falls_back_to_the_script(tmp_path):
    conv = fake_converter(tmp_path / "bin", rc=1, says="converter_lite: error while loading "
                          "shared libraries: libascendcl.so: cannot open shared object file")
    manifest, result = artifacts(tmp_path / "art", 2,
                                 env=with_cann(tmp_path, {"PATH": str(conv.parent)}))
    assert_left_to_the_script(manifest, result, "failed for lack of CANN (converter_lite: "
                                                "error while loading shared libraries")


def test_no_converter_writes_a_script_that_works(tmp_path):
    manifest, result = artifacts(tmp_path / "art", 2)
    assert_left_to_the_script(manifest, result, "converter_lite not found")
    entry = manifest.graph(1, "decode")
    assert lite_names.model_file(manifest.root, entry) == manifest.root / "rank1/decode.mindir"
    script = manifest.root / lb.SCRIPT_NAME
    assert os.access(script, os.X_OK)
    assert script.read_text().count("--optimize=ascend_oriented") == 4
    conv = fake_converter(tmp_path / "bin")
    env = {**os.environ, "PATH": f"{conv.parent}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert lite_names.model_file(manifest.root, entry) == manifest.root / "rank1/decode_lite.mindir"
    bad = subprocess.run(["bash", str(script)], env={**env, "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "converter_lite not found" in bad.stderr


def test_lite_stage_refuses_missing_buckets_and_altered_signatures(tmp_path):
    with pytest.raises(lb.LiteBuildError, match="--buckets"):
        lb.lite_stage(tmp_path, {**manifest_data(1), "buckets": None}, env={"PATH": ""})
    data = manifest_data(1)
    data["graphs"][0]["inputs"][0]["name"] = "tokens"
    with pytest.raises(lb.LiteBuildError, match="differ from graph_signature"):
        lb.lite_stage(tmp_path, data, env={"PATH": ""})


# ---- the backend against the fake ---------------------------------------------------
def use_token_sum_kernel(fake, monkeypatch, tp: int) -> None:
    """The deterministic stand-in for the graphs (tests/fakes/token_sum_kernel.py)."""
    monkeypatch.setenv("DSFLOW_FAKE_TP", str(tp))
    monkeypatch.syspath_prepend(str(FAKES))
    from token_sum_kernel import kernel
    fake.KERNEL = kernel


def _fresh_fake(monkeypatch, tmp_path, release: str):
    """A freshly imported fake mindspore_lite of `release` (so import-time state is per
    test); the variables the backend sets are restored after the test."""
    monkeypatch.syspath_prepend(str(FAKES))
    monkeypatch.delitem(sys.modules, "mindspore_lite", raising=False)
    for name in ("HCCL_NPU_SOCKET_PORT_RANGE", "HCCL_CONNECT_TIMEOUT", "ASCEND_WORK_PATH",
                 "DSFLOW_ALLOW_LITE_VERSION_MISMATCH", "DSFLOW_LITE_DEVICE_TENSORS"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    version, zero_copy = RELEASES[release]
    monkeypatch.setenv("DSFLOW_FAKE_LITE_VERSION", version)
    monkeypatch.setenv("DSFLOW_FAKE_LITE_ZERO_COPY", "1" if zero_copy else "0")
    monkeypatch.setenv("DSFLOW_FAKE_LITE_INPUTS", "lite_inputs:from_manifest")
    monkeypatch.setenv("DSFLOW_GE_CACHE", str(tmp_path / "ge-cache"))
    return lambda: sys.modules["mindspore_lite"]


@pytest.fixture(params=sorted(RELEASES))
def fake_lite(request, monkeypatch, tmp_path):
    """The fake mindspore_lite, once per release: what runs in the window cache mode
    must run on both."""
    yield _fresh_fake(monkeypatch, tmp_path, request.param)
    sys.modules.pop("mindspore_lite", None)


@pytest.fixture()
def zero_copy_lite(monkeypatch, tmp_path):
    """The 2026 release only: the resident cache mode needs device tensors."""
    yield _fresh_fake(monkeypatch, tmp_path, "2026")
    sys.modules.pop("mindspore_lite", None)


@pytest.fixture()
def old_lite(monkeypatch, tmp_path):
    """The 2.7 release only (no zero-copy executor)."""
    yield _fresh_fake(monkeypatch, tmp_path, "2.7")
    sys.modules.pop("mindspore_lite", None)


class Turns:
    """Records the build-turn calls through `record(name, rank)`."""

    def __init__(self, record):
        self.record = record

    def wait(self, rank):
        self.record("turn_wait", rank)

    def done(self, rank):
        self.record("turn_done", rank)


def filled_table(manifest: Manifest, devices) -> None:
    ips = [f"10.0.0.{d}" for d in devices]
    (manifest.root / "rank_table.json").write_text(
        json.dumps(lb.rank_table(manifest.tp, devices, ips)))


def test_backend_call_sequence_and_slot_cache(tmp_path, fake_lite, monkeypatch):
    from dsflow.runtime.backends.lite import LiteBackend
    manifest, _ = artifacts(tmp_path, 2, batch_sizes=[1, 2])
    filled_table(manifest, [4, 5])

    def record(*event):  # into the fake's own log, to check the order against its calls
        sys.modules["mindspore_lite"].CALLS.append(event)
    backend = LiteBackend(manifest, 1, 5, barrier=lambda: record("barrier"),
                          turns=Turns(record))
    fake = fake_lite()
    use_token_sum_kernel(fake, monkeypatch, 2)
    assert fake.IMPORT_ENV == {"HCCL_NPU_SOCKET_PORT_RANGE": "21500-21600",
                               "HCCL_CONNECT_TIMEOUT": "1800"}
    calls = fake.CALLS
    kinds = [c[0] for c in calls if c[0] != "tensor"]
    assert kinds == ["group", "add_model", "turn_wait", "build", "build", "turn_done",
                     "barrier"]
    assert calls[0][1] == fake.ModelGroupFlag.SHARE_WEIGHT
    builds = [c for c in calls if c[0] == "build"]
    assert [Path(b[2]).name for b in builds] == ["prefill.mindir", "decode.mindir"]
    assert [Path(b[4]).name for b in builds] == ["prefill.ini", "decode.ini"]
    cache = builds[0][5]["ge_session_options"]["ge.graph_compiler_cache_dir"]
    assert builds[0][5] == builds[1][5] == {
        "ascend_context": {"rank_table_file": str((tmp_path / "rank_table.json").resolve())},
        "ge_session_options": {"ge.graph_compiler_cache_dir": cache}}
    assert Path(cache).is_dir() and Path(cache).name == "rank1"  # created before the build
    assert os.environ["ASCEND_WORK_PATH"] == str(Path(cache) / "work")
    assert builds[0][6] == {"target": ["ascend"], "device_id": 5, "rank_id": 1,
                            "provider": "ge", "precision_mode": "enforce_origin"}
    assert backend.configure(slots=2, capacity=64)["cache_bytes"] == \
        2 * CFG.num_layers * 2 * 1 * 64 * CFG.head_dim * 2  # fp16, 1 KV head per rank
    n_before = len(calls)
    # slot 1 gets [1, 2, 3] in two chunks; slot 0 gets [4..8] in one
    i32 = lambda *v: np.array(v, np.int32)  # noqa: E731
    chunk = np.zeros((2, 16), np.int32)
    chunk[0, :2], chunk[1, :5] = [1, 2], [4, 5, 6, 7, 8]
    backend.prefill(i32(1, 0), chunk, i32(0, 0), i32(2, 5), 16)
    logits = backend.prefill(i32(1), np.array([[3] + [0] * 15], np.int32), i32(2), i32(1), 16)
    assert logits.shape == (1, 32) and logits.dtype == np.float32
    totals = {1: 6, 0: 30}
    for tok, pos in (((10, 20), (3, 5)), ((11, 21), (4, 6))):
        out = backend.decode(i32(1, 0), i32(*tok), i32(*pos), 16)
        totals = {1: totals[1] + tok[0], 0: totals[0] + tok[1]}
        # token_sum_kernel: one-hot at (total % 50 + 5), rank 1 holds ids 32..63
        assert [int(np.argmax(r)) + 32 if r.any() else None for r in out] == \
            [t % 50 + 5 if t % 50 + 5 >= 32 else None for t in (totals[1], totals[0])]
    resizes = [c for c in calls[n_before:] if c[0] == "resize"]
    def window(batch):  # [layers, batch, 1 KV head per rank, kv_len 16, head dim]
        return [CFG.num_layers, batch, 1, 16, CFG.head_dim]
    assert resizes == [  # inputs in name order (graphs/signatures.py)
        ("resize", builds[0][1], [[2, 16], window(2), [2], [2], window(2)]),
        ("resize", builds[0][1], [[1, 16], window(1), [1], [1], window(1)]),
        ("resize", builds[1][1], [[2], window(2), [2], window(2)])]


def test_backend_refuses_off_gear_shapes_and_pads_batch(tmp_path, fake_lite, monkeypatch):
    from dsflow.runtime.backends.lite import LiteBackend, LiteBackendError
    from dsflow.runtime.slot_cache import CacheLimitError
    manifest, _ = artifacts(tmp_path, 1, batch_sizes=[1, 4])
    backend = LiteBackend(manifest, 0, 0)
    use_token_sum_kernel(fake_lite(), monkeypatch, 1)
    backend.configure(slots=4, capacity=64)
    one = np.array([3], np.int32)
    with pytest.raises(LiteBackendError, match="prompt chunk length 20 is not a GE gear"):
        backend.prefill(np.array([0], np.int32), np.zeros((1, 20), np.int32), one * 0, one, 32)
    with pytest.raises(CacheLimitError, match="batch \\(5\\) fits no shape gear"):
        backend.prefill(np.arange(5, dtype=np.int32), np.zeros((5, 16), np.int32),
                        np.zeros(5, np.int32), np.full(5, 3, np.int32), 32)
    slots = np.array([0, 1, 2], np.int32)
    out = backend.prefill(slots, np.ones((3, 16), np.int32), np.zeros(3, np.int32),
                          np.full(3, 2, np.int32), 16)
    assert out.shape == (3, 64)
    pred = [c for c in fake_lite().CALLS if c[0] == "predict"][-1]
    assert [s[0] for s in pred[2]] == [4, 2, 4, 4, 2]  # padded up to the batch gear
    assert pred[2][1][1] == 4 and pred[2][0] == [4, 16]  # windows too (axis 1: batch)
    out = backend.decode(slots, np.ones(3, np.int32), np.full(3, 2, np.int32), 16)
    assert out.shape == (3, 64) and list(out.argmax(1)) == [3 % 50 + 5] * 3


def test_backend_builds_in_rank_order(tmp_path, fake_lite):
    """Rank 1 starts first and must not build until rank 0 has built: rank 1 is known to
    be waiting (an event set inside its turn's wait) before rank 0 starts, and the
    builds come out in rank order with rank 0's marker written before rank 1 builds."""
    from dsflow.runtime.backends.lite import FileTurns, LiteBackend
    manifest, _ = artifacts(tmp_path / "art", 2)
    filled_table(manifest, [0, 1])
    import time
    errors, waiting = [], threading.Event()
    fake = importlib.import_module("mindspore_lite")  # the one both ranks will import

    class Signalling(FileTurns):
        def wait(self, rank):
            if rank == 1:
                waiting.set()
            super().wait(rank)

        def done(self, rank):
            super().done(rank)
            fake.CALLS.append(("turn_done", rank))

    def start(rank):
        try:
            turns = Signalling(tmp_path, settle_s=0.0, sleep=time.sleep, poll_s=0.01)
            LiteBackend(manifest, rank, rank, barrier=lambda: None, turns=turns)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    t1 = threading.Thread(target=start, args=(1,), daemon=True)
    t1.start()
    assert waiting.wait(60), "rank 1 never reached its turn"
    assert not [c for c in fake_lite().CALLS if c[0] == "build"]  # rank 1 still waits
    start(0)
    t1.join(60)  # a guard against a hang, not a bound the property depends on
    assert not t1.is_alive() and not errors, errors
    fake = fake_lite()
    order = [("build", c[6]["rank_id"]) if c[0] == "build" else c for c in fake.CALLS
             if c[0] in ("build", "turn_done")]
    assert order == [("build", 0), ("build", 0), ("turn_done", 0), ("build", 1),
                     ("build", 1), ("turn_done", 1)]


def test_file_turns_waits_settles_and_times_out(tmp_path):
    from dsflow.runtime.backends.lite import FileTurns, LiteBackendError
    slept = []
    turns = FileTurns(tmp_path, settle_s=8.0, sleep=slept.append, poll_s=1.0)
    turns.wait(0)
    assert slept == []
    turns.done(0)
    turns.wait(1)
    assert slept == [8.0]
    with pytest.raises(LiteBackendError, match="rank 2 did not finish"):
        FileTurns(tmp_path, timeout_s=3, sleep=lambda s: None).wait(3)


def test_backend_refusals_before_any_build(tmp_path, fake_lite, monkeypatch):
    from dsflow.runtime.backends.lite import LiteBackend, LiteBackendError
    manifest, _ = artifacts(tmp_path / "a", 1, dtype="bfloat16")
    with pytest.raises(LiteBackendError, match="no DataType for 'bfloat16'.*float16"):
        LiteBackend(manifest, 0, 0)
    manifest, _ = artifacts(tmp_path / "b", 2)  # rank table still holds placeholders
    with pytest.raises(Exception, match="hccn_tool"):
        LiteBackend(manifest, 0, 0, turns=Turns(lambda *e: None))
    assert not [c for c in fake_lite().CALLS if c[0] == "build"]
    manifest, _ = artifacts(tmp_path / "c", 1)
    del manifest.data["graphs"][0]["config"]  # a CPU build has no Lite entries
    with pytest.raises(LiteBackendError, match="--target ascend"):
        LiteBackend(manifest, 0, 0)
    monkeypatch.setenv("HCCL_NPU_SOCKET_PORT_RANGE", "30000-30100")  # a user's choice is kept
    importlib.import_module("dsflow.runtime.backends.lite").import_mindspore_lite()
    assert os.environ["HCCL_NPU_SOCKET_PORT_RANGE"] == "30000-30100"


def test_missing_mindspore_lite_is_a_clear_error(tmp_path, monkeypatch):
    from dsflow.runtime.backends.lite import LiteBackend, LiteUnavailableError
    monkeypatch.setitem(sys.modules, "mindspore_lite", None)  # import fails
    manifest, _ = artifacts(tmp_path, 1)
    with pytest.raises(LiteUnavailableError) as e:
        LiteBackend(manifest, 0, 0)
    message = str(e.value)
    assert "mindspore_lite" in message and "pip install" in message
    assert "--device cpu" in message and "CANN" in message


# ---- the fake is as strict as mindspore_lite -----------------------------------------
def built_model(fake, tmp_path):
    manifest, _ = artifacts(tmp_path / "strict", 1)
    model = fake.Model()
    assert model.get_inputs() == []  # nothing before a build
    ctx = fake.Context()
    ctx.target = ["ascend"]
    model.build_from_file(str(manifest.graph_path(0, "decode")), fake.ModelType.MINDIR, ctx)
    return model


def test_fake_rejects_what_mindspore_lite_rejects(tmp_path, fake_lite):
    """Each call the real API refuses (tests/fakes/mindspore_lite names the source of
    each rule) is refused by the fake too, so the backend cannot come to rely on it."""
    fake = importlib.import_module("mindspore_lite")
    group, model = fake.ModelGroup(), fake.Model()  # default flag: SHARE_WORKSPACE
    with pytest.raises(RuntimeError, match="add model failed"):
        group.add_model([model])
    shared = fake.ModelGroup(fake.ModelGroupFlag.SHARE_WEIGHT)
    shared.add_model([model])
    with pytest.raises(RuntimeError, match="add model failed"):  # already in a group
        fake.ModelGroup(fake.ModelGroupFlag.SHARE_WEIGHT).add_model([model])
    ascend = fake.Context().ascend
    with pytest.raises(ValueError, match="ascend_precision_mode must be in"):
        ascend.precision_mode = "must_keep_origin_dtype"  # GE's name, not Lite's
    for field in ("device_id", "rank_id"):
        with pytest.raises(TypeError):
            setattr(ascend, field, "0")
        with pytest.raises(TypeError):
            setattr(ascend, field, np.int64(1))
        with pytest.raises(ValueError, match="non-negative"):
            setattr(ascend, field, -1)
    for device in ("npu:0", "ascend:x", "ascend:0:1", "cpu"):
        with pytest.raises(TypeError):
            fake.Tensor(shape=[1], dtype=fake.DataType.INT32, device=device)
    with pytest.raises(TypeError, match="shape element must be int"):
        fake.Tensor(shape=[np.int64(1)], dtype=fake.DataType.INT32)
    fake.Tensor(shape=[1], dtype=fake.DataType.INT32, device="ascend")  # no index: fine
    model = built_model(fake, tmp_path)
    inputs = model.get_inputs()
    assert [t.shape for t in inputs] == [[-1], [2, -1, 2, -1, 8], [-1], [2, -1, 2, -1, 8]]
    with pytest.raises(ValueError, match="does not match dims' size"):
        model.resize(inputs, [[1], [1], [2, 1, 2, 16, 8]])
    with pytest.raises(RuntimeError, match="resize failed"):
        model.resize(inputs[:2], [[1], [1]])
    with pytest.raises(RuntimeError, match="resize failed"):
        model.resize(inputs, [[1], [2, 1, 2, -1, 8], [1], [2, 1, 2, 16, 8]])
    with pytest.raises(TypeError):
        model.resize(inputs, [[1], [2, 1, 2, np.int64(16), 8], [1], [2, 1, 2, 16, 8]])
    with pytest.raises(RuntimeError, match="model input len:4 not equal input len:2"):
        model.predict([fake.Tensor(np.zeros(1, np.int32))] * 2)
    with pytest.raises(TypeError, match="outputs must be list"):
        model.predict(model.get_inputs(), outputs=tuple(model.get_inputs()))
    path = str(tmp_path / "strict" / "rank0" / "decode.mindir")
    for bad in ({"ascend_context": {"rank_table_file": Path(path)}}, {"ge_session_options": 1}):
        with pytest.raises(TypeError, match="config_dict"):
            fake.Model().build_from_file(path, fake.ModelType.MINDIR, config_dict=bad)
    with pytest.raises(TypeError):
        fake.Model().build_from_file(Path(path), fake.ModelType.MINDIR)
    with pytest.raises(TypeError):
        fake.Context().target = "ascend"


# ---- version pinning, warm-up -----------------------------------------------------------
def test_lite_version_must_match_the_exporting_mindspore(tmp_path, fake_lite, monkeypatch):
    from dsflow.runtime.backends.lite import LiteBackend, LiteBackendError
    manifest, _ = artifacts(tmp_path, 1)
    exported = exporting_mindspore()
    monkeypatch.setenv("DSFLOW_FAKE_LITE_VERSION", "2.9.0")
    with pytest.raises(LiteBackendError, match=rf"exported by MindSpore {re.escape(exported)}, "
                                               r"but this mindspore_lite is 2\.9\.0.*--allow-version"):
        LiteBackend(manifest, 0, 0)
    assert not [c for c in fake_lite().CALLS if c[0] == "build"]
    backend = LiteBackend(manifest, 0, 0, allow_version_mismatch=True)
    assert "running anyway" in backend.version_warning
    monkeypatch.setenv("DSFLOW_ALLOW_LITE_VERSION_MISMATCH", "1")
    assert LiteBackend(manifest, 0, 0).version_warning
    monkeypatch.setenv("DSFLOW_ALLOW_LITE_VERSION_MISMATCH", "0")
    monkeypatch.setenv("DSFLOW_FAKE_LITE_VERSION", exported + "rc1")  # same release
    sys.modules.pop("mindspore_lite")
    assert LiteBackend(manifest, 0, 0).version_warning is None
    del manifest.data["mindspore_version"]
    with pytest.raises(LiteBackendError, match=r"\(not recorded\)"):
        LiteBackend(manifest, 0, 0)


def test_warm_up_runs_every_gear_of_both_graphs_once(tmp_path, fake_lite, monkeypatch):
    from dsflow.runtime.backends.lite import LiteBackend
    manifest, _ = artifacts(tmp_path, 1, batch_sizes=[1, 2])
    backend = LiteBackend(manifest, 0, 0)
    fake = fake_lite()
    use_token_sum_kernel(fake, monkeypatch, 1)
    mark = len(fake.CALLS)
    lines = []
    seconds = backend.warm_up(lines.append)
    assert seconds >= 0 and len(lines) == 6 and lines[-1].startswith("rank 0: warm-up 6/6")
    shapes = [c[2][0] for c in fake.CALLS[mark:] if c[0] == "predict"]
    want = []
    for batch in (1, 2):
        for n in BUCKETS:
            # prefill input_ids (chunk = the smallest bucket), then decode input_ids
            want += [[batch, BUCKETS[0]], [batch]]
    assert shapes == want
    windows = [c[2][1] for c in fake.CALLS[mark:] if c[0] == "predict"]
    assert [k[3] for k in windows] == [n for n in BUCKETS for _ in "pd"] * 2  # kv_len gears


# ---- the device-resident cache (graphs/signatures.py resident mode) -------------------
def test_ini_resident_cache_is_fixed_and_gears_are_the_batch_sizes():
    cfg = load_config(CONFIGS_DIR / "deepseek-coder-33b-instruct.config.json")
    buckets, batches = [512, 1024, 2048, 4096], [1, 2, 4, 8, 16]
    cache = "62,16,2,4096,128"  # [layers, slots, kv heads per rank, capacity, head dim]
    dec = graph_options(lb.lite_config(graph_signature("decode", cfg, 4, "float16", "resident"),
                                       buckets, batches))
    assert dec["ge.inputShape"] == (f"input_ids:-1;key_cache:{cache};positions:-1;"
                                    f"slot_ids:-1;value_cache:{cache}")
    assert dec["ge.dynamicDims"] == "1,1,1;2,2,2;4,4,4;8,8,8;16,16,16"
    pre = graph_options(lb.lite_config(graph_signature("prefill", cfg, 4, "float16",
                                                       "resident"), buckets, batches))
    assert pre["ge.inputShape"] == (f"input_ids:-1,512;key_cache:{cache};slot_ids:-1;"
                                    f"start:-1;valid_length:-1;value_cache:{cache}")
    assert pre["ge.dynamicDims"] == "1,1,1,1;2,2,2,2;4,4,4,4;8,8,8,8;16,16,16,16"
    one = graph_options(lb.lite_config(graph_signature("decode", CFG, 1, "float16",
                                                       "resident"), [16, 64]))
    assert one == {"ge.inputShape": "input_ids:1;key_cache:2,1,2,64,8;positions:1;"
                                    "slot_ids:1;value_cache:2,1,2,64,8"}  # one gear: static


def resident_backend(tmp_path, fake_lite, monkeypatch, tp: int):
    """Rank tp-1 of resident artifacts (batch gears 1 and 4: 4 slots of 64 positions) on
    card 5, with the token-sum kernel; returns (backend, fake)."""
    from dsflow.runtime.backends.lite import LiteBackend
    manifest, _ = artifacts(tmp_path, tp, cache_mode="resident", batch_sizes=[1, 4])
    assert manifest.resident_shape == (4, 64)
    devices = [4, 5][-tp:]
    if tp > 1:
        filled_table(manifest, devices)
    backend = LiteBackend(manifest, tp - 1, 5, turns=Turns(lambda *e: None))
    fake = fake_lite()
    use_token_sum_kernel(fake, monkeypatch, tp)
    return backend, fake


def rank_tokens(logits: np.ndarray, tp: int) -> list:
    """The token each row's one-hot names, if it falls in this (last) rank's slice."""
    width = 64 // tp
    return [int(np.argmax(r)) + (tp - 1) * width if r.any() else None for r in logits]


def expect(totals: list, tp: int) -> list:
    width = 64 // tp
    return [t % 50 + 5 if t % 50 + 5 >= (tp - 1) * width else None for t in totals]


@pytest.mark.parametrize("tp", [1, 2])
def test_resident_cache_stays_on_the_device_and_ping_pongs(tmp_path, zero_copy_lite,
                                                          monkeypatch, tp):
    from dsflow.runtime.backends.lite import LiteBackendError
    backend, fake = resident_backend(tmp_path, zero_copy_lite, monkeypatch, tp)
    with pytest.raises(LiteBackendError, match="built for|fixed at build"):
        backend.configure(slots=8, capacity=64)
    mark = len(fake.CALLS)
    kv_heads = 2 // tp
    one = CFG.num_layers * 4 * kv_heads * 64 * CFG.head_dim * 2  # fp16 bytes of one tensor
    assert backend.configure(slots=4, capacity=64) == {"cache_bytes": 4 * one,
                                                       "copy_slot": False}
    made = [c for c in fake.CALLS[mark:] if c[0] == "tensor"]
    cache_tags = {c[1] for c in made}
    assert len(made) == 4 and {c[4] for c in made} == {"ascend:5"}
    assert all(c[2] == [CFG.num_layers, 4, kv_heads, 64, CFG.head_dim] for c in made)
    uploads = [c for c in fake.CALLS[mark:] if c[0] == "upload"]
    assert sorted(c[1] for c in uploads) == sorted(cache_tags)  # zeroed once each
    mark = len(fake.CALLS)
    i32 = lambda *v: np.array(v, np.int32)  # noqa: E731
    # slot 3 first, alone; then slots 2, 0, 1 in one step: padded to the 4 gear with
    # the only spare slot, 3, which must come through unchanged
    backend.prefill(i32(3), np.array([[9, 9] + [0] * 14], np.int32), i32(0), i32(2), 0)
    chunk = np.zeros((3, 16), np.int32)
    chunk[0, :2], chunk[1, :5], chunk[2, :1] = [1, 2], [4, 5, 6, 7, 8], [3]
    backend.prefill(i32(2, 0, 1), chunk, i32(0, 0, 0), i32(2, 5, 1), 0)
    totals = {3: 18, 2: 3, 0: 30, 1: 3}
    for step in range(2):
        slots, toks = [3, 2, 0, 1], [10 + step, 20, 30, 40]
        pos = [2 + step, 2 + step, 5 + step, 1 + step]
        out = backend.decode(i32(*slots), i32(*toks), i32(*pos), 0)
        totals = {s: totals[s] + t for s, t in zip(slots, toks)}
        assert rank_tokens(out, tp) == expect([totals[s] for s in slots], tp)
    predicts = [c for c in fake.CALLS[mark:] if c[0] == "predict"]
    assert len(predicts) == 4
    pairs = []
    for c in predicts:
        names = backend.sigs["prefill" if len(c[3]) == 6 else "decode"].input_names()
        ins = dict(zip(names, zip(c[3], c[5])))
        key, value = ins["key_cache"], ins["value_cache"]
        assert key[1] == value[1] == "ascend:5"  # the cache inputs are device tensors
        assert all(dev is None for n, (_, dev) in ins.items() if n not in CACHE)
        assert c[6] == [None, "ascend:5", "ascend:5"]  # host logits, device pair
        pairs.append(((key[0], value[0]), tuple(c[4][1:])))
    # ping-pong: each step's output pair is the next step's input pair, two pairs in all
    assert all(out == nxt_in for (_, out), (nxt_in, _) in zip(pairs, pairs[1:]))
    assert pairs[0][0] == pairs[2][0] != pairs[1][0] == pairs[3][0]
    assert {t for p in pairs for t in p[0]} == cache_tags
    moved = [c for c in fake.CALLS[mark:] if c[0] in ("upload", "download")]
    assert not [c for c in moved if c[1] in cache_tags]  # no cache data crossed PCIe
    assert [c[0] for c in fake.CALLS[mark:] if c[0] == "resize"]  # shapes followed the gears
    with pytest.raises(LiteBackendError, match="no device-side copy"):
        backend.copy_slot(0, [1], 5)


def test_resident_warm_up_runs_each_batch_gear_and_writes_nothing(tmp_path, zero_copy_lite,
                                                                  monkeypatch):
    backend, fake = resident_backend(tmp_path, zero_copy_lite, monkeypatch, 1)
    lines = []
    mark = len(fake.CALLS)
    backend.warm_up(lines.append)
    assert lines[-1].startswith("rank 0: warm-up 2/2 (batch 4, cache 64)")
    shapes = [c[2][0] for c in fake.CALLS[mark:] if c[0] == "predict"]
    assert shapes == [[1, 16], [1], [4, 16], [4]]  # prefill chunk = the smallest bucket
    for pair in backend._device_pairs():
        assert all(not t._peek().any() for t in pair)  # padding rows wrote nothing


CACHE = ("key_cache", "value_cache")


def test_fake_enforces_preallocated_outputs_and_device_tensors(tmp_path, zero_copy_lite,
                                                               monkeypatch):
    fake = importlib.import_module("mindspore_lite")
    use_token_sum_kernel(fake, monkeypatch, 1)
    manifest, _ = artifacts(tmp_path / "strict", 1, cache_mode="resident")
    model = fake.Model()
    ctx = fake.Context()
    ctx.ascend.device_id = 1
    model.build_from_file(str(manifest.graph_path(0, "decode")), fake.ModelType.MINDIR, ctx)
    shape = [2, 1, 2, 64, 8]
    cache = [fake.Tensor(shape=shape, dtype=fake.DataType.FLOAT16, device="ascend:1")
             for _ in range(4)]
    model.resize(model.get_inputs(), [[1], shape, [1], [1], shape])
    ids = fake.Tensor(np.zeros(1, np.int32))
    inputs = [ids, cache[0], ids, ids, cache[1]]
    with pytest.raises(RuntimeError, match="Output data ptr is nullptr"):  # no host buffer
        model.predict(inputs, outputs=[fake.Tensor(shape=[1, 64], dtype=fake.DataType.FLOAT32),
                                       cache[2], cache[3]])
    logits = fake.Tensor(np.empty((1, 64), np.float32))
    with pytest.raises(RuntimeError, match="predict failed"):  # one output short
        model.predict(inputs, outputs=[logits, cache[2]])
    with pytest.raises(RuntimeError, match="does not match the graph's output"):
        model.predict(inputs, outputs=[fake.Tensor(np.empty((1, 32), np.float32)),
                                       cache[2], cache[3]])
    with pytest.raises(RuntimeError, match="both an input and an output"):
        model.predict(inputs, outputs=[logits, cache[0], cache[1]])
    other = fake.Tensor(shape=shape, dtype=fake.DataType.FLOAT16, device="ascend:0")
    with pytest.raises(RuntimeError, match="ascend:0 given to a model on ascend:1"):
        model.predict([ids, other, ids, ids, cache[1]], outputs=[logits, cache[2], cache[3]])
    mark = len(fake.CALLS)
    model.predict(inputs, outputs=[logits, cache[2], cache[3]])
    assert not [c for c in fake.CALLS[mark:] if c[0] in ("upload", "download")]
    cache[2].get_data_to_numpy()  # reading a device tensor on the host is a download
    assert fake.CALLS[-1] == ("download", cache[2].tag, cache[2].data_size)


# ---- issue 17: what a real card with Lite 2.5-2.7 would reject ------------------------
def test_old_lite_refuses_resident_artifacts_before_building(tmp_path, old_lite, monkeypatch):
    """Lite 2.3-2.7 cannot take device tensors: resident artifacts are refused in one
    line that says how to rebuild, before any build; the override lets a user who knows
    better through (and the old executor then refuses the device tensors itself)."""
    from dsflow.runtime.backends.lite import LiteBackend, LiteBackendError
    manifest, _ = artifacts(tmp_path, 1, cache_mode="resident", batch_sizes=[1, 4])
    with pytest.raises(LiteBackendError) as e:
        LiteBackend(manifest, 0, 0)
    message = str(e.value)
    assert "\n" not in message and "mindspore_lite 2.7.2" in message
    assert "--cache-mode window" in message and "resident" in message
    assert not [c for c in old_lite().CALLS if c[0] == "build"]
    monkeypatch.setenv("DSFLOW_LITE_DEVICE_TENSORS", "1")
    backend = LiteBackend(manifest, 0, 0)
    use_token_sum_kernel(old_lite(), monkeypatch, 1)
    backend.configure(slots=4, capacity=64)
    with pytest.raises(RuntimeError, match="device tensors need the zero-copy GE executor"):
        backend.decode(np.array([0], np.int32), np.array([1], np.int32),
                       np.array([0], np.int32), 0)


def test_old_fake_refuses_device_tensors_and_both_refuse_outputs_without_a_buffer(
        tmp_path, fake_lite, monkeypatch):
    fake = importlib.import_module("mindspore_lite")
    use_token_sum_kernel(fake, monkeypatch, 1)
    manifest, _ = artifacts(tmp_path / "strict", 1)
    model = fake.Model()
    model.build_from_file(str(manifest.graph_path(0, "decode")), fake.ModelType.MINDIR,
                          fake.Context())
    window = [2, 1, 2, 16, 8]
    model.resize(model.get_inputs(), [[1], window, [1], window])
    ids = fake.Tensor(np.zeros(1, np.int32))
    host = fake.Tensor(np.zeros(window, np.float16))
    with pytest.raises(RuntimeError, match="Output data ptr is nullptr"):
        model.predict([ids, host, ids, host],
                      outputs=[fake.Tensor(shape=[1, 64], dtype=fake.DataType.FLOAT32),
                               fake.Tensor(np.zeros([2, 1, 2, 1, 8], np.float16)),
                               fake.Tensor(np.zeros([2, 1, 2, 1, 8], np.float16))])
    on_card = fake.Tensor(np.zeros(window, np.float16), device="ascend:0")
    if fake.ZERO_COPY:
        model.predict([ids, on_card, ids, host])
    else:
        with pytest.raises(RuntimeError, match="Input data ptr is nullptr.*ascend:0"):
            model.predict([ids, on_card, ids, host])
    assert len(model.predict([ids, host, ids, host])) == 3  # host tensors: every release


def test_set_data_failures_name_the_tensor(fake_lite, monkeypatch):
    """set_data_from_numpy's False (the C++ binding's result) and tensor.py's own
    RuntimeError both become one error naming the tensor."""
    from dsflow.runtime.backends.lite import LiteBackendError, set_data
    fake = importlib.import_module("mindspore_lite")
    tensor = fake.Tensor(shape=[2, 3], dtype=fake.DataType.FLOAT16, device="ascend:0")
    assert tensor.set_data_from_numpy(np.zeros((2, 3), np.float32)) is False  # dtype
    assert tensor.set_data_from_numpy(np.zeros((2, 2), np.float16)) is False  # size
    with pytest.raises(LiteBackendError, match="rank 0 key_cache.*float32 \\[2, 3\\]"):
        set_data(tensor, np.zeros((2, 3), np.float32), "rank 0 key_cache")
    set_data(tensor, np.ones((2, 3), np.float16), "rank 0 key_cache")
    assert tensor._peek().sum() == 6

    def raising(array):  # tensor.py of 2025-07: raises itself, then drops the bool
        raise RuntimeError("data size not equal! Numpy size: 8, Tensor size: 12")
    monkeypatch.setattr(tensor, "set_data_from_numpy", raising)
    with pytest.raises(LiteBackendError, match="value_cache: set_data_from_numpy failed "
                                               "\\(data size not equal"):
        set_data(tensor, np.zeros((2, 2), np.float16), "value_cache")


def test_build_chooses_resident_only_where_lite_takes_device_tensors(tmp_path, monkeypatch):
    from dsflow.artifacts.lite import ascend_cache_mode, takes_device_tensors
    from dsflow.common.errors import ExportError
    from dsflow.export.pipeline import build as build_mod
    monkeypatch.delenv("DSFLOW_LITE_DEVICE_TENSORS", raising=False)
    for version, mode in (("2.5.0", "window"), ("2.6.0", "window"), ("2.7.2", "window"),
                          ("2.10.0", "resident"), (None, "window")):
        assert ascend_cache_mode(version) == mode, version
        monkeypatch.setattr(build_mod, "_mindspore_version", lambda v=version: v)
        opts = build_mod.BuildOptions(model_dir=tmp_path, out=tmp_path / "out",
                                      target="ascend")
        assert opts.resolved_cache_mode() == mode
        cpu = build_mod.BuildOptions(model_dir=tmp_path, out=tmp_path / "out", target="cpu")
        assert cpu.resolved_cache_mode() == "window"
    assert takes_device_tensors("2.7.2", {"DSFLOW_LITE_DEVICE_TENSORS": "1"})
    assert not takes_device_tensors("2.10.0", {"DSFLOW_LITE_DEVICE_TENSORS": "0"})
    monkeypatch.setattr(build_mod, "_mindspore_version", lambda: "2.7.2")
    with pytest.raises(ExportError, match="--cache-mode resident: .*2\\.7\\.2.*--cache-mode "
                                          "window"):
        build_mod.build(build_mod.BuildOptions(model_dir=tmp_path, out=tmp_path / "out",
                                               target="ascend", cache_mode="resident"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ExportError, match="--target cpu: MindSpore 2\\.7\\.2 .*2\\.10"):
        build_mod.build(build_mod.BuildOptions(model_dir=tmp_path, out=tmp_path / "out",
                                               target="cpu"))
    assert not (tmp_path / "out").exists()


def cwd_checking_converter(bin_dir: Path) -> Path:
    """A converter_lite that, like GE reading ge.exec.rankTableFile, opens the ini's
    rank_table_file from its own working directory, and fails if it is not there."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    conv = bin_dir / "converter_lite"
    conv.write_text(f"""#!/usr/bin/env bash
for a in "$@"; do case "$a" in --outputFile=*) out="${{a#--outputFile=}}";;
  --configFile=*) ini="${{a#--configFile=}}";; esac; done
table="$(sed -n 's/^rank_table_file=//p' "$ini")"
echo "cwd=$PWD table=$table" >> "{bin_dir}/calls.log"
[ -z "$table" ] || [ -f "$table" ] || {{ echo "rank table $table not found"; exit 4; }}
echo converted > "$out.mindir"
""")
    conv.chmod(0o755)
    return conv


def test_converter_runs_where_the_inis_rank_table_path_resolves(tmp_path, monkeypatch):
    """The ini names the rank table relatively; a build from another directory (and
    with a relative --out) must still convert: converter_lite runs in the artifacts."""
    conv = cwd_checking_converter(tmp_path / "bin")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    _, result = artifacts(Path("art"), 2, env=with_cann(tmp_path, {"PATH": str(conv.parent)}))
    assert {e["stage"] for e in result["graphs"].values()} == {"lite"}
    log = (conv.parent / "calls.log").read_text().splitlines()
    assert log == [f"cwd={(tmp_path / 'work' / 'art').resolve()} table=rank_table.json"] * 4


def test_cann_warnings_do_not_hide_a_real_conversion_error(tmp_path):
    """_check_ascend.py warns about ASCEND_OPP_PATH on hosts that have CANN: a failure
    printed after such warnings is the graph's, reported as an error, not the fallback."""
    says = ("WARNING: ASCEND_OPP_PATH is not set, custom ops may be missing; run "
            "<CANN>/set_env.sh\\nERROR: [ge] E10001: input shape of key_cache is invalid")
    conv = fake_converter(tmp_path / "bin", rc=1, says=says)
    with pytest.raises(lb.LiteBuildError, match="(?s)exit 1.*E10001") as e:
        artifacts(tmp_path / "art", 1, env=with_cann(tmp_path, {"PATH": str(conv.parent)}))
    assert not isinstance(e.value, lb.MissingCannError)
    assert not (tmp_path / "art" / lb.SCRIPT_NAME).exists()

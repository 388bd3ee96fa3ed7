"""The ONNX target (`dsexport build --target onnx`) and its ONNX Runtime backend.

Numerics against transformers on random weights of several shapes (GQA ratios 1, 2, 4;
head dims 64 and 128), including a prompt of 4,100 tokens where the linear rope
scaling shows; against the MindIR artifacts of the same weights; int8/int4 quality on
the shipped default model; the in-place slot cache's row moves; serving; bad input.
"""
from __future__ import annotations

import json
import shutil
import stat
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import hf_greedy, make_hf_checkpoint
from dsflow.common.errors import DsflowError
from dsflow.export.pipeline.build import BuildOptions, build
from dsflow.runtime.engine import Engine
from dsflow.runtime.sampling import SamplingParams

pytestmark = pytest.mark.timeout(600)

# name -> (checkpoint overrides): GQA ratio 1, 2 and 4; head dims 64, 64 and 128
SHAPES = {
    "gqa1-hd64": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=4,
                      intermediate_size=256, num_hidden_layers=1),
    "gqa2-hd64": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=256, num_hidden_layers=2,
                      max_position_embeddings=8192),
    "gqa4-hd128": dict(hidden_size=512, num_attention_heads=4, num_key_value_heads=1,
                       intermediate_size=256, num_hidden_layers=1),
}
PROMPTS = [[32013] + list(range(100, 131)), [32013] + list(range(5000, 5007)),
           [32013, 1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 9000, 10000]]
NEW = 16
ENGINE = dict(max_batch=4, prefill_chunk=256)

_MODELS: dict = {}
_ENGINES: dict = {}


@pytest.fixture(scope="module")
def shape_model(tmp_path_factory):
    """name -> (transformers model, its ONNX artifacts, checkpoint dir), built once."""
    def get(name: str):
        if name not in _MODELS:
            ckpt = tmp_path_factory.mktemp(f"onnx-{name}")
            model = make_hf_checkpoint(ckpt, seed=3, **SHAPES[name])
            art = build(BuildOptions(model_dir=ckpt, out=ckpt / "art", target="onnx"))
            _MODELS[name] = (model, art, ckpt)
        return _MODELS[name]
    return get


@pytest.fixture(scope="module")
def onnx_engine(shape_model):
    def get(name: str) -> Engine:
        if name not in _ENGINES:
            _ENGINES[name] = Engine(shape_model(name)[1], **ENGINE)
        return _ENGINES[name]
    yield get
    for engine in _ENGINES.values():
        engine.close()
    _ENGINES.clear()


def reference_logits(model, ids: list[int], forced: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids + forced])).logits[0, len(ids) - 1:].numpy()


# ---- pieces -----------------------------------------------------------------------------
@pytest.mark.parametrize("bits,block", [(4, 32), (8, 32), (4, 128), (8, 128)])
def test_quantised_layout_is_what_matmulnbits_computes(bits, block):
    """graphs/onnx_quant.py's blocks, run by ONNX Runtime's own kernel (accuracy level 0:
    fp32 activations), equal x @ dequantize(W).T; and the round trip error is bounded.
    K=80: a partial last block at 32, a single padded block at the default 128."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper
    from dsflow.graphs.onnx_quant import dequantize, quantize
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((96, 80)).astype(np.float32)  # K=80: a partial last block
    q = quantize(w, bits, block)
    node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft",
                            K=80, N=96, bits=bits, block_size=block, accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", 1, [None, 80])],
                              [helper.make_tensor_value_info("Y", 1, [None, 96])],
                              [numpy_helper.from_array(q.blocks, "B"),
                               numpy_helper.from_array(q.scales, "S")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((5, 80)).astype(np.float32)
    np.testing.assert_allclose(sess.run(None, {"A": x})[0], x @ dequantize(q).T, atol=1e-4)
    step = np.abs(w).max() / ((1 << (bits - 1)) - 1)
    assert np.abs(dequantize(q) - w).max() <= step / 2 + 1e-6


def test_rope_tables_are_transformers_scaled_ones():
    """cos/sin for GroupQueryAttention = transformers' with linear scaling 4 (the
    scaling onnxruntime-genai's builder drops), out to position 8191."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from dsflow.graphs.config import config_from_hf_dict
    raw = dict(architectures=["LlamaForCausalLM"], vocab_size=100, hidden_size=256,
               intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
               rope_theta=100000.0, rope_scaling={"type": "linear", "factor": 4.0},
               max_position_embeddings=8192)
    from dsflow.graphs.numerics import cos_sin_tables, inv_freq
    cos, sin = cos_sin_tables(config_from_hf_dict(raw), 8192)
    rope = LlamaRotaryEmbedding(LlamaConfig(**raw))
    pos = torch.arange(8192)[None]
    ref_cos, ref_sin = rope(torch.zeros(1, dtype=torch.float32), pos)
    # numpy's and torch's fp32 pow differ in the last bit of a few inverse frequencies;
    # at position 8191 one ulp of the angle (~2000 rad) is 1.2e-4 rad
    np.testing.assert_allclose(inv_freq(64, 100000.0, 4.0), rope.inv_freq.numpy(), rtol=2.4e-7)
    np.testing.assert_allclose(cos, ref_cos[0, :, :32].numpy(), atol=1e-4)
    np.testing.assert_allclose(sin, ref_sin[0, :, :32].numpy(), atol=1e-4)
    np.testing.assert_allclose(cos[:512], ref_cos[0, :512, :32].numpy(), atol=1e-5)
    unscaled = cos_sin_tables(config_from_hf_dict({**raw, "rope_scaling": None}), 8192)[0]
    assert np.abs(unscaled - cos).max() > 0.5  # the scaling is not a rounding matter


# ---- build ------------------------------------------------------------------------------
def test_build_writes_one_checked_model_listed_with_checksums(shape_model):
    import onnx
    _, art, _ = shape_model("gqa2-hd64")
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["target"] == "onnx" and manifest["kv_cache"]["cache_mode"] == "inplace"
    files = {g["kind"]: g["file"] for g in manifest["graphs"]}
    assert files == {"prefill": "rank0/model.onnx", "decode": "rank0/model.onnx"}
    for rel in ("rank0/model.onnx", "rank0/model.onnx.data"):
        assert len(manifest["files"][rel]["sha256"]) == 64
    onnx.checker.check_model(str(art / "rank0" / "model.onnx"), full_check=True)
    model = onnx.load(str(art / "rank0" / "model.onnx"), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization", "MatMul"} <= ops
    assert manifest["onnx"]["quantization"]["bits"] == 0


def test_inspect_shows_the_onnx_model(shape_model):
    from dsflow.export.cli.main import main as dsexport
    _, art, _ = shape_model("gqa2-hd64")
    result = CliRunner().invoke(dsexport, ["inspect", str(art), "--json"])
    assert result.exit_code == 0, result.output
    first = json.loads(result.output.splitlines()[0])
    assert first["target"] == "onnx" and first["ops"]["com.microsoft.GroupQueryAttention"] == 2
    assert first["parameters"]["external_files"] == ["model.onnx.data"]
    assert [t["name"] for t in first["inputs"]][:2] == ["input_ids", "past_key.0"]


# ---- numerics: transformers and MindIR ----------------------------------------------------
@pytest.mark.parametrize("name", list(SHAPES))
def test_greedy_tokens_and_logits_match_transformers(name, shape_model, onnx_engine):
    model = shape_model(name)[0]
    engine = onnx_engine(name)
    got = engine.generate(PROMPTS, SamplingParams(max_new_tokens=NEW, ignore_eos=True))
    ref = [hf_greedy(model, p, NEW) for p in PROMPTS]
    assert [r.token_ids for r in got] == ref
    ours = engine.forced_logits(PROMPTS, [r[:6] for r in ref])
    # chunks of 8: several rows continue after a past in one step
    chunked = engine.forced_logits(PROMPTS, [r[:6] for r in ref], prefill_chunk=8)
    for b, p in enumerate(PROMPTS):
        want = reference_logits(model, p, ref[b][:6])
        np.testing.assert_allclose(ours[b], want, atol=1e-4, rtol=0)
        np.testing.assert_allclose(chunked[b], want, atol=1e-4, rtol=0)


def test_long_prompt_where_rope_scaling_shows(shape_model, onnx_engine):
    """4,100 prompt tokens (17 chunks of 256, each after a past), then decode."""
    model = shape_model("gqa2-hd64")[0]
    engine = onnx_engine("gqa2-hd64")
    prompt = long_prompt()
    got = engine.generate([prompt], SamplingParams(max_new_tokens=8, ignore_eos=True))[0]
    ref = hf_greedy(model, prompt, 8)
    assert got.token_ids == ref
    ours = engine.forced_logits([prompt], [ref[:3]])[0]
    # 2e-4, not 1e-4: a few of numpy's fp32 inverse frequencies are one ulp from torch's,
    # and past position 4000 one ulp of the angle is 2.4e-4 rad (the MindIR graphs share
    # numpy's: test_logits_match_the_mindir_artifacts holds them to 1e-4 here)
    np.testing.assert_allclose(ours, reference_logits(model, prompt, ref[:3]), atol=2e-4,
                               rtol=0)


def long_prompt() -> list[int]:
    return [32013] + np.random.default_rng(7).integers(100, 32000, 4099).tolist()


def test_logits_match_the_mindir_artifacts(shape_model, onnx_engine):
    model, _, ckpt = shape_model("gqa2-hd64")
    """Same weights, both targets, the short prompts and the 4,100-token one."""
    mindir = build(BuildOptions(model_dir=ckpt, out=ckpt / "mindir", max_seq_len=4608))
    forced = [[7, 8, 9, 10]] * len(PROMPTS)
    with Engine(mindir, **ENGINE) as ms_engine:
        ref = ms_engine.forced_logits(PROMPTS, forced)
        ref_long = ms_engine.forced_logits([long_prompt()], [[7, 8]])
    ours = onnx_engine("gqa2-hd64").forced_logits(PROMPTS, forced)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    ours_long = onnx_engine("gqa2-hd64").forced_logits([long_prompt()], [[7, 8]])
    np.testing.assert_allclose(ours_long, ref_long, atol=1e-4, rtol=0)


# ---- the in-place slot cache ----------------------------------------------------------------
def test_rows_are_moved_only_when_a_step_needs_them_consecutive(shape_model):
    """Slots 0..3 prefilled alone; a decode of slots [3, 1] (rows not consecutive) moves
    rows and must give what each slot gives decoded alone; copy_slot clones a row."""
    from dsflow.artifacts.manifest import read_manifest
    from dsflow.runtime.backends.onnxrt import OnnxRuntimeBackend
    manifest = read_manifest(shape_model("gqa2-hd64")[1])
    a, b = OnnxRuntimeBackend(manifest, threads=1), OnnxRuntimeBackend(manifest, threads=1)
    for backend in (a, b):
        backend.configure(4, 64)
        for slot, p in enumerate(PROMPTS + [PROMPTS[0][:5]]):
            backend.prefill(np.array([slot], np.int32), np.array([p], np.int32),
                            np.array([0], np.int32), np.array([len(p)], np.int32), 0)
    lengths = [len(p) for p in PROMPTS + [PROMPTS[0][:5]]]
    both = a.decode(np.array([3, 1], np.int32), np.array([11, 12]),
                    np.array([lengths[3], lengths[1]], np.int32), 0)
    assert a.swaps > 0
    alone = [b.decode(np.array([s], np.int32), np.array([t]), np.array([lengths[s]], np.int32),
                      0)[0] for s, t in ((3, 11), (1, 12))]
    np.testing.assert_allclose(both, np.stack(alone), atol=1e-5)
    swaps = a.swaps
    # a chunk after a past for two rows at once (run row by row: GQA's CPU limit)
    chunk = np.array([[21, 22, 23], [24, 25, 0]], np.int32)
    at = np.array([lengths[3] + 1, lengths[1] + 1], np.int32)
    got = a.prefill(np.array([3, 1], np.int32), chunk, at, np.array([3, 2], np.int32), 0)
    want = [b.prefill(np.array([s], np.int32), chunk[i:i + 1, :n], at[i:i + 1],
                      np.array([n], np.int32), 0)[0]
            for i, (s, n) in enumerate(((3, 3), (1, 2)))]
    np.testing.assert_allclose(got, np.stack(want), atol=1e-5)
    a.decode(np.array([3, 1], np.int32), np.array([13, 14]),
             np.array([lengths[3] + 4, lengths[1] + 3], np.int32), 0)
    assert a.swaps == swaps  # the same set again: nothing moves
    a.copy_slot(3, [0], lengths[3] + 5)
    np.testing.assert_allclose(
        a.decode(np.array([0], np.int32), np.array([15]), np.array([lengths[3] + 5], np.int32), 0),
        a.decode(np.array([3], np.int32), np.array([15]), np.array([lengths[3] + 5], np.int32), 0),
        atol=1e-6)


def test_a_mixed_prefill_takes_as_few_graph_calls_as_gqa_allows(shape_model):
    """First chunks of two slots, one-token chunks after a past (a reused prefix) of two
    more, and a longer chunk after a past: 3 graph calls, not 5, and each row's logits
    what it gives prefilled alone (padding of the shorter first chunk included)."""
    from dsflow.artifacts.manifest import read_manifest
    from dsflow.runtime.backends.onnxrt import OnnxRuntimeBackend
    manifest = read_manifest(shape_model("gqa2-hd64")[1])
    a, b = OnnxRuntimeBackend(manifest, threads=1), OnnxRuntimeBackend(manifest, threads=1)
    past = {2: PROMPTS[0][:9], 3: PROMPTS[1], 4: PROMPTS[2]}
    for backend in (a, b):
        backend.configure(5, 64)
        for slot, p in past.items():
            backend.prefill(np.array([slot], np.int32), np.array([p], np.int32),
                            np.array([0], np.int32), np.array([len(p)], np.int32), 0)
    rows = [(0, PROMPTS[0][:6], 0), (1, PROMPTS[2][:3], 0), (2, [77], 9),
            (3, [78], len(PROMPTS[1])), (4, [79, 80, 81, 82], len(PROMPTS[2]))]
    ids = np.zeros((len(rows), 6), np.int32)
    for i, (_, t, _) in enumerate(rows):
        ids[i, :len(t)] = t
    class Counting:  # the session's methods are read-only: wrap it
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def run_with_iobinding(self, binding):
            self.calls += 1
            return self.inner.run_with_iobinding(binding)
    a.session = counting = Counting(a.session)
    got = a.prefill(np.array([r[0] for r in rows], np.int32), ids,
                    np.array([r[2] for r in rows], np.int32),
                    np.array([len(r[1]) for r in rows], np.int32), 0)
    assert counting.calls == 3
    want = [b.prefill(np.array([slot], np.int32), np.array([t], np.int32),
                      np.array([at], np.int32), np.array([len(t)], np.int32), 0)[0]
            for slot, t, at in rows]
    np.testing.assert_allclose(got, np.stack(want), atol=1e-5)


def test_n_samples_on_the_onnx_backend(shape_model, onnx_engine):
    """copy_slot through the engine: n greedy samples are identical to one."""
    model = shape_model("gqa1-hd64")[0]
    engine = onnx_engine("gqa1-hd64")
    got = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=8, n=3, ignore_eos=True))
    assert [r.token_ids for r in got] == [hf_greedy(model, PROMPTS[0], 8)] * 3


# ---- quantised quality on the shipped default model ------------------------------------------
HELDOUT_BYTES = 4000


@pytest.fixture(scope="module")
def heldout_code() -> str:
    from dsflow.export.pipeline.default_model import DEFAULT_MODEL_DIR
    record = json.loads((DEFAULT_MODEL_DIR / "training.json").read_text())
    root = Path(sysconfig.get_paths()["stdlib"])
    text = "".join((root / r).read_text(encoding="utf-8") for r in record["heldout_files"]
                   if (root / r).is_file())
    if len(text) < HELDOUT_BYTES:
        pytest.fail(f"held-out files of {DEFAULT_MODEL_DIR} not found under {root}")
    return text[:text.index("\n", HELDOUT_BYTES) + 1]


def test_int8_and_int4_quality_on_held_out_code(tmp_path, heldout_code):
    from dsflow.export.pipeline.default_model import default_model_dir
    from dsflow.runtime.scoring import score_text
    bpb = {}
    for quant in ("none", "int8", "int4"):
        art = build(BuildOptions(model_dir=default_model_dir(), out=tmp_path / quant,
                                 target="onnx", quant=quant, max_seq_len=512))
        with Engine(art) as engine:
            bpb[quant] = score_text(engine, heldout_code).bits_per_byte
    sizes = {q: (tmp_path / q / "rank0" / "model.onnx.data").stat().st_size for q in bpb}
    assert bpb["int8"] <= 1.01 * bpb["none"], bpb
    assert bpb["int4"] <= 1.05 * bpb["none"], bpb
    assert sizes["int4"] < sizes["int8"] < sizes["none"]


# ---- serving --------------------------------------------------------------------------------
def test_dsserve_on_the_onnx_backend(shape_model, onnx_engine):
    from test_server_http import serving
    engine = onnx_engine("gqa1-hd64")
    expected = engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=6,
                                                            ignore_eos=True))[0].text
    with serving(engine) as served:
        client = served.client()
        r = client.completions.create(model=engine.model_name, prompt=PROMPTS[1],
                                      max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=engine.model_name, prompt=PROMPTS[1], max_tokens=6, temperature=0,
            stream=True, extra_body={"ignore_eos": True}))
    assert r.choices[0].text == expected == streamed


# ---- bad input ----------------------------------------------------------------------------
def _dsexport(*args):
    from dsflow.export.cli.main import main as dsexport
    return CliRunner().invoke(dsexport, list(map(str, args)))


def test_quant_with_a_mindir_target_is_a_usage_error(tmp_path):
    result = _dsexport("build", "-q", "--target", "cpu", "--quant", "int8", "--out",
                       tmp_path / "a")
    assert result.exit_code == 2 and "--quant" in result.output and "--target onnx" in result.output
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("args, needle", [
    (["--dtype", "bf16"], "--dtype bfloat16"), (["--cache-mode", "window"], "--cache-mode"),
    (["--quant", "int4", "--quant-block-size", "24"], "--quant-block-size 24")])
def test_options_the_onnx_target_cannot_honour(tmp_path, args, needle):
    result = _dsexport("build", "-q", "--target", "onnx", *args, "--out", tmp_path / "a")
    assert result.exit_code == 2 and needle in result.output, result.output
    assert not (tmp_path / "a").exists()


def test_onnx_with_tp_2_is_refused_pointing_to_mindir(tmp_path):
    result = _dsexport("build", "-q", "--target", "onnx", "--tp", "2", "--out", tmp_path / "a")
    assert result.exit_code == 2 and "MindIR" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_head_dim_gqa_cannot_run_is_refused(tmp_path):
    ckpt = tmp_path / "ck"
    make_hf_checkpoint(ckpt, hidden_size=64, num_hidden_layers=1)  # head_dim 8
    result = _dsexport("build", "-q", "--target", "onnx", "--model", ckpt, "--out", tmp_path / "a")
    assert result.exit_code == 1 and "head_dim 8" in result.output
    assert not (tmp_path / "a").exists()


def _writable_copy(art: Path, dst: Path) -> Path:
    shutil.copytree(art, dst)
    for p in dst.rglob("*"):
        p.chmod(p.stat().st_mode | stat.S_IWUSR)
    return dst


def test_damaged_model_is_named_and_verify_catches_a_changed_one(shape_model, tmp_path):
    from dsflow.runtime.cli import main as dsrun
    art = _writable_copy(shape_model("gqa1-hd64")[1], tmp_path / "art")
    data = art / "rank0" / "model.onnx.data"
    with open(data, "r+b") as f:  # same size, other bytes
        f.seek(1000)
        f.write(b"\x7f" * 16)
    result = CliRunner().invoke(dsrun, ["--artifacts", str(art), "--verify", "--prompt", "x"])
    assert result.exit_code == 1 and "model.onnx.data" in result.output
    assert "sha256" in result.output
    model = art / "rank0" / "model.onnx"
    model.write_bytes(model.read_bytes()[:200])
    result = CliRunner().invoke(dsrun, ["--artifacts", str(art), "--prompt", "x",
                                        "--max-new-tokens", "2"])
    assert result.exit_code == 1 and str(model) in result.output


def test_missing_or_old_onnxruntime_says_what_to_install(monkeypatch):
    from dsflow.runtime.backends import onnxrt
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(DsflowError, match="pip install 'onnxruntime"):
        onnxrt.import_onnxruntime()
    old = type(sys)("onnxruntime")
    old.__version__ = "1.16.3"
    monkeypatch.setitem(sys.modules, "onnxruntime", old)
    with pytest.raises(DsflowError, match="1.16.3 is too old.*pip install"):
        onnxrt.import_onnxruntime()


def test_thread_spinning_settings():
    from dsflow.runtime.backends.onnxrt import spin_entries
    allow = "session.intra_op.allow_spinning"
    assert spin_entries("off", (1, 32)) == {allow: "0"}
    assert spin_entries("on", (1, 32)) == {allow: "1"}
    assert spin_entries("200", (1, 32)) == {allow: "1",
                                            "session.intra_op.spin_duration_us": "200"}
    # before 1.26 the bound is not read: ORT would spin unbounded, so it is off
    assert spin_entries("200", (1, 25)) == {allow: "0"}
    with pytest.raises(DsflowError, match="DSFLOW_ORT_SPIN='fast'.*off, on"):
        spin_entries("fast", (1, 32))

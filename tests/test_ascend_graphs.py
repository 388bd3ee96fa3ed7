"""Ascend graphs vs portable graphs, checked by reading the exported MindIR.

The Ascend graphs cannot run here (no CPU kernels for the fused operators), so this
checks what can be checked on CPU: both targets export end to end from the one model
definition; the Ascend graphs hold the fused operators with the intended arguments and
no decomposed attention; the CPU graphs hold no Ascend-only operator; both have the
same signatures and parameters; tp > 1 graphs all-reduce over hccl_world_group. Also
the inspector itself: artifacts + manifest, `dsexport inspect`, split (>1 GB) exports.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import TINY
from dsflow.export.cli.inspect import inspect as inspect_cmd
from dsflow.export.pipeline.inspect_mindir import inspect_artifacts, inspect_graph, op_arguments
from dsflow.artifacts.manifest import write_manifest
from dsflow.graphs.config import config_from_hf_dict
from dsflow.graphs.kernels import TARGET_DTYPES, TargetError, cache_dtype
from dsflow.graphs.layers import WORLD_GROUP
from dsflow.graphs.signatures import GRAPH_KINDS, graph_signature
from dsflow.graphs.tp_plan import weight_specs

# DeepSeek-Coder's shape at toy size (conftest.TINY: GQA, rope theta/scaling), with
# head_dim 16 (the fused attention ops need bf16 head_dim aligned to 16), an odd
# vocabulary (exercises lm_head padding at tp=2) and a small one (fast exports).
CFG = config_from_hf_dict({**TINY, "architectures": ["LlamaForCausalLM"], "hidden_size": 128,
                           "intermediate_size": 256, "vocab_size": 1001})
TPS = (1, 2)

FUSED_PREFILL = {"PromptFlashAttention": CFG.num_layers,
                 "RmsNorm": 2 * CFG.num_layers + 1,
                 "RotaryPositionEmbedding": 2 * CFG.num_layers}
FUSED_DECODE = {"IncreFlashAttention": CFG.num_layers,
                "RmsNorm": 2 * CFG.num_layers + 1,
                "RotaryPositionEmbedding": 2 * CFG.num_layers}
# Decode writes the new K and V of each layer with one Select each (graphs/kernels/
# ascend.py write_token): KVCacheScatterUpdate has no GE adapter (docs/ASCEND.md §8).
DECODE_WRITES = {"Select": 2 * CFG.num_layers}
# Operators with no GE operator adapter, which Lite's GE path cannot convert.
NO_GE_ADAPTER = {"KVCacheScatterUpdate"}
# The portable chains the fused ops replace: none may remain in an Ascend graph
# (decode's Selects are its K/V writes, counted exactly by DECODE_WRITES).
DECOMPOSED = {"Softmax", "BatchMatMul", "ReduceMax", "Exp", "Select", "Rsqrt", "Square",
              "ReduceMean", "Neg", "TensorScatterUpdate", "Unstack"}
ASCEND_ONLY = {"PromptFlashAttention", "IncreFlashAttention", "FlashAttentionScore",
               "FusedInferAttentionScore", "PagedAttention", "ReshapeAndCache",
               "KVCacheScatterUpdate", "RmsNorm", "RotaryPositionEmbedding",
               "ApplyRotaryPosEmb", "Swiglu"}
INPUT_LAYOUT_BNSD = 1  # MindIR stores input_layout as an enum int (BSH 0, BNSD 1, ...)
HIGH_PRECISION = 0  # PFA/IFA inner_precise: 0 = high precision for fp16, 1 = performance


def export_rank(root: Path, target: str, tp: int, rank: int,
                cache_mode: str = "window") -> dict[str, Path]:
    """What export/pipeline/build.py does per rank, with seeded random weights instead of a
    checkpoint: RankModel(cfg, tp, dtype, target) + export_graph per graph kind."""
    from dsflow.export.pipeline.mindir import export_graph
    from dsflow.graphs.model import RankModel
    dtype = TARGET_DTYPES[target]
    net = RankModel(CFG, tp, dtype, target=target)
    rng = np.random.default_rng(rank)
    net.load((s.name, rng.standard_normal(s.rank_shape(tp), dtype=np.float32) * 0.02)
             for s in weight_specs(CFG))
    out = root / f"rank{rank}"
    out.mkdir(parents=True)
    return {kind: export_graph(net, graph_signature(kind, CFG, tp, cache_dtype(target, dtype),
                                                    cache_mode), out / kind)
            for kind in GRAPH_KINDS}


def write_artifacts(root: Path, target: str, tp: int, files: dict[int, dict]) -> Path:
    """A minimal manifest over already exported graphs (what build.py writes last)."""
    dtype = TARGET_DTYPES[target]
    graphs = [{"rank": rank, "kind": kind, "file": path.relative_to(root).as_posix(),
               **graph_signature(kind, CFG, tp, cache_dtype(target, dtype)).to_dict()}
              for rank, by_kind in files.items() for kind, path in by_kind.items()]
    write_manifest(root, {"target": target, "dtype": dtype, "tp": tp,
                          "model": CFG.to_dict(), "graphs": graphs,
                          "kv_cache": {"dtype": cache_dtype(target, dtype), "max_seq_len": 64}})
    return root


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(target, tp) -> artifacts dir: every rank of tp 1 and 2, both targets."""
    import mindspore as ms
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    arts = {}
    for target in TARGET_DTYPES:
        for tp in TPS:
            root = tmp_path_factory.mktemp(f"{target}-tp{tp}")
            ranks = range(tp) if target == "ascend" else range(1)
            arts[target, tp] = write_artifacts(
                root, target, tp, {r: export_rank(root, target, tp, r) for r in ranks})
    return arts


@pytest.fixture(scope="module")
def graphs(exported):
    """(target, tp, kind) -> inspect dict of rank 0, with the parameter list."""
    out = {}
    for (target, tp), root in exported.items():
        for g in inspect_artifacts(root, rank=0, tensors=True):
            out[target, tp, g["graph"]] = g
    return out


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("kind", GRAPH_KINDS)
def test_ascend_graphs_hold_the_fused_ops_and_no_decomposed_attention(graphs, tp, kind):
    ops = graphs["ascend", tp, kind]["ops"]
    expected = FUSED_PREFILL if kind == "prefill" else {**FUSED_DECODE, **DECODE_WRITES}
    assert {op: ops.get(op, 0) for op in expected} == expected
    left = (DECOMPOSED - set(expected)) & set(ops)
    assert not left, f"decomposed ops left: {left}"


@pytest.mark.parametrize("tp", TPS)
def test_fused_op_arguments(exported, tp):
    """Heads per rank, 1/sqrt(head_dim), BNSD, GQA, no band (the mask covers window and
    chunk), write axis, rope mode."""
    heads, kv_heads = CFG.num_heads // tp, CFG.num_kv_heads // tp
    scale = pytest.approx(1 / math.sqrt(CFG.head_dim))
    rank0 = exported["ascend", tp] / "rank0"
    # PromptFlashAttention: num_heads, scale, pre_tokens, next_tokens, layout, kv heads,
    # sparse_mode, inner_precise (the last 8 constant inputs, constructor order)
    for args in op_arguments(rank0 / "prefill.mindir", "PromptFlashAttention"):
        assert args[-8:] == [heads, scale, 2**31 - 1, 2**31 - 1, INPUT_LAYOUT_BNSD, kv_heads,
                             0, HIGH_PRECISION]
    # IncreFlashAttention: num_heads, layout, scale, kv heads, block_size, inner_precise
    for args in op_arguments(rank0 / "decode.mindir", "IncreFlashAttention"):
        assert args[-6:] == [heads, INPUT_LAYOUT_BNSD, scale, kv_heads, 0, HIGH_PRECISION]
    for kind in GRAPH_KINDS:
        assert {tuple(a) for a in op_arguments(rank0 / f"{kind}.mindir",
                                               "RotaryPositionEmbedding")} == {(0,)}


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("kind", GRAPH_KINDS)
def test_cpu_graphs_hold_no_ascend_only_op(graphs, tp, kind):
    assert not ASCEND_ONLY & set(graphs["cpu", tp, kind]["ops"])


def _as_dtype(tensors: list[dict], dtype: str) -> list[dict]:
    """The tensors with every model-dtype (float32) entry relabelled as `dtype`; logits
    are float32 on every target."""
    return [{**t, "dtype": dtype if t["dtype"] == "float32" and t["name"] != "logits"
             else t["dtype"]} for t in tensors]


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("kind", GRAPH_KINDS)
def test_both_targets_have_the_same_signature_and_parameters(graphs, tp, kind):
    """Identical names and shapes; the only dtype differences are the weights (cpu
    float32, ascend bfloat16) and the KV caches (ascend float16, which Lite can
    allocate; graphs/kernels/__init__.py). Logits stay float32."""
    cpu, asc = graphs["cpu", tp, kind], graphs["ascend", tp, kind]
    for target, g in (("cpu", cpu), ("ascend", asc)):
        sig = graph_signature(kind, CFG, tp, cache_dtype(target, TARGET_DTYPES[target])).to_dict()
        for side in ("inputs", "outputs"):
            assert g[side] == [{"name": t["name"], "dtype": t["dtype"],
                                "shape": [d if isinstance(d, int) else -1 for d in t["shape"]]}
                               for t in sig[side]]
    assert asc["outputs"][0]["dtype"] == "float32"
    for side in ("inputs", "outputs"):
        assert _as_dtype(cpu[side], "float16") == asc[side]
    expect = {s.name: list(s.rank_shape(tp)) for s in weight_specs(CFG)}
    expect["lm_head.weight"][0] = math.ceil(CFG.vocab_size / tp)
    for g in (cpu, asc):
        assert {t["name"]: t["shape"] for t in g["parameters"]["tensors"]} == expect
    assert _as_dtype(cpu["parameters"]["tensors"], "bfloat16") == asc["parameters"]["tensors"]
    assert asc["parameters"]["bytes"] * 2 == cpu["parameters"]["bytes"]


@pytest.mark.parametrize("target", list(TARGET_DTYPES))
@pytest.mark.parametrize("kind", GRAPH_KINDS)
def test_allreduce_over_the_world_group_only_at_tp2(graphs, target, kind):
    two, one = graphs[target, 2, kind], graphs[target, 1, kind]
    assert two["ops"]["AllReduce"] == 2 * CFG.num_layers  # after o_proj and down_proj
    assert two["comm_groups"] == [WORLD_GROUP] == ["hccl_world_group"]
    assert "AllReduce" not in one["ops"] and one["comm_groups"] == []


def test_ascend_target_refuses_fp32_and_unknown_targets():
    from dsflow.graphs.model import RankModel
    with pytest.raises(TargetError, match="bfloat16 or float16"):
        RankModel(CFG, 1, "float32", target="ascend")
    with pytest.raises(TargetError, match="unknown"):
        RankModel(CFG, 1, "float32", target="gpu")


def test_inspect_artifacts_reads_the_manifest(exported):
    graphs = inspect_artifacts(exported["ascend", 2])
    assert [(g["rank"], g["graph"], g["target"]) for g in graphs] == [
        (0, "prefill", "ascend"), (0, "decode", "ascend"),
        (1, "prefill", "ascend"), (1, "decode", "ascend")]
    assert [t["name"] for t in graphs[1]["outputs"]] == ["logits", "key", "value"]
    assert "tensors" not in graphs[0]["parameters"]
    assert [g["rank"] for g in inspect_artifacts(exported["ascend", 2], rank=1)] == [1, 1]


def test_dsexport_inspect_json_lines_and_table(exported):
    art = exported["ascend", 2]
    result = CliRunner().invoke(inspect_cmd, [str(art), "--json", "--rank", "1"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert [(g["rank"], g["graph"]) for g in lines] == [(1, "prefill"), (1, "decode")]
    assert set(lines[0]) >= {"rank", "graph", "target", "inputs", "outputs", "ops",
                             "parameters", "comm_groups"}
    assert set(lines[0]["parameters"]) >= {"count", "bytes"}
    table = CliRunner().invoke(inspect_cmd, [str(art)]).output
    assert "rank 1 decode (ascend)" in table and "IncreFlashAttention 2" in table
    assert "key_window     float16   [2, ?, 2, ?, 16]" in table


@pytest.mark.parametrize("args, message", [
    (["{missing}"], "no such artifacts directory"),
    (["{art}", "--rank", "5"], "no graphs for rank 5"),
])
def test_dsexport_inspect_errors_are_one_line(exported, tmp_path, args, message):
    fill = {"missing": tmp_path / "nope", "art": exported["cpu", 1]}
    result = CliRunner().invoke(inspect_cmd, [a.format(**fill) for a in args])
    assert result.exit_code == 1
    assert result.output.startswith("dsexport: error: ") and message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_inspect_a_file_that_is_not_mindir(tmp_path):
    from dsflow.export.pipeline.inspect_mindir import InspectError
    bad = tmp_path / "decode.mindir"
    bad.write_bytes(b"\xff\xfe not protobuf \x00\x01")
    with pytest.raises(InspectError, match="not a MindIR file"):
        inspect_graph(bad)


def test_split_export_is_inspected_from_its_variables(exported, tmp_path, monkeypatch):
    """Over 1 GB MindSpore writes <stem>_graph.mindir + <stem>_variables/data_0; the
    threshold (serialization.TOTAL_SAVE, in KiB) is lowered to force that format."""
    from mindspore.train import serialization
    if not hasattr(serialization, "TOTAL_SAVE"):
        pytest.skip("this MindSpore has no TOTAL_SAVE threshold to lower")
    monkeypatch.setattr(serialization, "TOTAL_SAVE", 1)
    split = export_rank(tmp_path, "cpu", 1, 0)["decode"]
    assert split.name == "decode_graph.mindir"
    whole = inspect_graph(exported["cpu", 1] / "rank0" / "decode.mindir", tensors=True)
    parts = inspect_graph(split, tensors=True)
    assert parts["parameters"]["external_files"] == ["decode_variables/data_0"]
    data = split.parent / "decode_variables" / "data_0"
    assert parts["parameters"]["bytes"] == whole["parameters"]["bytes"] <= data.stat().st_size
    for key in ("inputs", "outputs", "ops"):
        assert parts[key] == whole[key]
    assert parts["parameters"]["tensors"] == whole["parameters"]["tensors"]


def test_bf16_weights_arrive_as_bit_patterns_and_load_exactly():
    """export/weights/split.py delivers bf16 as uint16 bit patterns (numpy has no bf16)."""
    import mindspore as ms
    from dsflow.common.dtypes import bf16_to_f32, f32_to_bf16
    from dsflow.graphs.model import to_tensor
    bits = f32_to_bf16(np.array([1.0, -0.5, 3.14159, 1e-3], np.float32))
    t = to_tensor(bits, ms.bfloat16)
    assert t.dtype == ms.bfloat16
    np.testing.assert_array_equal(t.asnumpy().astype(np.float32), bf16_to_f32(bits))


# ---- resident-cache graphs (the Ascend default; graphs/signatures.py) ------------------
# Per graph and cache: the old values under the write indices (GatherNd), new or old
# per entry (Select), the write (TensorScatterUpdate).
RESIDENT_PLUMBING = {"TensorScatterUpdate": 2, "GatherNd": 2, "Select": 2}


@pytest.fixture(scope="module")
def resident_graphs(tmp_path_factory):
    """(target, tp, kind) -> inspect dict of rank 0's resident-mode graph."""
    import mindspore as ms
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    out = {}
    for target, tp in (("ascend", 1), ("ascend", 2), ("cpu", 1)):
        root = tmp_path_factory.mktemp(f"resident-{target}-tp{tp}")
        for kind, path in export_rank(root, target, tp, 0, "resident").items():
            out[target, tp, kind] = inspect_graph(path)
    return out


@pytest.mark.parametrize("target, tp", [("ascend", 1), ("ascend", 2), ("cpu", 1)])
@pytest.mark.parametrize("kind", GRAPH_KINDS)
def test_resident_graphs_export_with_the_resident_signature(resident_graphs, target, tp, kind):
    """Ascend graphs: the same fused operators as the window graphs, plus the cache
    plumbing shared with the portable set (plain Gather / GatherNd / TensorScatterUpdate,
    graphs/model.py SlotWriter) and nothing else of the decomposed attention. Inputs
    and outputs are the resident signature: the whole cache in and out."""
    g = resident_graphs[target, tp, kind]
    sig = graph_signature(kind, CFG, tp, cache_dtype(target, TARGET_DTYPES[target]),
                          "resident").to_dict()
    def shapes(tensors):  # the MindIR names outputs output0.. (the manifest names them)
        return [(t["dtype"], [d if isinstance(d, int) else -1 for d in t["shape"]])
                for t in tensors]
    assert [t["name"] for t in g["inputs"]] == [t["name"] for t in sig["inputs"]]
    assert shapes(g["inputs"]) == shapes(sig["inputs"])
    assert shapes(g["outputs"]) == shapes(sig["outputs"])
    assert shapes(g["outputs"])[1:] == [shapes(sig["inputs"])[1]] * 2  # the whole cache
    ops = g["ops"]
    writes = {"TensorScatterUpdate": 2, "GatherNd": 2}  # the portable attention selects too
    assert {op: ops.get(op, 0) for op in writes} == writes
    assert ops.get("Gather", 0) >= 2  # the slots' rows (and the embedding / last tokens)
    if target == "ascend":
        expected = FUSED_PREFILL if kind == "prefill" else FUSED_DECODE
        assert {op: ops.get(op, 0) for op in expected} == expected
        writes = {} if kind == "prefill" else DECODE_WRITES
        plumbing = {op: n + writes.get(op, 0) for op, n in RESIDENT_PLUMBING.items()}
        assert {op: ops.get(op, 0) for op in plumbing} == plumbing
        left = (DECOMPOSED - set(RESIDENT_PLUMBING)) & set(ops)
        assert not left, f"decomposed ops left: {left}"
    else:
        assert not ASCEND_ONLY & set(ops)


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("kind", GRAPH_KINDS)
def test_no_ascend_graph_holds_an_op_without_a_ge_adapter(graphs, resident_graphs, tp, kind):
    """Both cache modes (window: `--cache-mode window`, the default on Lite 2.5-2.7;
    resident: the default where Lite takes device tensors), read from the exported
    MindIR: no KVCacheScatterUpdate (no GE adapter), and the fused attention kept."""
    fused = "PromptFlashAttention" if kind == "prefill" else "IncreFlashAttention"
    for mode, g in (("window", graphs["ascend", tp, kind]),
                    ("resident", resident_graphs["ascend", tp, kind])):
        ops = g["ops"]
        assert not NO_GE_ADAPTER & set(ops), (mode, NO_GE_ADAPTER & set(ops))
        assert ops.get(fused, 0) == CFG.num_layers, (mode, ops)


# ---- another MindSpore release (the Ascend path supports 2.5, 2.6, 2.7 and 2.10) ------
OTHER_RELEASE_PYTHON = Path(__file__).resolve().parents[2] / "venv-ms27" / "bin" / "python"


@pytest.mark.timeout(900)
def test_ascend_graphs_export_under_mindspore_27():
    """tools/verify_ascend_export.py under MindSpore 2.7 (a venv beside the checkout,
    $DSFLOW_OTHER_MS_PYTHON or ../venv-ms27; docs/ASCEND.md section 8 says how to make
    it): every Ascend graph exports, without KVCacheScatterUpdate, with the fused
    attention in high-precision mode and GQA heads."""
    import os
    import subprocess
    python = Path(os.environ.get("DSFLOW_OTHER_MS_PYTHON") or OTHER_RELEASE_PYTHON)
    if not python.is_file():
        pytest.skip(f"{python} not found: no venv with another MindSpore release here "
                    "(docs/ASCEND.md section 8 shows how to make one)")
    tool = Path(__file__).resolve().parents[1] / "tools" / "verify_ascend_export.py"
    proc = subprocess.run([str(python), str(tool), "--json"], capture_output=True, text=True,
                          timeout=850)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and len(rows) == 8, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert {r["mindspore"] for r in rows} != {"2.10.0"} and all(r["ok"] for r in rows)

"""Checkpoint ingestion (issue 3): every format behind one reader, validation before any
output, per-rank shards (atomic, resumable), merge and MindFormers conversions bit-exact,
the memory plan against the bytes actually written, and builds from every format
giving the same rank weights.

Checkpoints are tiny and made here: transformers' save_pretrained for safetensors,
torch.save of each shard for .bin (as transformers 4.x did; transformers 5 writes only
safetensors), mindspore.save_checkpoint for .ckpt. bf16 is compared as bit patterns.
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import CONFIGS_DIR, REPO, make_hf_checkpoint
from test_formats import _Evil, _ms_params, _save_shards, _state_dict
from dsflow.export.checkpoint.reader import Checkpoint, read_config
from dsflow.export.cli.weights import merge, parse_size, plan, shard
from dsflow.common.errors import CheckpointError
from dsflow.export.weights.rank_files import read_rank, verify, write_shards
from dsflow.export.checkpoint.safetensors import SafetensorsFile, write_safetensors

LAYERS = 2
# MindFormers predict yaml of the tiny model (the 33B one's keys, tiny values)
TINY_YAML = """\
model:
  model_config:
    type: LlamaConfig
    seq_length: 512
    hidden_size: 64
    num_layers: 2
    num_heads: 8
    n_kv_heads: 4
    vocab_size: 32256
    intermediate_size: 128
    rms_norm_eps: 1.0e-6
    theta: 100000.0
    extend_method: "PI"
    scaling_factor: 4.0
    param_init_type: "bfloat16"
  arch:
    type: LlamaForCausalLM
"""


def invoke(command, *args) -> tuple[int, str]:
    result = CliRunner().invoke(command, [str(a) for a in args])
    return result.exit_code, result.output


def bits(path: Path, config=None) -> dict[str, tuple[str, bytes]]:
    """name -> (dtype, raw bytes) of every tensor a checkpoint holds."""
    with Checkpoint(path, config) as ckpt:
        ckpt.validate()
        return {n: (ckpt.dtype(n), np.array(ckpt.view(n)).tobytes()) for n in ckpt.names()}


def no_temps(directory: Path) -> bool:
    return not [p for p in directory.rglob("*") if ".tmp-" in p.name]


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    """A bf16 HF checkpoint (config.json, model.safetensors, tokenizer) and its model."""
    path = tmp_path_factory.mktemp("bf16") / "hf"
    model = make_hf_checkpoint(path, seed=5, dtype=torch.bfloat16)
    return path, model


@pytest.fixture(scope="module")
def formats(bf16_model, tmp_path_factory):
    """The same weights as sharded safetensors, .bin shards, one .bin, a MindFormers
    .ckpt with config.json, and a .ckpt with only a predict yaml."""
    import mindspore as ms
    ms.set_device("CPU")  # before any MindSpore op, as `dsexport build` does
    src, model = bf16_model
    root = tmp_path_factory.mktemp("formats")
    sd = _state_dict(model, "bfloat16")
    out = {"safetensors": src}
    model.save_pretrained(root / "st-sharded", max_shard_size="200KB")
    out["st-sharded"] = root / "st-sharded"
    for name, make in (("bin-shards", lambda d: _save_shards(sd, d, 3)),
                       ("bin", lambda d: torch.save(
                           {**sd, "model.layers.0.self_attn.rotary_emb.inv_freq":
                            torch.ones(4)}, d / "pytorch_model.bin")),
                       ("ckpt", lambda d: ms.save_checkpoint(_ms_params(sd),
                                                             str(d / "deepseek.ckpt")))):
        d = root / name
        d.mkdir()
        make(d)
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(src / f, d / f)
        out[name] = d
    yaml_dir = root / "ckpt-yaml"
    yaml_dir.mkdir()
    shutil.copyfile(out["ckpt"] / "deepseek.ckpt", yaml_dir / "deepseek.ckpt")
    (yaml_dir / "predict_deepseek_tiny.yaml").write_text(TINY_YAML)
    out["ckpt-yaml"] = yaml_dir / "deepseek.ckpt"
    return out


# --- reading every format --------------------------------------------------------

def test_every_format_reads_the_same_bits(formats):
    want = bits(formats["safetensors"])
    assert {d for d, _ in want.values()} == {"bfloat16"}
    expected_format = {"safetensors": "safetensors", "st-sharded": "safetensors",
                       "bin-shards": "pytorch", "bin": "pytorch", "ckpt": "mindspore",
                       "ckpt-yaml": "mindspore"}
    for name, path in formats.items():
        with Checkpoint(path) as ckpt:
            assert ckpt.format == expected_format[name], name
            assert ckpt.weights_dtype() == "bfloat16"
        got = bits(path)
        got.pop("model.layers.0.self_attn.rotary_emb.inv_freq", None)  # ignored buffer
        assert got == want, name
    with Checkpoint(formats["ckpt-yaml"]) as ckpt:
        assert ckpt.config_path.suffix == ".yaml"
        assert ckpt.config.rope_scaling_factor == 4.0 and ckpt.config.num_kv_heads == 4


def test_config_sources(formats, tmp_path):
    assert read_config(formats["ckpt-yaml"].parent).path.name == "predict_deepseek_tiny.yaml"
    by_dir, by_file = read_config(formats["bin"]), read_config(formats["bin"] / "config.json")
    assert by_dir.config == by_file.config and by_dir.path == by_file.path
    (tmp_path / "a.yaml").write_text(TINY_YAML)
    (tmp_path / "b.yaml").write_text(TINY_YAML)
    with pytest.raises(Exception, match=r"several yaml files \(a\.yaml, b\.yaml\)"):
        read_config(tmp_path)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_st(path: Path, edit, extra=None) -> None:
    """Rewrite a safetensors file with edit(name, array, dtype) -> (array, dtype)."""
    with SafetensorsFile(path) as f:
        items = [(n, *edit(n, np.array(f.array(n)), f.dtype(n))) for n in f.names()]
    write_safetensors(path, items + ([extra] if extra else []))


def test_broken_checkpoints_name_file_and_tensor(formats, tmp_path):
    """Missing shard, truncated/corrupt/lying files, extra or integer tensors: one
    CheckpointError each, naming the file and (where there is one) the tensor."""
    cases = []
    d = _copy(formats["bin-shards"], tmp_path / "missing")
    (d / "pytorch_model-00002-of-00003.bin").unlink()
    cases.append((d, r"pytorch_model-00002-of-00003\.bin: shard listed in "
                     r"pytorch_model\.bin\.index\.json is missing \(it holds tensor 'model"))
    d = _copy(formats["bin"], tmp_path / "truncated-bin")
    data = (d / "pytorch_model.bin").read_bytes()
    (d / "pytorch_model.bin").write_bytes(data[:len(data) // 2])
    cases.append((d, r"pytorch_model\.bin: .*truncated"))
    d = _copy(formats["ckpt"], tmp_path / "truncated-ckpt")
    data = (d / "deepseek.ckpt").read_bytes()
    (d / "deepseek.ckpt").write_bytes(data[:len(data) - 1000])
    cases.append((d, r"deepseek\.ckpt: tensor 'lm_head\.weight' is cut off"))
    d = _copy(formats["safetensors"], tmp_path / "lying")
    raw = bytearray((d / "model.safetensors").read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["model.norm.weight"]["shape"] = [32]  # 64 bytes of bf16 claim 128
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (n - len(blob))
    (d / "model.safetensors").write_bytes(raw[:8] + blob + raw[8 + n:])
    cases.append((d, r"model\.safetensors: tensor 'model\.norm\.weight': 128 bytes of data "
                     r"but shape \[32\] BF16 needs 64"))
    d = _copy(formats["safetensors"], tmp_path / "extra")
    extra = ("model.layers.9.mlp.up_proj.weight", np.zeros(2, np.uint16), "bfloat16")
    _rewrite_st(d / "model.safetensors", lambda n, a, t: (a, t), extra)
    cases.append((d, r"model\.safetensors: unexpected tensor 'model\.layers\.9\.mlp"))
    d = _copy(formats["safetensors"], tmp_path / "int")
    _rewrite_st(d / "model.safetensors", lambda n, a, t: (a.astype(np.int32), "int32")
                if n == "model.norm.weight" else (a, t))
    cases.append((d, r"model\.safetensors: tensor 'model\.norm\.weight' has dtype int32"))
    for path, pattern in cases:
        with pytest.raises(CheckpointError, match=pattern):
            with Checkpoint(path) as ckpt:
                ckpt.validate()


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "ckpt"])
def test_nan_and_inf_are_reported_by_name(bf16_model, tmp_path, fmt):
    import mindspore as ms
    src, model = bf16_model
    sd = {k: v.clone() for k, v in _state_dict(model, "float32" if fmt == "ckpt"
                                                 else "bfloat16").items()}
    bad = "model.layers.1.mlp.down_proj.weight"
    sd[bad][3, 100] = float("nan") if fmt != "bin" else float("inf")
    d = tmp_path / "ck"
    d.mkdir()
    shutil.copyfile(src / "config.json", d / "config.json")
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    elif fmt == "bin":
        torch.save(sd, d / "pytorch_model.bin")
    else:
        ms.save_checkpoint(_ms_params(sd), str(d / "x.ckpt"))
    name = {"safetensors": "model.safetensors", "bin": "pytorch_model.bin",
            "ckpt": "x.ckpt"}[fmt]
    code, out = invoke(shard, "--model", d, "--out", tmp_path / "sh", "--tp", 2, "-q")
    assert code == 1 and out.startswith("dsexport: error: ")
    assert name in out and repr(bad) in out and "NaN or Inf" in out
    assert not (tmp_path / "sh" / "shards.json").exists() and no_temps(tmp_path)


def test_fp32_values_overflowing_fp16_are_caught(bf16_model, tmp_path):
    src, model = bf16_model
    sd = {k: v.clone() for k, v in _state_dict(model, "float32").items()}
    sd["model.norm.weight"][0] = 1e6  # finite in fp32, Inf in fp16
    d = tmp_path / "ck"
    d.mkdir()
    shutil.copyfile(src / "config.json", d / "config.json")
    torch.save(sd, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' contains NaN or Inf "
                                              r"values \(as float16\)"):
        write_shards(d, tmp_path / "sh", 1, "float16")


def test_malicious_bin_is_refused_and_never_run(bf16_model, tmp_path):
    src, _ = bf16_model
    marker = tmp_path / "pwned"
    d = tmp_path / "evil"
    d.mkdir()
    shutil.copyfile(src / "config.json", d / "config.json")
    torch.save({"model.norm.weight": torch.ones(64), "x": _Evil(marker)},
               d / "pytorch_model.bin")
    code, out = invoke(shard, "--model", d, "--out", tmp_path / "sh")
    assert code == 1 and "pytorch_model.bin" in out and "system'" in out
    assert "Traceback" not in out and not marker.exists()
    assert not (tmp_path / "sh").exists()


# --- shards: format, resume, merge, plan ------------------------------------------

def test_shard_merge_round_trip_with_vocab_padding(tmp_path):
    """vocab 32257 at tp=2: lm_head rows padded with zeros in the shards, cut by merge."""
    src = tmp_path / "hf"
    make_hf_checkpoint(src, seed=2, dtype=torch.bfloat16, vocab_size=32257)
    code, out = invoke(shard, "--model", src, "--out", tmp_path / "sh", "--tp", 2)
    assert code == 0, out
    index = verify(tmp_path / "sh")
    assert index.dtype == "bfloat16" and index.tp == 2  # bf16 kept by default
    lm = dict(read_rank(tmp_path / "sh", 1))["lm_head.weight"]
    assert lm.shape == (16129, 64) and not lm[-1].any()  # one zero row of padding
    code, out = invoke(merge, tmp_path / "sh", "--out", tmp_path / "back",
                       "--max-shard-size", "2MB")
    assert code == 0, out
    back = tmp_path / "back"
    assert len(list(back.glob("model-*.safetensors"))) > 1
    assert (back / "model.safetensors.index.json").is_file()
    assert bits(back) == bits(src)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json",
              "generation_config.json"):
        assert (back / f).read_bytes() == (src / f).read_bytes(), f
    code, out = invoke(merge, tmp_path / "sh", "--out", back)
    assert code == 1 and "refusing to overwrite" in out


def test_interrupted_shard_leaves_nothing_finished_and_rerun_skips(bf16_model, tmp_path):
    src, _ = bf16_model
    out = tmp_path / "sh"

    def interrupt(event, rank, done, total):
        if rank == 1 and done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_shards(src, out, 4, progress=interrupt)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["rank0.json", "rank0.safetensors"] and no_temps(out)
    (out / "rank1.safetensors.tmp-999999").write_bytes(b"left by a killed run")
    mtime = (out / "rank0.safetensors").stat().st_mtime_ns
    events = []
    write_shards(src, out, 4, progress=lambda *e: events.append(e[:2]))
    assert events.count(("skip", 0)) == 1 and ("tensor", 0) not in events
    assert {r for e, r in events if e == "tensor"} == {1, 2, 3}
    assert (out / "rank0.safetensors").stat().st_mtime_ns == mtime and no_temps(out)
    verify(out)
    events.clear()
    write_shards(src, out, 4, progress=lambda *e: events.append(e[:2]))
    assert events == [("skip", r) for r in range(4)]
    (out / "rank2.safetensors").write_bytes(b"altered")  # a checksum that no longer matches
    events.clear()
    write_shards(src, out, 2, "float32", progress=lambda *e: events.append(e[:2]))
    assert ("skip", 0) not in events  # new dtype and tp: new key, nothing reused
    assert sorted(p.name for p in out.glob("rank*")) == ["rank0.json", "rank0.safetensors",
                                                        "rank1.json", "rank1.safetensors"]
    assert verify(out).dtype == "float32"


def test_shard_refuses_a_foreign_directory(bf16_model, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    code, out = invoke(shard, "--model", bf16_model[0], "--out", tmp_path / "mine")
    assert code == 1 and "'notes.txt'" in out
    code, out = invoke(shard, "--model", tmp_path / "nope", "--out", tmp_path / "x")
    assert (code, out) == (1, f"dsexport: error: {tmp_path / 'nope'}: no such file or "
                              "directory\n")
    code, out = invoke(shard, "--model", bf16_model[0], "--out", tmp_path / "x", "--tp", 3)
    assert code == 1 and "valid values: 1, 2, 4" in out


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_plan_weights_equal_the_bytes_shard_writes(tmp_path_factory, tp):
    src = tmp_path_factory.getbasetemp() / "plan-hf"
    if not src.exists():
        make_hf_checkpoint(src, seed=3, dtype=torch.bfloat16, vocab_size=32257)
    out = tmp_path_factory.mktemp("plan") / "sh"
    write_shards(src, out, tp)
    code, text = invoke(plan, "--config", src, "--tp", tp, "--max-seq", 64, "--batch", 3,
                        "--json")
    assert code == 0, text
    report = json.loads(text)
    assert len(report["ranks"]) == tp
    for r, entry in enumerate(report["ranks"]):
        path = out / f"rank{r}.safetensors"
        with open(path, "rb") as f:
            (header,) = struct.unpack("<Q", f.read(8))
        assert entry["weights_bytes"] == path.stat().st_size - 8 - header
        # 2 (K and V) * layers * batch * kv_heads/tp * max_seq * head_dim * 2 bytes
        assert entry["kv_cache_bytes"] == 2 * LAYERS * 3 * (4 // tp) * 64 * 8 * 2
        assert entry["total_bytes"] == (entry["weights_bytes"] + entry["kv_cache_bytes"]
                                        + entry["activation_bytes"])
        assert entry["fits"] == {"ascend_910b": True, "host_ram": True}
    assert report["fits"] == {"ascend_910b": True, "host_ram": True}


def test_plan_33b():
    cfg = CONFIGS_DIR / "deepseek-coder-33b-instruct.config.json"
    code, text = invoke(plan, "--config", cfg, "--tp", 4, "--max-seq", 16384, "--batch", 1,
                        "--json")
    assert code == 0, text
    rank = json.loads(text)["ranks"][0]
    # 33B in bf16 over 4 ranks plus 3/4 of a replicated embedding: 15.85 GiB
    assert 15.8 * 2**30 < rank["weights_bytes"] < 15.9 * 2**30
    assert rank["kv_cache_bytes"] == 2 * 62 * 1 * 2 * 16384 * 128 * 2
    assert rank["fits"]["ascend_910b"] and not json.loads(text)["fits"]["host_ram"]
    code, text = invoke(plan, "--config", cfg, "--tp", 4, "--max-seq", 16384)
    assert code == 0 and "fits an Ascend 910B per rank" in text and "rank | weights" in text
    code, text = invoke(plan, "--config", cfg, "--tp", 3)
    assert code == 1 and text.startswith("dsexport: error: --tp 3")
    assert parse_size("5GB", "x") == 5 * 10**9 and parse_size("2GiB", "x") == 2 * 2**30


# --- MindFormers conversions -----------------------------------------------------

def _tool(name: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_convert_weight_and_back_are_bit_exact(bf16_model, tmp_path):
    import mindspore as ms
    src, _ = bf16_model
    convert_weight, convert_reversed = _tool("convert_weight"), _tool("convert_reversed")
    ckpt = tmp_path / "ms" / "deepseek.ckpt"
    ckpt.parent.mkdir()
    # the seed's form: --torch_ckpt_path is a weights file of the HF directory
    assert convert_weight(["--torch_ckpt_path", str(src / "model.safetensors"),
                           "--mindspore_ckpt_path", str(ckpt)]) == 0
    loaded = ms.load_checkpoint(str(ckpt))
    assert "model.tok_embeddings.embedding_weight" in loaded
    assert str(loaded["model.layers.0.attention.wq.weight"].dtype) == "BFloat16"
    assert convert_reversed(["--mindspore_ckpt_path", str(ckpt), "--torch_ckpt_path",
                             str(tmp_path / "back.bin"), "--config", str(src / "config.json"),
                             "--tokenizer_dir", str(src)]) == 0
    back = tmp_path / "back"
    assert bits(back) == bits(src)
    assert (back / "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert (back / "tokenizer.json").is_file()
    # through fp32 and back: bf16 -> fp32 -> bf16 is exact
    assert convert_weight(["--input_path", str(src), "--output_path", str(tmp_path / "f.ckpt"),
                           "--dtype", "fp32"]) == 0
    assert convert_reversed(["--mindspore_ckpt_path", str(tmp_path / "f.ckpt"),
                             "--torch_ckpt_path", str(tmp_path / "again"), "--dtype", "bf16",
                             "--config", str(src / "config.json")]) == 0
    assert bits(tmp_path / "again") == bits(src)
    assert convert_weight(["--torch_ckpt_path", str(tmp_path / "nope" / "x.bin"),
                           "--mindspore_ckpt_path", str(tmp_path / "n.ckpt")]) == 1


# --- builds from every format ----------------------------------------------------

def _artifact_weights(art: Path, tp: int) -> dict:
    """(rank, parameter name) -> array, read back from each rank's decode MindIR."""
    import mindspore as ms
    from mindspore import nn
    from dsflow.artifacts.manifest import read_manifest
    m = read_manifest(art)
    out = {}
    for rank in range(tp):
        cell = nn.GraphCell(ms.load(str(m.graph_path(rank, "decode"))))
        for name, p in cell.parameters_dict().items():
            out[rank, name] = p.asnumpy()
    return out


def test_builds_from_bin_ckpt_and_shards_equal_the_safetensors_build(
        tiny_checkpoint, export_tiny, tmp_path):
    import mindspore as ms
    from dsflow.export.pipeline.build import BuildOptions, build
    tp = 2
    reference = _artifact_weights(export_tiny(tp), tp)
    assert len(reference) == tp * (LAYERS * 9 + 3)
    with Checkpoint(tiny_checkpoint) as ck:
        sd = {n: torch.from_numpy(np.array(ck.view(n))) for n in ck.names()}
    sources = {}
    for name in ("bin", "ckpt"):
        d = tmp_path / name
        d.mkdir()
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(tiny_checkpoint / f, d / f)
        sources[name] = d
    _save_shards(sd, sources["bin"], 2)
    ms.save_checkpoint(_ms_params(sd), str(sources["ckpt"] / "tiny.ckpt"))
    sources["shards"] = write_shards(tiny_checkpoint, tmp_path / "shards", tp).root
    for name, path in sources.items():
        art = build(BuildOptions(model_dir=path, out=tmp_path / f"art-{name}", tp=tp))
        got = _artifact_weights(art, tp)
        assert got.keys() == reference.keys(), name
        for key, value in reference.items():
            assert np.array_equal(got[key], value), (name, key)
        assert not (art / ".shards").exists()

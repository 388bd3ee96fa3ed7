"""Checkpoint formats besides safetensors: PyTorch zip .bin, MindSpore .ckpt, and the
MindFormers name/config mapping. Every tensor must come back bit-exact (bf16 compared
as uint16 bit patterns); hostile or broken files must fail with a CheckpointError that
names the file.

transformers 5 no longer writes .bin (save_pretrained ignores safe_serialization), so
shards are written the way transformers 4.x did it: torch.save of each shard's dict.
"""
from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dsflow.common.errors import CheckpointError, ExportError
from dsflow.export.checkpoint.mindformers import (config_from_mindformers_yaml,
                                       hf_to_mindformers, mindformers_to_hf)
from dsflow.export.checkpoint.mindspore_ckpt import MindSporeCkptFile, _record_head, write_mindspore_ckpt
from dsflow.export.checkpoint.torch_bin import TorchBinFile
from dsflow.graphs.config import ConfigError, config_from_hf_dict

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16,
                "bfloat16": torch.bfloat16}


@pytest.fixture(scope="module")
def hf_model():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _state_dict(model, dtype: str) -> dict:
    return {k: v.detach().to(TORCH_DTYPES[dtype]).contiguous()
            for k, v in model.state_dict().items()}


def _bits(t: torch.Tensor) -> np.ndarray:
    """The numpy value a reader must return: bf16 as its uint16 bit patterns."""
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _assert_same(f, expected: dict) -> None:
    assert sorted(f.names()) == sorted(expected)
    for name, t in expected.items():
        got, want = f.array(name), _bits(t)
        assert f.shape(name) == tuple(t.shape), name
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert got.tobytes() == want.tobytes(), name


def _save_shards(sd: dict, directory: Path, n: int = 2) -> list[Path]:
    """pytorch_model-0000X-of-0000N.bin + index, as save_pretrained(safe_serialization=
    False) wrote them in transformers 4.x."""
    names = list(sd)
    per = -(-len(names) // n)
    paths, weight_map = [], {}
    for i in range(n):
        fname = f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin"
        shard = {k: sd[k] for k in names[i * per:(i + 1) * per]}
        torch.save(shard, directory / fname)
        weight_map.update({k: fname for k in shard})
        paths.append(directory / fname)
    (directory / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return paths


# --- PyTorch .bin ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_bin_shards_bit_exact(hf_model, tmp_path, dtype):
    sd = _state_dict(hf_model, dtype)
    seen = {}
    for path in _save_shards(sd, tmp_path):
        f = TorchBinFile(path)
        assert {f.dtype(n) for n in f.names()} == {dtype}
        _assert_same(f, {n: sd[n] for n in f.names()})
        seen.update(dict.fromkeys(f.names()))
        f.close()
    assert sorted(seen) == sorted(sd)


def test_bin_whole_state_dict_views_and_shared_storage(hf_model, tmp_path):
    """model.state_dict() as is (OrderedDict with _metadata), plus tensors that are views:
    transposed, offset slices, storage shared between entries, scalars, empty."""
    full = hf_model.state_dict()
    sd = type(full)((k, v.to(torch.bfloat16)) for k, v in full.items())
    sd._metadata = full._metadata
    base = torch.arange(60, dtype=torch.float32)
    extra = {"t": torch.arange(12, dtype=torch.float16).reshape(3, 4).t(),
             "slice": base[7:19].view(3, 4), "strided": base.view(6, 10)[1:5, 2:9:3],
             "shared_a": base[:10], "shared_b": base[50:], "scalar": torch.tensor(7),
             "empty": torch.zeros(0, 5), "flag": torch.tensor([True, False])}
    sd.update(extra)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    f = TorchBinFile(tmp_path / "pytorch_model.bin")
    _assert_same(f, sd)
    assert f.dtype("model.norm.weight") == "bfloat16" and f.dtype("flag") == "bool"
    view = f.array("model.layers.0.self_attn.q_proj.weight")
    assert not view.flags.writeable and not view.flags.owndata  # a view into the map
    f.close()


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2), "x": _Evil(marker)}, path)
    assert b"system" in zipfile.ZipFile(path).read("pytorch_model/data.pkl")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*'(posix|os)\.system'"):
        TorchBinFile(path)
    assert not marker.exists()


@pytest.mark.parametrize("module,name", [("builtins", "eval"),
                                         ("torch.storage", "_load_from_bytes"),
                                         ("collections", "defaultdict")])
def test_other_globals_are_refused(tmp_path, module, name):
    payload = (b"\x80\x02c" + f"{module}\n{name}\n".encode()
               + b"X\x0e\x00\x00\x00print('owned')\x85R.")
    path = tmp_path / "evil.bin"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
    with pytest.raises(CheckpointError, match=rf"evil\.bin.*'{module}\.{name}'"):
        TorchBinFile(path)


def _rezip(src: Path, dst: Path, drop=(), replace=None, compress=zipfile.ZIP_STORED):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compress) as zout:
        for info in zin.infolist():
            if info.filename.endswith(drop):
                continue
            data = zin.read(info)
            if replace and info.filename.endswith(replace[0]):
                data = replace[1](data)
            zout.writestr(info.filename, data, compress_type=compress)


def test_bin_broken_files(tmp_path):
    good = tmp_path / "good.bin"
    torch.save({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, good)
    data = good.read_bytes()

    cases = {}
    (tmp_path / "truncated.bin").write_bytes(data[:-200])
    cases["truncated.bin"] = "truncated"
    (tmp_path / "empty.bin").write_bytes(b"")
    cases["empty.bin"] = "truncated"
    _rezip(good, tmp_path / "nodata.bin", drop=("/data/0",))
    cases["nodata.bin"] = r"tensor 'w'.*data/0' is missing"
    _rezip(good, tmp_path / "deflated.bin", compress=zipfile.ZIP_DEFLATED)
    cases["deflated.bin"] = "compressed"
    _rezip(good, tmp_path / "short.bin", replace=("/data/0", lambda d: d[:16]))
    cases["short.bin"] = r"tensor 'w'.*16 bytes.*need 24"
    numel = re.compile(rb"(cpuq.)K\x06")  # storage numel 6 in the persistent id
    assert numel.search(zipfile.ZipFile(good).read("good/data.pkl"))
    _rezip(good, tmp_path / "overrun.bin",
           replace=("data.pkl", lambda d: numel.sub(lambda m: m.group(1) + b"K\x04", d)))
    cases["overrun.bin"] = r"tensor 'w'.*reaches element 5.*has 4"
    torch.save({"w": torch.ones(2), "step": 3}, tmp_path / "notensor.bin")
    cases["notensor.bin"] = r"'step' is a int, not a tensor"
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.bin",
               _use_new_zipfile_serialization=False)
    cases["legacy.bin"] = "legacy"
    for fname, pattern in cases.items():
        with pytest.raises(CheckpointError, match=re.escape(fname) + ".*" + pattern):
            TorchBinFile(tmp_path / fname)


# --- MindSpore .ckpt -------------------------------------------------------------

def _ms_params(sd: dict):
    import mindspore as ms
    params = []
    for name, t in sd.items():
        value = t.float().numpy()
        dtype = {torch.bfloat16: ms.bfloat16, torch.float16: ms.float16}.get(t.dtype,
                                                                             ms.float32)
        params.append(ms.Parameter(ms.Tensor(value, dtype), name=hf_to_mindformers(name)))
    return params


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_ckpt_from_mindspore_bit_exact(hf_model, tmp_path, dtype):
    """A MindFormers-named checkpoint, as research/deepseek/convert_weight.py writes."""
    import mindspore as ms
    sd = _state_dict(hf_model, dtype)
    path = tmp_path / "deepseek.ckpt"
    ms.save_checkpoint(_ms_params(sd), str(path))
    f = MindSporeCkptFile(path)
    _assert_same(f, {hf_to_mindformers(n): t for n, t in sd.items()})
    assert f.dtype("model.norm_out.weight") == dtype
    f.close()


def test_ckpt_crc_scalars_strings_and_pieces(tmp_path, monkeypatch):
    import mindspore as ms
    import mindspore.train.serialization as ser
    big = np.arange(64 * 32, dtype=np.float32).reshape(64, 32)
    params = [ms.Parameter(ms.Tensor(big), name="big"),
              ms.Parameter(ms.Tensor(np.float16(1.5)), name="scalar")]
    path = tmp_path / "crc.ckpt"
    monkeypatch.setattr(ser, "SLICE_SIZE", 1)  # 1 KiB pieces instead of 512 MiB
    ms.save_checkpoint(params, str(path), crc_check=True, append_dict={"epoch_num": 2,
                                                                       "note": "hi"})
    monkeypatch.undo()
    f = MindSporeCkptFile(path, check_crc=True)
    assert len(f.entries["big"].chunks) == 8
    assert np.array_equal(f.array("big"), big)
    assert f.shape("scalar") == () and f.array("scalar") == np.float16(1.5)
    assert f.array("epoch_num") == 2 and f.strings == {"note": "hi"}
    f.close()
    data = bytearray(path.read_bytes())
    data[200] ^= 0xFF
    bad = tmp_path / "flipped.ckpt"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"flipped\.ckpt.*CRC"):
        MindSporeCkptFile(bad, check_crc=True)


def test_write_ckpt_loads_in_mindspore(hf_model, tmp_path):
    import mindspore as ms
    sd = _state_dict(hf_model, "bfloat16")
    items = [(hf_to_mindformers(n), _bits(t), "bfloat16") for n, t in sd.items()]
    items.append(("fp32", np.linspace(-1, 1, 300, dtype=np.float32).reshape(3, 100),
                  "float32"))
    path = tmp_path / "written.ckpt"
    write_mindspore_ckpt(path, items, chunk_bytes=256)  # several pieces per tensor
    loaded = ms.load_checkpoint(str(path))
    assert list(loaded) == [n for n, _, _ in items]
    f = MindSporeCkptFile(path)
    for name, arr, dtype in items:
        p = loaded[name]
        got = (p.float().asnumpy().view(np.uint32) >> 16).astype(np.uint16) \
            if dtype == "bfloat16" else p.asnumpy()
        assert str(p.dtype) == ("BFloat16" if dtype == "bfloat16" else "Float32")
        assert np.array_equal(got, arr), name
        assert np.array_equal(f.array(name), arr) and f.dtype(name) == dtype
    f.close()
    with pytest.raises(ExportError, match="float64"):
        write_mindspore_ckpt(tmp_path / "x.ckpt", [("a", np.zeros(2), "bfloat16")])


def test_ckpt_broken_files(tmp_path):
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    good = tmp_path / "good.ckpt"
    write_mindspore_ckpt(good, [("a", w, "float32"), ("model.norm_out.weight", w, "float32")])
    data = good.read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[:-10])
    (tmp_path / "garbage.ckpt").write_bytes(b"\x93NUMPY not a checkpoint at all")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    lying = _record_head("liar", (3, 5), "Float32", w.nbytes) + w.tobytes()
    (tmp_path / "lying.ckpt").write_bytes(lying)
    twice = _record_head("a", (3, 4), "Float32", w.nbytes) + w.tobytes()
    (tmp_path / "twice.ckpt").write_bytes(data + twice)
    cases = {"truncated.ckpt": r"tensor 'model\.norm_out\.weight' is cut off",
             "garbage.ckpt": "not a MindSpore checkpoint",
             "empty.ckpt": "empty",
             "lying.ckpt": r"tensor 'liar'.*48 bytes.*\[3, 5\].*needs 60",
             "twice.ckpt": r"tensor 'a': appears twice"}
    for fname, pattern in cases.items():
        with pytest.raises(CheckpointError, match=re.escape(fname) + ".*" + pattern):
            MindSporeCkptFile(tmp_path / fname)


# --- MindFormers names and config -------------------------------------------------

def test_name_map_round_trips(hf_model):
    names = list(hf_model.state_dict())
    mf = [hf_to_mindformers(n) for n in names]
    assert [mindformers_to_hf(n) for n in mf] == names
    assert len(set(mf)) == len(mf)
    assert hf_to_mindformers("model.embed_tokens.weight") == \
        "model.tok_embeddings.embedding_weight"
    assert hf_to_mindformers("model.norm.weight") == "model.norm_out.weight"
    assert hf_to_mindformers("lm_head.weight") == "lm_head.weight"
    assert hf_to_mindformers("model.layers.1.mlp.gate_proj.weight") == \
        "model.layers.1.feed_forward.w1.weight"
    assert hf_to_mindformers("model.layers.0.post_attention_layernorm.weight") == \
        "model.layers.0.ffn_norm.weight"
    assert mindformers_to_hf("model.layers.1.attention.wo.weight") == \
        "model.layers.1.self_attn.o_proj.weight"
    with pytest.raises(CheckpointError, match="unknown HuggingFace"):
        hf_to_mindformers("model.layers.0.self_attn.rotary_emb.inv_freq")
    with pytest.raises(CheckpointError, match="qkv_concat"):
        mindformers_to_hf("model.layers.0.attention.w_qkv.weight")
    with pytest.raises(CheckpointError, match="unknown MindFormers"):
        mindformers_to_hf("adam_m.model.norm_out.weight")


# The structure of mindspore-lab/mindformers research/deepseek/deepseek_33b/
# predict_deepseek_33b.yaml (trimmed; the model section verbatim).
PREDICT_YAML = """\
seed: 1234
output_dir: './output' # path to save checkpoint/strategy
auto_trans_ckpt: False  # If true, auto transform load_checkpoint
run_mode: 'predict'

# trainer config
trainer:
  type: CausalLanguageModelingTrainer
  model_name: 'deepseek_33b'
optimizer:
  type: FP32StateAdamWeightDecay
  eps: 1.e-8
  learning_rate: 5.e-6
train_dataset: &train_dataset
  data_loader:
    type: MindDataset
    dataset_dir: "/{path}/AdvertiseGenTrain_text.mindrecord"
    shuffle: True
  input_columns: ["input_ids"]  # "input_ids", "labels"
  batch_size: 4
train_dataset_task:
  type: CausalLanguageModelDataset
  dataset_config: *train_dataset
callbacks:
  - type: MFLossMonitor
    per_print_times: 1
  - type: CheckpointMonitor
    prefix: "deepseek_33b"
  - type: ObsMonitor
context:
  mode: 0 #0--Graph Mode; 1--Pynative Mode
  graph_kernel_flags: "--disable_expand_ops=Softmax,Dropout --reduce_fuse_depth=8"
  max_device_memory: "58GB"

# model config
model:
  model_config:
    type: LlamaConfig
    batch_size: 32 # add for increase predict
    seq_length: 16384
    hidden_size: 7168
    num_layers: 62
    num_heads: 56
    n_kv_heads: 8
    vocab_size: 32256
    multiple_of: 256
    initializer_range: 0.02
    intermediate_size: 19200
    max_position_embedding: 16384
    block_size: 128
    num_block: 1024
    rms_norm_eps: 1.0e-6
    bos_token_id: 32013
    eos_token_id: 32021
    pad_token_id: 32014
    ignore_token_id: -100
    compute_dtype: "bfloat16"
    layernorm_compute_type: "float32"
    is_dynamic: True
    softmax_compute_type: "float16"
    rotary_dtype: "bfloat16"
    param_init_type: "bfloat16"
    use_past: True
    extend_method: "PI" # support "None", "PI", "NTK"
    theta: 100000.0
    scaling_factor: 4
    use_flash_attention: True
    offset: 0
    checkpoint_name_or_path: ""
    top_k: 3
    do_sample: False
  arch:
    type: LlamaForCausalLM

processor:
  return_tensors: ms
  tokenizer:
    unk_token: None
    bos_token: '<｜begin▁of▁sentence｜>'
    eos_token: '<|EOT|>'
    tokenizer_file: ""  # tokenizer.json
    type: LlamaTokenizerFast
  type: LlamaProcessor

eval_callbacks:
  - type: ObsMonitor
layer_decay: 0.65
remote_save_url: "Please input obs url on AICC platform."
"""


def test_yaml_config_maps_to_hf(tmp_path):
    path = tmp_path / "predict_deepseek_33b.yaml"
    path.write_text(PREDICT_YAML, encoding="utf-8")
    hf = config_from_mindformers_yaml(path)
    assert hf["architectures"] == ["LlamaForCausalLM"]
    assert (hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"],
            hf["num_attention_heads"], hf["num_key_value_heads"], hf["vocab_size"]) == \
        (7168, 19200, 62, 56, 8, 32256)
    assert hf["rope_theta"] == 100000.0 and hf["rope_scaling"] == {"type": "linear",
                                                                   "factor": 4.0}
    assert hf["max_position_embeddings"] == 16384 and hf["rms_norm_eps"] == 1e-6
    assert (hf["bos_token_id"], hf["eos_token_id"], hf["torch_dtype"]) == \
        (32013, 32021, "bfloat16")
    cfg = config_from_hf_dict(hf, str(path))
    assert cfg.rope_scaling_factor == 4.0 and cfg.num_kv_heads == 8 and cfg.head_dim == 128

    ntk = PREDICT_YAML.replace('extend_method: "PI"', 'extend_method: "NTK"')
    path.write_text(ntk.replace("scaling_factor: 4", "scaling_factor: {factor: 2.0}"))
    hf = config_from_mindformers_yaml(path)
    assert hf["rope_theta"] == 200000.0 and "rope_scaling" not in hf
    path.write_text(PREDICT_YAML.replace('extend_method: "PI"', 'extend_method: "YaRN"'))
    with pytest.raises(ConfigError, match=r"predict_deepseek_33b\.yaml.*YaRN"):
        config_from_mindformers_yaml(path)
    path.write_text(PREDICT_YAML.replace("    num_heads: 56\n", ""))
    with pytest.raises(ConfigError, match=r"model_config\.num_heads"):
        config_from_mindformers_yaml(path)


def test_invalid_yaml_is_one_clear_error(tmp_path):
    (tmp_path / "bad.yaml").write_text("model:\n  model_config: {a: 1}\n  - x\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml"):
        config_from_mindformers_yaml(tmp_path / "bad.yaml")

"""Config parsing, the tensor-parallel plan and checkpoint reading (no MindSpore needed)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import CONFIGS_DIR, make_hf_checkpoint
from dsflow.export.checkpoint.reader import Checkpoint
from dsflow.export.weights.split import rank_tensors
from dsflow.graphs.config import ConfigError, config_from_hf_dict, load_config
from dsflow.graphs.tp_plan import TPError, check_tp, padded_vocab, valid_tp_degrees, weight_specs

BASE = {"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 8,
        "num_key_value_heads": 2}


@pytest.mark.parametrize("rope", [
    {"rope_theta": 100000, "rope_scaling": {"type": "linear", "factor": 4.0}},
    {"rope_parameters": {"rope_type": "linear", "rope_theta": 100000.0, "factor": 4.0}},
])
def test_rope_scaling_old_and_new_keys(rope):
    cfg = config_from_hf_dict({**BASE, **rope})
    assert cfg.rope_theta == 100000.0 and cfg.rope_scaling_factor == 4.0


def test_unsupported_rope_type_is_refused():
    with pytest.raises(ConfigError, match="'yarn' is not supported"):
        config_from_hf_dict({**BASE, "rope_scaling": {"type": "yarn", "factor": 4.0}})


def test_real_configs_and_their_tp_degrees():
    cfg33 = load_config(CONFIGS_DIR / "deepseek-coder-33b-instruct.config.json")
    assert (cfg33.num_heads, cfg33.num_kv_heads, cfg33.head_dim) == (56, 8, 128)
    assert valid_tp_degrees(cfg33) == [1, 2, 4, 8]
    with pytest.raises(TPError, match="valid values: 1, 2, 4, 8"):
        check_tp(cfg33, 3)
    cfg13 = load_config(CONFIGS_DIR / "deepseek-coder-1.3b-instruct.config.json")
    assert cfg13.num_groups == 1 and cfg13.rope_scaling_factor == 4.0


def test_plan_shapes_cover_the_full_tensors():
    cfg = config_from_hf_dict({**BASE, "vocab_size": 101})  # vocab not divisible by tp
    tp = 4
    for spec in weight_specs(cfg):
        if spec.axis is None:
            assert spec.rank_shape(tp) == spec.shape
            continue
        ranges = [spec.rank_range(tp, r) for r in range(tp)]
        covered = sum(stop - start for start, stop, _ in ranges)
        assert covered == spec.shape[spec.axis]
        assert all(stop - start + pad == spec.rank_shape(tp)[spec.axis]
                   for start, stop, pad in ranges)
    assert padded_vocab(cfg, tp) == 104


def test_index_sharded_checkpoint_reads_like_a_single_file(tmp_path):
    make_hf_checkpoint(tmp_path / "one", seed=3)
    make_hf_checkpoint(tmp_path / "many", seed=3)
    # re-save "many" as index-sharded safetensors
    from transformers import LlamaForCausalLM
    LlamaForCausalLM.from_pretrained(tmp_path / "one").save_pretrained(
        tmp_path / "many", max_shard_size="1MB")
    (tmp_path / "many" / "model.safetensors").unlink(missing_ok=True)
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    with Checkpoint(tmp_path / "one") as a, Checkpoint(tmp_path / "many") as b:
        b.validate()
        for (na, ta), (nb, tb) in zip(rank_tensors(a, 2, 1, "float32"),
                                      rank_tensors(b, 2, 1, "float32")):
            assert na == nb and np.array_equal(ta, tb)


def test_missing_shard_is_named(tmp_path):
    make_hf_checkpoint(tmp_path / "ck", seed=1)
    from transformers import LlamaForCausalLM
    LlamaForCausalLM.from_pretrained(tmp_path / "ck").save_pretrained(tmp_path / "ck",
                                                                      max_shard_size="1MB")
    (tmp_path / "ck" / "model.safetensors").unlink(missing_ok=True)
    shard = sorted((tmp_path / "ck").glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(Exception, match=shard.name):
        Checkpoint(tmp_path / "ck")

"""MindFormers llama checkpoints and configs, in HuggingFace terms.

Weight names. MindFormers' HF -> MindSpore converters are pure renames: no tensor is
transposed, permuted or rescaled, only the dtype may change (bf16 stays bf16 through
fp32, so bit-exact). Sources (mindspore-lab/mindformers):
- research/deepseek/convert_weight.py (`name_replace` + three special cases) and
  research/deepseek/convert_reversed.py, the DeepSeek-Coder-33B converters;
- mindformers/models/llama/convert_weight.py / convert_reversed.py, same names.
The q/k `permute` in mindformers/models/llama/convert_weight.py applies only to Meta
`.pth` checkpoints (`convert_meta_torch_ckpt`, `convert_to_new_ckpt`): Meta interleaves
rotary pairs, HF and MindFormers both use the rotate-half layout (FreqsMgr in
llama_layer.py concatenates (freqs, freqs)), so HF weights need none. Optional
`--qkv_concat` / `--w2_transb` modes fuse wq/wk/wv into `attention.w_qkv` and w1/w3
into `feed_forward.w_gate_hidden` (and transpose w2); those layouts are refused here.

    model.embed_tokens.weight                 model.tok_embeddings.embedding_weight
    model.layers.N.self_attn.{q,k,v,o}_proj.  model.layers.N.attention.w{q,k,v,o}.
    model.layers.N.mlp.{gate,down,up}_proj.   model.layers.N.feed_forward.w{1,2,3}.
    model.layers.N.input_layernorm.           model.layers.N.attention_norm.
    model.layers.N.post_attention_layernorm.  model.layers.N.ffn_norm.
    model.norm.weight                         model.norm_out.weight
    lm_head.weight                            lm_head.weight

Configs. `config_from_mindformers_yaml` turns a predict yaml's model.model_config (e.g.
research/deepseek/predict_deepseek_33b.yaml) into a config.json dict that
`graphs.config.config_from_hf_dict` accepts. RoPE follows MindFormers' FreqsMgr:
extend_method "PI" divides positions by scaling_factor (= HF rope_scaling linear),
"LINEAR" divides frequencies by scaling_factor["factor"] (the same thing), "NTK"
multiplies theta by scaling_factor (= a plain larger rope_theta), "None" ignores
scaling_factor. FreqsMgr also raises max_position_embedding to seq_length when that is
larger, so max_position_embeddings = max(seq_length, max_position_embedding).

YAML is read with PyYAML's safe loader (no object construction from tags).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from dsflow.graphs.config import ConfigError
from dsflow.common.errors import CheckpointError

# per-layer module, HF -> MindFormers; the leaf (weight/bias) is kept
LAYER_MODULES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "model.tok_embeddings.embedding_weight",
    "model.norm.weight": "model.norm_out.weight",
    "lm_head.weight": "lm_head.weight",
}
FUSED_MINDFORMERS = ("attention.w_qkv.", "feed_forward.w_gate_hidden.")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def _rename(name: str, globals_: dict, modules: dict, kind: str) -> str:
    if name in globals_:
        return globals_[name]
    m = _LAYER.match(name)
    if m and m.group(2) in modules:
        return f"model.layers.{m.group(1)}.{modules[m.group(2)]}.{m.group(3)}"
    hint = ""
    if kind == "MindFormers" and any(f in name for f in FUSED_MINDFORMERS):
        hint = " (a --qkv_concat checkpoint: fused q/k/v and w1/w3 are not supported)"
    raise CheckpointError(f"unknown {kind} llama weight name {name!r}{hint}")


def hf_to_mindformers(name: str) -> str:
    """The MindFormers llama parameter holding HF weight `name` (same tensor, no
    transpose)."""
    return _rename(name, GLOBAL_NAMES, LAYER_MODULES, "HuggingFace")


def mindformers_to_hf(name: str) -> str:
    """The HF weight name of MindFormers llama parameter `name`."""
    return _rename(name, {v: k for k, v in GLOBAL_NAMES.items()},
                   {v: k for k, v in LAYER_MODULES.items()}, "MindFormers")


def _load_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    import yaml  # a dependency; imported here so that checkpoint reading alone stays light
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None


def _rope(mc: dict, theta: float, source: str) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) equivalent to MindFormers' FreqsMgr settings."""
    method = str(mc.get("extend_method", "None"))
    factor = mc.get("scaling_factor", 1.0)
    if isinstance(factor, dict):
        factor = factor.get("factor", 1.0)
    factor = float(factor)
    if method == "None" or factor == 1.0:
        return theta, None
    if method in ("PI", "LINEAR"):
        return theta, {"type": "linear", "factor": factor}
    if method == "NTK":
        return theta * factor, None
    raise ConfigError(f"{source}: model.model_config.extend_method {method!r} is not "
                      "supported (DeepSeek-Coder uses 'PI'; supported: None, PI, LINEAR, NTK)")


def config_from_mindformers_yaml(path: str | Path) -> dict:
    """A HuggingFace config.json dict for the model a MindFormers yaml describes."""
    path = Path(path)
    doc = _load_yaml(path)
    model = doc.get("model") if isinstance(doc, dict) else None
    mc = model.get("model_config") if isinstance(model, dict) else None
    if not isinstance(mc, dict):
        raise ConfigError(f"{path}: no model.model_config mapping: not a MindFormers "
                          "model yaml")
    arch = ((model.get("arch") or {}).get("type") or "LlamaForCausalLM")

    def need(key: str) -> Any:
        if mc.get(key) is None:
            raise ConfigError(f"{path}: missing model.model_config.{key}")
        return mc[key]

    heads = int(need("num_heads"))
    theta, scaling = _rope(mc, float(mc.get("theta", 10000.0)), str(path))
    seq = int(need("seq_length"))
    hf = {
        "architectures": [arch],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": int(need("hidden_size")),
        "intermediate_size": int(need("intermediate_size")),
        "num_hidden_layers": int(need("num_layers")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(mc.get("n_kv_heads") or heads),
        "vocab_size": int(need("vocab_size")),
        "rms_norm_eps": float(mc.get("rms_norm_eps", 1e-5)),
        "rope_theta": theta,
        "max_position_embeddings": max(seq, int(mc.get("max_position_embedding") or 0)),
        "attention_bias": bool(mc.get("qkv_has_bias", False)),
        "tie_word_embeddings": False,
        "torch_dtype": str(mc.get("param_init_type", "float16")),
    }
    if scaling:
        hf["rope_scaling"] = scaling
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if mc.get(key) is not None:
            hf[key] = mc[key]
    return hf

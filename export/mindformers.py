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

YAML: PyYAML is not a dsflow dependency; when it is missing, `_parse_simple_yaml` reads
the subset these files use (block mappings and lists, flow lists of scalars, quoted and
plain scalars, comments, &anchors and *aliases).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

from ..graphs.config import ConfigError
from .errors import CheckpointError

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
    try:
        import yaml
    except ImportError:
        return _parse_simple_yaml(text, str(path))
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


# --- the YAML subset, for machines without PyYAML --------------------------------

_NUMBER = re.compile(r"^[-+]?(\d[\d_]*)?(\.\d*)?([eE][-+]?\d+)?$")


def _scalar(text: str, anchors: dict) -> Any:
    s = text.strip()
    if s.startswith("*"):
        return anchors[s[1:]]
    if s[:1] in "'\"":
        if s[0] == "'":
            return s[1:-1].replace("''", "'")
        return ast.literal_eval(s)
    if s.startswith("[") and s.endswith("]"):
        inner = s[1:-1].strip()
        return [_scalar(x, anchors) for x in _split_flow(inner)] if inner else []
    low = s.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("", "~", "null"):
        return None
    if _NUMBER.match(s) and any(c.isdigit() for c in s):
        if re.match(r"^[-+]?\d[\d_]*$", s):
            return int(s.replace("_", ""))
        return float(s.replace("_", ""))
    return s


def _split_flow(inner: str) -> list[str]:
    """Split a flow list on commas outside quotes."""
    parts, cur, quote = [], "", None
    for c in inner:
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == ",":
            parts.append(cur)
            cur = ""
            continue
        cur += c
    return parts + [cur]


def _strip_comment(line: str) -> str:
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip()
    return line.rstrip()


def _parse_simple_yaml(text: str, source: str = "<yaml>") -> Any:
    """Parse the nested-mapping subset of YAML that MindFormers configs use."""
    lines = []
    for raw in text.splitlines():
        line = _strip_comment(raw)
        if line.strip() and line.strip() != "---":
            lines.append((len(line) - len(line.lstrip(" ")), line.strip()))
    anchors: dict = {}
    try:
        value, pos = _block(lines, 0, 0, anchors)
    except (KeyError, IndexError, ValueError, SyntaxError) as e:
        raise ConfigError(f"{source}: YAML outside the simple subset dsflow reads "
                          f"without PyYAML ({type(e).__name__}: {e})") from None
    if pos != len(lines):
        raise ConfigError(f"{source}: cannot parse YAML line {lines[pos][1]!r}")
    return value


def _key_value(item: str) -> tuple[str, str] | None:
    m = re.match(r"^('[^']*'|\"[^\"]*\"|[^'\"\[{][^:]*?):(\s+|$)(.*)$", item)
    if not m:
        return None
    key = m.group(1)
    return (key[1:-1] if key[:1] in "'\"" else key), m.group(3)


def _is_item(text: str) -> bool:
    return text == "-" or text.startswith("- ")


def _block(lines: list, pos: int, indent: int, anchors: dict) -> tuple[Any, int]:
    """A mapping or list whose items start at `indent`; returns (value, next line)."""
    if pos < len(lines) and _is_item(lines[pos][1]):
        return _list(lines, pos, lines[pos][0], anchors)
    out: dict = {}
    while pos < len(lines) and lines[pos][0] == indent:
        kv = _key_value(lines[pos][1])
        if kv is None:
            raise ValueError(f"expected 'key: value', got {lines[pos][1]!r}")
        key, rest = kv
        out[key], pos = _value(rest, lines, pos + 1, indent, anchors)
    return out, pos


def _value(rest: str, lines: list, pos: int, indent: int, anchors: dict) -> tuple[Any, int]:
    """The value after 'key:' (or '- '): inline scalar, or a nested block below."""
    anchor = None
    if rest.startswith("&"):
        anchor, _, rest = rest.partition(" ")
        anchor = anchor[1:]
    if rest:
        value = _scalar(rest, anchors)
    elif pos < len(lines) and (lines[pos][0] > indent or (
            lines[pos][0] == indent and _is_item(lines[pos][1]))):
        value, pos = _block(lines, pos, lines[pos][0], anchors)
    else:
        value = None
    if anchor:
        anchors[anchor] = value
    return value, pos


def _list(lines: list, pos: int, indent: int, anchors: dict) -> tuple[list, int]:
    out = []
    while pos < len(lines) and lines[pos][0] == indent and _is_item(lines[pos][1]):
        item = lines[pos][1][1:].lstrip()
        if item and _key_value(item):
            # "- key: v" starts a mapping whose keys sit at the item's column
            col = indent + len(lines[pos][1]) - len(item)
            lines[pos] = (col, item)
            value, pos = _block(lines, pos, col, anchors)
            out.append(value)
        else:
            value, pos = _value(item, lines, pos + 1, indent, anchors)
            out.append(value)
    return out, pos

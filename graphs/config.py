"""The model configuration: the one place a DeepSeek-Coder config.json is interpreted.

Sharding, graph building, the manifest, the runtime and the memory planner all read
`ModelConfig`; none of them look at raw config.json keys.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from dsflow.common.errors import DsflowError
from dsflow.common.json_io import read_json_object

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


class ConfigError(DsflowError):
    """A config.json that dsflow cannot serve; the message names the file and key."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 100000.0
    # Linear position interpolation (HF rope_scaling type "linear", MindFormers
    # extend_method "PI"): positions are divided by this factor.
    rope_scaling_factor: float = 1.0
    max_position_embeddings: int = 16384
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    torch_dtype: str = "bfloat16"
    architecture: str = "LlamaForCausalLM"
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_groups(self) -> int:
        """Query heads per KV head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Inverse of `to_dict` (used for the manifest)."""
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__ and k != "extra"}
        return cls(**known)

    def to_hf_dict(self) -> dict:
        """A HuggingFace config.json for this model (used for the embedded default)."""
        hf = {
            "architectures": [self.architecture],
            "model_type": "llama",
            "attention_bias": False,
            "hidden_act": "silu",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": False,
            "torch_dtype": self.torch_dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if self.rope_scaling_factor != 1.0:
            hf["rope_scaling"] = {"type": "linear", "factor": self.rope_scaling_factor}
        return hf


def _rope_scaling(raw: Mapping[str, Any], source: str) -> tuple[float, float]:
    """(theta, linear factor) from either the classic or the newer transformers keys.

    transformers >= 4.5x writes `rope_parameters = {"rope_type", "rope_theta", "factor"}`;
    DeepSeek-Coder's published files use `rope_theta` + `rope_scaling = {"type", "factor"}`.
    """
    theta = raw.get("rope_theta")
    scaling = raw.get("rope_scaling")
    params = raw.get("rope_parameters")
    if params:
        theta = params.get("rope_theta", theta)
        scaling = params
    if theta is None:
        theta = 10000.0
    if not scaling:
        return float(theta), 1.0
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), 1.0
    if kind != "linear":
        raise ConfigError(
            f"{source}: rope scaling type {kind!r} is not supported "
            "(DeepSeek-Coder uses 'linear'; supported: default, linear)")
    return float(theta), float(scaling.get("factor", 1.0))


def _require(raw: Mapping[str, Any], key: str, source: str) -> Any:
    if key not in raw:
        raise ConfigError(f"{source}: missing key {key!r}")
    return raw[key]


def config_from_hf_dict(raw: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """Validate a HuggingFace config.json dict and turn it into a ModelConfig."""
    archs = raw.get("architectures") or [raw.get("model_type", "?")]
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"{source}: architecture {arch!r} is not supported "
            f"(dsflow serves DeepSeek-Coder: {', '.join(SUPPORTED_ARCHITECTURES)})")
    if raw.get("attention_bias") or raw.get("mlp_bias"):
        raise ConfigError(f"{source}: attention/MLP biases are not part of DeepSeek-Coder")
    if raw.get("tie_word_embeddings"):
        raise ConfigError(f"{source}: tied embeddings are not part of DeepSeek-Coder "
                          "(tie_word_embeddings must be false)")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act {act!r} is not supported (expected 'silu')")
    theta, factor = _rope_scaling(raw, source)
    hidden = int(_require(raw, "hidden_size", source))
    heads = int(_require(raw, "num_attention_heads", source))
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    if hidden % heads:
        raise ConfigError(f"{source}: hidden_size {hidden} is not a multiple of "
                          f"num_attention_heads {heads}")
    if heads % kv_heads:
        raise ConfigError(f"{source}: num_attention_heads {heads} is not a multiple of "
                          f"num_key_value_heads {kv_heads}")
    if raw.get("head_dim") not in (None, hidden // heads):
        raise ConfigError(f"{source}: head_dim {raw['head_dim']} != hidden_size / heads")
    eos = raw.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return ModelConfig(
        vocab_size=int(_require(raw, "vocab_size", source)),
        hidden_size=hidden,
        intermediate_size=int(_require(raw, "intermediate_size", source)),
        num_layers=int(_require(raw, "num_hidden_layers", source)),
        num_heads=heads,
        num_kv_heads=kv_heads,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling_factor=factor,
        max_position_embeddings=int(raw.get("max_position_embeddings", 16384)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=eos,
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
        architecture=arch,
    )


def load_config(path: str | Path) -> ModelConfig:
    """Read config.json from a file or a model directory."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ConfigError(f"{p}: no such file (a HuggingFace model directory has config.json)")
    return config_from_hf_dict(read_json_object(p, ConfigError), str(p))

"""Reading a DeepSeek-Coder checkpoint in any format its users have: config, side files
(tokenizer) and weights, behind one name -> lazily read tensor interface.

Weights are never loaded whole: `Checkpoint.view` maps the file and sharding copies out
only the requested rows or columns (one rank's slice of one tensor at a time), then
`release`s the mapped pages. What a path may hold (first match wins, as transformers
prefers safetensors when a hub repo carries both):

| weights | files |
| --- | --- |
| safetensors | `model.safetensors.index.json` + shards, or `*.safetensors` |
| PyTorch zip | `pytorch_model.bin.index.json` + shards, or `pytorch_model.bin` |
| MindSpore   | one `*.ckpt` with MindFormers names (or the path of a .ckpt file) |

and the config: `config.json`, or where that is absent a MindFormers predict yaml
(`*.yaml` beside the weights), or an explicit `config=` path of either kind.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol

import numpy as np

from dsflow.graphs.config import ConfigError, ModelConfig, config_from_hf_dict, load_config
from dsflow.graphs.tp_plan import WeightSpec, weight_specs
from dsflow.common.dtypes import FLOAT_DTYPES
from dsflow.common.errors import CheckpointError
from dsflow.common.paths import hub_cache_root, inside
from dsflow.export.checkpoint.mindformers import FUSED_MINDFORMERS, config_from_mindformers_yaml, mindformers_to_hf
from dsflow.export.checkpoint.mindspore_ckpt import MindSporeCkptFile
from dsflow.export.checkpoint.safetensors import SafetensorsFile
from dsflow.export.checkpoint.torch_bin import TorchBinFile

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Files of a HuggingFace directory besides config and weights that travel with the
# weights through shard and merge (when present).
SIDE_FILES = TOKENIZER_FILES + ("special_tokens_map.json", "tokenizer.model",
                                "generation_config.json")
# Buffers some checkpoints carry that the model recomputes: ignored, not an error.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# MindSpore training checkpoints also hold optimizer state and step counters.
IGNORED_MINDSPORE = ("adam_m.", "adam_v.", "moment1.", "moment2.", "accu_grads.",
                     "learning_rate", "global_step", "epoch_num", "step_num", "loss_scale",
                     "scale_sense", "current_iterator_step", "last_overflow_iterator_step")
SHARDS_MARKER = "shards.json"  # a `dsexport shard` output, not a checkpoint


class TensorFile(Protocol):
    """One weights file whose tensors are read lazily.

    Implemented by SafetensorsFile, TorchBinFile and MindFormersCkpt, so sharding never
    knows the format. `array` returns the tensor in its storage dtype (bf16 as uint16
    bit patterns), ideally a view into a memory map, so a rank's slice copies only its
    own bytes; `release` drops the mapped pages from the resident set afterwards.
    `read_rows` copies rows of a tensor into a buffer with pread (no mapped pages at
    all), which is how sharding reads.
    """

    path: Path

    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> str: ...
    def array(self, name: str) -> np.ndarray: ...
    def read_rows(self, name: str, start: int, stop: int, out: np.ndarray) -> None: ...
    def release(self) -> None: ...
    def close(self) -> None: ...


class MindFormersCkpt:
    """A MindSpore .ckpt with MindFormers llama names, seen under HuggingFace names.

    Names it cannot map stay as they are, so validation reports them as unexpected;
    fused --qkv_concat layouts are refused at open (they are not a rename)."""

    def __init__(self, path: str | Path):
        self.file = MindSporeCkptFile(path)
        self.path = self.file.path
        self._raw: dict[str, str] = {}  # HF name -> name in the file
        for raw in self.file.names():
            if raw.startswith(IGNORED_MINDSPORE):
                continue
            self._raw[self._hf_name(raw)] = raw

    def _hf_name(self, raw: str) -> str:
        try:
            return mindformers_to_hf(raw)
        except CheckpointError as e:
            if any(f in raw for f in FUSED_MINDFORMERS):
                self.file.close()
                raise CheckpointError(f"{self.path}: {e}") from None
            return raw

    def names(self) -> list[str]:
        return list(self._raw)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.file.shape(self._raw[name])

    def dtype(self, name: str) -> str:
        return self.file.dtype(self._raw[name])

    def array(self, name: str) -> np.ndarray:
        return self.file.array(self._raw[name])

    def read_rows(self, name: str, start: int, stop: int, out: np.ndarray) -> None:
        self.file.read_rows(self._raw[name], start, stop, out)

    def release(self) -> None:
        self.file.release()

    def close(self) -> None:
        self.file.close()


@dataclass(frozen=True)
class WeightFormat:
    name: str
    index: Optional[str]  # the index json that maps tensor -> shard file
    single: str           # glob of the weights file(s) when there is no index
    opener: Callable[[Path], TensorFile]


FORMATS = (
    WeightFormat("safetensors", "model.safetensors.index.json", "*.safetensors",
                 SafetensorsFile),
    WeightFormat("pytorch", "pytorch_model.bin.index.json", "pytorch_model.bin",
                 TorchBinFile),
    WeightFormat("mindspore", None, "*.ckpt", MindFormersCkpt),
)
SUFFIXES = {".safetensors": FORMATS[0], ".bin": FORMATS[1], ".ckpt": FORMATS[2]}


@dataclass(frozen=True)
class ConfigSource:
    """A model config and where it came from; `hf` is the config.json dict (for a
    MindFormers yaml, the equivalent one), kept so a merge can write it back."""

    hf: dict
    config: ModelConfig
    path: Path


def _find_yaml(directory: Path) -> Path:
    found = sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")])
    predict = [p for p in found if p.name.startswith("predict")]
    if len(found) == 1 or len(predict) == 1:
        return (predict or found)[0]
    if not found:
        raise ConfigError(f"{directory}: no config.json (nor a MindFormers predict yaml)")
    raise ConfigError(f"{directory}: no config.json and several yaml files "
                      f"({', '.join(p.name for p in found)}); pass the one to use")


def read_config(path: str | Path) -> ConfigSource:
    """The config from a config.json, a MindFormers yaml, or a directory holding one."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json" if (p / "config.json").is_file() else _find_yaml(p)
    if p.suffix in (".yaml", ".yml"):
        hf = config_from_mindformers_yaml(p)
        return ConfigSource(hf, config_from_hf_dict(hf, str(p)), p)
    config = load_config(p)  # validates; errors name the file
    return ConfigSource(json.loads(p.read_text(encoding="utf-8")), config, p)


def side_files_in(directory: Path) -> list[Path]:
    """Tokenizer and generation files present in `directory`."""
    return [directory / f for f in SIDE_FILES if (directory / f).is_file()]


def _read_index(index: Path) -> dict[str, str]:
    """The index's weight_map; every file it names must stay inside the checkpoint
    directory (the index is untrusted: `../x`, `/x` or a symlink out are refused)."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{index}: not a weights index (expected a 'weight_map' "
                              "object of tensor name -> file name)") from None
    directory = index.parent
    bound = hub_cache_root(directory) or directory
    for name, fname in weight_map.items():
        inside(directory, fname, f"{index}: tensor {name!r}", CheckpointError, bound)
    return weight_map


def _discover(path: Path) -> tuple[WeightFormat, list[Path], dict[str, str], Optional[Path]]:
    """(format, weight files, index weight_map, index path) of a file or directory."""
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise CheckpointError(f"{path}: not a weights file (expected one of "
                                  f"{', '.join(SUFFIXES)})")
        return SUFFIXES[path.suffix], [path], {}, None
    for fmt in FORMATS:
        index = path / fmt.index if fmt.index else None
        if index is not None and index.is_file():
            weight_map = _read_index(index)
            return fmt, [path / f for f in sorted(set(weight_map.values()))], weight_map, index
        files = sorted(path.glob(fmt.single))
        if fmt.name == "mindspore" and len(files) > 1:
            raise CheckpointError(f"{path}: several .ckpt files "
                                  f"({', '.join(f.name for f in files)}); pass the one to use")
        if files:
            return fmt, files, {}, None
    if any(path.glob("pytorch_model-*.bin")):
        raise CheckpointError(f"{path}: pytorch_model-*.bin shards without their index "
                              "pytorch_model.bin.index.json")
    raise CheckpointError(f"{path}: no weights found (model.safetensors[.index.json], "
                          "pytorch_model.bin[.index.json] or a MindSpore *.ckpt)")


class Checkpoint:
    """Name -> lazily read tensor, across one or many weights files of one format."""

    def __init__(self, path: str | Path, config: str | Path | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such file or directory")
        self.directory = self.path if self.path.is_dir() else self.path.parent
        if (self.directory / SHARDS_MARKER).is_file():
            raise CheckpointError(f"{self.directory}: is a `dsexport shard` output, not a "
                                  "checkpoint (build from it, or `dsexport merge` it)")
        source = read_config(config if config is not None else self.directory)
        self.hf_config, self.config_path = source.hf, source.path
        self.config: ModelConfig = source.config
        self._files: list[TensorFile] = []
        self._where: dict[str, TensorFile] = {}
        try:
            self._open_weights()
        except BaseException:
            self.close()
            raise

    def _open_weights(self) -> None:
        fmt, paths, weight_map, index = _discover(self.path)
        self.format = fmt.name
        for path in paths:
            if not path.is_file():
                held = next(n for n, f in weight_map.items() if self.directory / f == path)
                raise CheckpointError(f"{path}: shard listed in {index.name} is missing "
                                      f"(it holds tensor {held!r})")
            f = fmt.opener(path)
            self._files.append(f)
            for name in f.names():
                self._where[name] = f
        for name, fname in weight_map.items():
            if name not in self._where:
                raise CheckpointError(f"{self.directory / fname}: tensor {name!r} "
                                      f"listed in {index.name} is not in the file")

    @property
    def files(self) -> list[Path]:
        """The weights files read (for fingerprints and messages)."""
        return [f.path for f in self._files]

    def names(self) -> list[str]:
        return list(self._where)

    def dtype(self, name: str) -> str:
        return self._where[name].dtype(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def view(self, name: str) -> np.ndarray:
        """The mapped tensor in its storage dtype (bf16 as uint16); nothing read yet."""
        return self._where[name].array(name)

    def read_rows(self, name: str, start: int, stop: int, out: np.ndarray) -> None:
        """Rows start..stop of `name` (storage dtype) into the C-contiguous `out`."""
        self._where[name].read_rows(name, start, stop, out)

    def release(self, name: str) -> None:
        """Done with `name`: drop the mapped pages of its file from the resident set."""
        self._where[name].release()

    def file_of(self, name: str) -> Path:
        return self._where[name].path

    def weights_dtype(self) -> str:
        """The dtype every weight of the plan shares, else the config's float dtype,
        else float32 (what a converted checkpoint keeps by default)."""
        dtypes = {self.dtype(s.name) for s in weight_specs(self.config)}
        if len(dtypes) == 1:
            return dtypes.pop()
        declared = self.config.torch_dtype
        return declared if declared in FLOAT_DTYPES else "float32"

    def validate(self, specs: list[WeightSpec] | None = None) -> None:
        """Every tensor the config implies is present, with its shape and a float
        dtype; none is extra. Checked before any output is written."""
        specs = specs if specs is not None else weight_specs(self.config)
        implies = self.config_path.name + " implies"
        for s in specs:
            if s.name not in self._where:
                raise CheckpointError(f"{self.path}: tensor {s.name!r} is missing "
                                      f"({implies} it)")
            got = self.shape(s.name)
            if got != s.shape:
                raise CheckpointError(f"{self.file_of(s.name)}: tensor {s.name!r} has shape "
                                      f"{list(got)}, {implies} {list(s.shape)}")
            if self.dtype(s.name) not in FLOAT_DTYPES:
                raise CheckpointError(f"{self.file_of(s.name)}: tensor {s.name!r} has dtype "
                                      f"{self.dtype(s.name)}, expected one of "
                                      f"{', '.join(FLOAT_DTYPES)}")
        self._check_no_extra({s.name for s in specs})

    def _check_no_extra(self, expected: set[str]) -> None:
        extra = [n for n in self._where if n not in expected
                 and not n.endswith(IGNORED_SUFFIXES)]
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise CheckpointError(f"{self.file_of(extra[0])}: unexpected tensor {extra[0]!r}"
                                  f"{more}: not part of a {self.config.architecture} with "
                                  f"{self.config.num_layers} layers")

    def tokenizer_files(self) -> list[Path]:
        missing = [f for f in TOKENIZER_FILES if not (self.directory / f).is_file()]
        if missing:
            raise CheckpointError(f"{self.directory}: missing {', '.join(missing)} "
                                  "(dsrun needs the tokenizer)")
        return [self.directory / f for f in TOKENIZER_FILES]

    def side_files(self) -> list[Path]:
        return side_files_in(self.directory)

    def close(self) -> None:
        for f in self._files:
            f.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

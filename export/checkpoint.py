"""Reading a HuggingFace DeepSeek-Coder directory: config, tokenizer files and weights.

Weights are never loaded whole: `Checkpoint.read` maps the file and copies out only
the requested rows or columns (one rank's slice of one tensor at a time).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ..graphs.config import ModelConfig, load_config
from ..graphs.tp_plan import WeightSpec, weight_specs
from .errors import CheckpointError
from .safetensors_io import SafetensorsFile

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Buffers some checkpoints carry that the model recomputes: ignored, not an error.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class TensorFile(Protocol):
    """One weights file whose tensors are read lazily.

    Implemented by SafetensorsFile; every other format (PyTorch zip .bin, MindSpore
    .ckpt) implements the same five methods, so sharding never knows the format.
    `array` returns the tensor in its storage dtype (bf16 as uint16 bit patterns),
    ideally a view into a memory map, so a rank's slice copies only its own bytes.
    """

    path: Path

    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> str: ...
    def array(self, name: str) -> np.ndarray: ...
    def close(self) -> None: ...


@dataclass
class TensorLocation:
    file: TensorFile
    name: str


class Checkpoint:
    """Name -> lazily read tensor, across one or many safetensors shards."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: not a directory")
        self.config: ModelConfig = load_config(self.directory)
        self._files: list[TensorFile] = []
        self._where: dict[str, TensorLocation] = {}
        self._open_weights()

    def _open_weights(self) -> None:
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index}: not a safetensors index "
                                      "(expected a 'weight_map' object)") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.directory}: no *.safetensors weights found")
        for fname in files:
            path = self.directory / fname
            if not path.is_file():
                raise CheckpointError(f"{path}: shard listed in the index is missing")
            st = SafetensorsFile(path)
            self._files.append(st)
            for name in st.names():
                self._where[name] = TensorLocation(st, name)
        if index.is_file():
            for name, fname in weight_map.items():
                if name not in self._where:
                    raise CheckpointError(f"{self.directory / fname}: tensor {name!r} "
                                          "listed in the index is not in the file")

    def names(self) -> list[str]:
        return list(self._where)

    def dtype(self, name: str) -> str:
        loc = self._where[name]
        return loc.file.dtype(loc.name)

    def shape(self, name: str) -> tuple[int, ...]:
        loc = self._where[name]
        return loc.file.shape(loc.name)

    def view(self, name: str) -> np.ndarray:
        """The mapped tensor in its storage dtype (bf16 as uint16); nothing read yet."""
        loc = self._where[name]
        return loc.file.array(loc.name)

    def file_of(self, name: str) -> Path:
        return self._where[name].file.path

    def validate(self, specs: list[WeightSpec] | None = None) -> None:
        """Every tensor the config implies is present, with its shape; none is extra."""
        specs = specs if specs is not None else weight_specs(self.config)
        expected = {s.name: s for s in specs}
        for s in specs:
            if s.name not in self._where:
                raise CheckpointError(f"{self.directory}: tensor {s.name!r} is missing "
                                      "(config.json implies it)")
            got = self.shape(s.name)
            if got != s.shape:
                raise CheckpointError(f"{self.file_of(s.name)}: tensor {s.name!r} has shape "
                                      f"{list(got)}, config.json implies {list(s.shape)}")
            if self.dtype(s.name) not in ("float32", "float16", "bfloat16"):
                raise CheckpointError(f"{self.file_of(s.name)}: tensor {s.name!r} has dtype "
                                      f"{self.dtype(s.name)}, expected a float type")
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

    def close(self) -> None:
        for f in self._files:
            f.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""The checkpoint's generation_config.json (carried into the artifacts by the build):
its EOS ids and its sampling defaults, applied as transformers applies them.

transformers' `generate` stops at every id of `eos_token_id` (an int or a list; a list
stays a list) and, when the caller passes no settings, samples only if `do_sample`
is true, with the file's temperature / top_k (transformers' default 50) / top_p, and
at most `max_new_tokens`. Those defaults become the engine's `default_params`, used
when a request brings no SamplingParams of its own.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from dsflow.common.errors import DsflowError
from dsflow.common.json_io import read_json_object
from dsflow.runtime.sampling import SamplingParams

TRANSFORMERS_TOP_K = 50  # GenerationConfig's default top_k


class GenerationConfigError(DsflowError):
    pass


class GenerationConfig:
    def __init__(self, data: Optional[dict] = None, source: str = "generation_config.json"):
        self.data = data or {}
        self.source = source

    @classmethod
    def read(cls, path: Optional[Path]) -> "GenerationConfig":
        if path is None:
            return cls()
        return cls(read_json_object(path, GenerationConfigError), str(path))

    def eos_ids(self, model_eos: Optional[int]) -> list[int]:
        """Every EOS id: the file's (int or list), else the model config's."""
        eos = self.data.get("eos_token_id", model_eos)
        if eos is None:
            return []
        ids = eos if isinstance(eos, list) else [eos]
        if not all(isinstance(i, int) for i in ids):
            raise GenerationConfigError(f"{self.source}: eos_token_id {eos!r} is not an int "
                                        "or a list of ints")
        return ids

    def default_params(self) -> SamplingParams:
        d = self.data
        kw = {}
        if d.get("max_new_tokens") is not None:
            kw["max_new_tokens"] = int(d["max_new_tokens"])
        if d.get("do_sample"):
            kw.update(temperature=float(d.get("temperature", 1.0)),
                      top_k=int(d.get("top_k", TRANSFORMERS_TOP_K) or 0),
                      top_p=float(d.get("top_p", 1.0)))
        return SamplingParams(**kw)

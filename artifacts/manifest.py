"""The artifacts manifest: what was built, from what, with which signatures and checksums.

Written last by `dsexport build` (so a directory without one is not a finished
build) and read by the runtime, which trusts nothing it does not describe.

Layout of an artifacts directory:
    manifest.json
    tokenizer/tokenizer.json, tokenizer/tokenizer_config.json
    rank<R>/prefill.mindir, rank<R>/decode.mindir   (or *_graph.mindir + *_variables/)
    generation_config.json                          (if the checkpoint had one)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from dsflow.graphs.config import ModelConfig
from dsflow.common.checksums import files_with_checksums, sha256_file
from dsflow.common.errors import DsflowError
from dsflow.common.paths import inside
from dsflow.graphs.tp_plan import rank_sizes
from dsflow.graphs.signatures import (CACHE_LAYOUT, CACHE_MODES, RESIDENT, WINDOW,
                                      GraphSignature, graph_signature)
from dsflow.artifacts.document import ModelDocument, read_json_document

MANIFEST_NAME = "manifest.json"
FORMAT = "dsflow-artifacts"
# 2: slot KV cache (graphs take a cache window and return the new K/V; prefill takes
# chunks at a start position). Version 1 graphs cannot serve it.
FORMAT_VERSION = 2
OLDEST_VERSION = 2
GENERATION_CONFIG = "generation_config.json"


class ManifestError(DsflowError):
    """An artifacts directory that is missing, unfinished, altered or from a newer dsflow."""


class Manifest(ModelDocument):
    """A finished artifacts directory, as its manifest.json describes it."""

    @property
    def target(self) -> str:
        return self.data["target"]

    @property
    def cache_dtype(self) -> str:
        """KV-cache dtype at the graph boundary (may differ from the weights' dtype)."""
        return self.data["kv_cache"]["dtype"]

    @property
    def cache_mode(self) -> str:
        """"window" or "resident" (graphs/signatures.py). Version-2 manifests written
        before the resident mode existed have no entry: their graphs are window graphs."""
        return self.data["kv_cache"].get("cache_mode", WINDOW)

    @property
    def resident_shape(self) -> Optional[tuple[int, int]]:
        """(slots, capacity) a resident cache was built for (GE fixes them), or None
        when any shape is accepted (window mode, or a resident CPU build)."""
        kv = self.data["kv_cache"]
        if self.cache_mode != RESIDENT or kv.get("slots") is None:
            return None
        return int(kv["slots"]), int(kv["capacity"])

    def signature(self, kind: str) -> GraphSignature:
        return graph_signature(kind, self.config, self.tp, self.cache_dtype, self.cache_mode)

    def check_signatures(self) -> None:
        """Every graph's recorded inputs are this dsflow's signature for it: artifacts
        built by a dsflow whose graphs took other inputs (or another order: the decode
        inputs were reordered to name order) would be fed the wrong tensors."""
        for g in self.data["graphs"]:
            if "inputs" in g and g["inputs"] != self.signature(g["kind"]).to_dict()["inputs"]:
                raise ManifestError(f"{self.path(g['file'], 'graphs')}: its inputs differ from this "
                                    f"dsflow's {g['kind']} signature (built by another "
                                    "version); rebuild the artifacts with `dsexport build`")

    @property
    def kv_bytes_per_token(self) -> int:
        """Keys and values of one token in one rank's slot cache."""
        return kv_bytes_per_token(self.config, self.tp, self.cache_dtype)

    @property
    def max_seq_len(self) -> int:
        return int(self.data["kv_cache"]["max_seq_len"])

    @property
    def buckets(self) -> Optional[list[int]]:
        """Prompt/cache length buckets the graphs were built for (None: any length)."""
        return self.data.get("buckets")

    @property
    def lite(self) -> dict:
        """The Lite section of an Ascend build (buckets, batch sizes, rank table, script);
        empty for a CPU build."""
        return self.data.get("lite") or {}

    def graph(self, rank: int, kind: str) -> dict:
        for g in self.data["graphs"]:
            if g["rank"] == rank and g["kind"] == kind:
                return g
        raise ManifestError(f"{self.root / MANIFEST_NAME}: no {kind} graph for rank {rank}")

    def path(self, name: object, entry: str) -> Path:
        """`root / name` for a file name the manifest records (its `entry`), refused
        unless it stays inside the artifacts directory (common/paths.py)."""
        return inside(self.root, name, f"{self.root / MANIFEST_NAME}: {entry}",
                      ManifestError)

    def graph_path(self, rank: int, kind: str) -> Path:
        return self.path(self.graph(rank, kind)["file"], f"rank {rank} {kind} graph")

    def tokenizer_dir(self) -> Path:
        return self.path("tokenizer", "tokenizer directory")

    @property
    def model_name(self) -> str:
        """The name a server reports by default: the artifacts directory's name."""
        return self.root.resolve().name

    def generation_config_path(self) -> Optional[Path]:
        """The checkpoint's generation_config.json, if it had one."""
        path = self.path(GENERATION_CONFIG, "generation config")
        return path if path.is_file() else None

    def verify(self) -> None:
        """Every listed file is present, with its size and sha256 (reads all the bytes:
        `dsrun --verify` only, as a user may edit rank_table.json on purpose)."""
        files = self.data["files"]
        for rel in files:
            p = self.path(rel, "files")
            if not p.is_file():
                raise ManifestError(f"{p}: listed in the manifest but missing")
            if p.stat().st_size != files[rel]["bytes"]:
                raise ManifestError(f"{p}: size differs from the manifest (altered or truncated)")
            if sha256_file(p) != files[rel]["sha256"]:
                raise ManifestError(f"{p}: sha256 differs from the manifest (altered)")


def kv_bytes_per_token(cfg: ModelConfig, tp: int, dtype: str) -> int:
    """Keys and values of one token in one rank's cache."""
    sizes = rank_sizes(cfg, tp)
    return 2 * sizes.layers * sizes.kv_features * (4 if dtype == "float32" else 2)


def kv_cache_section(cfg: ModelConfig, tp: int, dtype: str, max_seq_len: int,
                     cache_mode: str = WINDOW) -> dict:
    """`dtype` is the cache's own dtype (graphs.kernels.cache_dtype); `cache_mode` how the
    graphs see it (graphs/signatures.py). A resident cache built for GE also records its
    fixed `slots` and `capacity` (added by the Lite stage)."""
    sizes = rank_sizes(cfg, tp)
    return {"layout": list(CACHE_LAYOUT), "dtype": dtype, "max_seq_len": max_seq_len,
            "cache_mode": cache_mode,
            "layers": sizes.layers, "kv_heads_per_rank": sizes.kv_heads,
            "head_dim": sizes.head_dim,
            "bytes_per_token_per_rank": kv_bytes_per_token(cfg, tp, dtype)}


def write_manifest(root: Path, data: dict) -> None:
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, **data,
            "files": files_with_checksums(root, skip=(MANIFEST_NAME,))}
    tmp = root / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(root / MANIFEST_NAME)


def read_manifest(root: str | Path) -> Manifest:
    root = Path(root)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise ManifestError(f"{root}: no such artifacts directory (run `dsexport build` first, "
                            "or pass --artifacts DIR)")
    data = read_json_document(path, FORMAT, FORMAT_VERSION, ManifestError,
                              f"{root} is not a finished dsflow build", OLDEST_VERSION,
                              "rebuild the artifacts with this dsflow's `dsexport build`")
    _check_keys(path, data)
    manifest = Manifest(root, data)
    try:
        manifest.config
    except (DsflowError, KeyError, TypeError, ValueError) as e:
        raise ManifestError(f"{path}: its model section is not a valid config ({e}); "
                            "rebuild the artifacts") from None
    return manifest


# key -> type every manifest has; a missing or mistyped one is named, not a KeyError later
REQUIRED = {"target": str, "tp": int, "dtype": str, "model": dict, "kv_cache": dict,
            "graphs": list, "files": dict}
REQUIRED_KV = {"dtype": str, "max_seq_len": int}
REQUIRED_GRAPH = {"rank": int, "kind": str, "file": str}


def _check_keys(path: Path, data: dict) -> None:
    def need(obj: dict, keys: dict, where: str) -> None:
        for key, kind in keys.items():
            if not isinstance(obj.get(key), kind):
                state = "missing" if key not in obj else f"not a {kind.__name__}"
                raise ManifestError(f"{path}: {where}{key} is {state}; the manifest is "
                                    "damaged or hand-edited: rebuild the artifacts")
    need(data, REQUIRED, "")
    need(data["kv_cache"], REQUIRED_KV, "kv_cache.")
    mode = data["kv_cache"].get("cache_mode", WINDOW)
    if mode not in CACHE_MODES:
        raise ManifestError(f"{path}: kv_cache.cache_mode {mode!r} is not one of "
                            f"{', '.join(CACHE_MODES)} (written by a newer dsflow?); rebuild "
                            "the artifacts with this dsflow's `dsexport build`")
    for i, g in enumerate(data["graphs"]):
        if not isinstance(g, dict):
            raise ManifestError(f"{path}: graphs[{i}] is not an object; rebuild the artifacts")
        need(g, REQUIRED_GRAPH, f"graphs[{i}].")
    _check_paths(path, data)


# graph entry keys that hold a path relative to the artifacts directory (Lite builds
# add the last three: artifacts/lite.py)
GRAPH_PATH_KEYS = ("file", "lite_file", "lite_stem", "config")


def _check_paths(path: Path, data: dict) -> None:
    """Every path the manifest records stays inside the artifacts directory, checked
    at read time so no runtime code ever opens one that leaves it."""
    root = path.parent
    for i, g in enumerate(data["graphs"]):
        for key in GRAPH_PATH_KEYS:
            if key in g:
                inside(root, g[key], f"{path}: graphs[{i}].{key}", ManifestError)
    for rel in data["files"]:
        inside(root, rel, f"{path}: files", ManifestError)
    lite = data.get("lite") or {}
    for key in ("rank_table", "script"):
        if lite.get(key) is not None:
            inside(root, lite[key], f"{path}: lite.{key}", ManifestError)

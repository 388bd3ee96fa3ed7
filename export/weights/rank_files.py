"""Per-rank weight shards: the on-disk format `dsexport shard` writes and `dsexport build`
and `dsexport merge` read (documented in docs/WEIGHTS.md).

    OUT/rank<R>.safetensors  rank R's tensors: every weight of the tensor-parallel plan
                             (graphs/tp_plan.py) in plan order, in its per-rank shape,
                             all in one dtype (bf16 as BF16); lm_head rows zero-padded
                             when tp does not divide the vocabulary
    OUT/rank<R>.json         written once rank R's file is complete: its sha256, bytes
                             and the key of the run that wrote it
    OUT/tokenizer/...        the checkpoint's tokenizer/generation files, if present
    OUT/shards.json          written last; a directory without it is not finished

Why a directory of per-rank files: a rank (a card, a worker) reads exactly its own
bytes, in the shapes its graph declares, and sharding becomes a step that runs once
(on a machine with far less RAM than the model: a few 8 MB chunks in memory, see
export/weights/split.py) and that build reuses. Every file appears under its final name only
when complete (`atomic.AtomicFile`), and a re-run skips ranks whose sidecar key and
sha256 match.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from dsflow.graphs.config import ModelConfig
from dsflow.common.errors import DsflowError
from dsflow.graphs.tp_plan import check_tp, weight_specs
from dsflow.common.atomic import AtomicFile, remove_stale_temps, write_text_atomic
from dsflow.export.checkpoint.reader import SHARDS_MARKER, TOKENIZER_FILES, Checkpoint
from dsflow.common.dtypes import convert
from dsflow.common.paths import inside
from dsflow.common.errors import CheckpointError, ExportError
from dsflow.artifacts.document import ModelDocument, read_json_document
from dsflow.common.checksums import sha256_file
from dsflow.export.checkpoint.mapped_file import nbytes
from dsflow.export.checkpoint.safetensors import Layout, SafetensorsFile, SafetensorsWriter
from dsflow.export.weights.split import rank_chunks

FORMAT = "dsflow-rank-shards"
FORMAT_VERSION = 1
INDEX = SHARDS_MARKER
TOKENIZER_DIR = "tokenizer"
_OURS = re.compile(r"^(rank\d+\.(safetensors|json)|shards\.json|tokenizer)$|\.tmp-\d+$")

# progress(event, rank, done, total): "tensor" after each tensor of a rank is written,
# "skip" once for a rank whose complete file from an earlier run is reused.
ShardProgress = Callable[[str, int, int, int], None]


class ShardsError(DsflowError):
    """A shards directory that is missing, unfinished, altered or from a newer dsflow."""


def _no_progress(*_args) -> None:
    pass


def rank_file(rank: int) -> str:
    return f"rank{rank}.safetensors"


def rank_layout(cfg: ModelConfig, tp: int, dtype: str) -> Layout:
    """(name, per-rank shape, dtype) of every tensor a rank file holds, in order."""
    return [(s.name, s.rank_shape(tp), dtype) for s in weight_specs(cfg)]


def rank_weight_bytes(cfg: ModelConfig, tp: int, dtype: str) -> int:
    """Bytes of one rank's weights (replicated embedding and vocab padding included)."""
    return sum(nbytes(shape, d) for _, shape, d in rank_layout(cfg, tp, dtype))


class ShardsIndex(ModelDocument):
    """A finished shards directory, as its shards.json describes it."""

    @property
    def hf_config(self) -> dict:
        return self.data["hf_config"]

    def rank_path(self, rank: int) -> Path:
        return inside(self.root, self.data["ranks"][rank]["file"],
                      f"{self.root / INDEX}: ranks[{rank}].file", ShardsError)

    def side_files(self) -> list[Path]:
        return [inside(self.root, rel, f"{self.root / INDEX}: side_files", ShardsError)
                for rel in self.data["side_files"]]

    def tokenizer_files(self) -> list[Path]:
        files = [self.root / TOKENIZER_DIR / f for f in TOKENIZER_FILES]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ShardsError(f"{self.root}: missing {TOKENIZER_DIR}/{', '.join(missing)} "
                              "(the checkpoint had no tokenizer; dsrun needs one)")
        return files


def is_shards_dir(path: str | Path) -> bool:
    return (Path(path) / INDEX).is_file()


def read_index(root: str | Path) -> ShardsIndex:
    """shards.json of a finished `dsexport shard` output (sizes and hashes unchecked)."""
    root = Path(root)
    index = ShardsIndex(root, read_json_document(
        root / INDEX, FORMAT, FORMAT_VERSION, ShardsError,
        f"{root} is not a finished `dsexport shard` output"))
    try:  # every path it names stays inside root (checked before any is opened)
        for rank in range(len(index.data["ranks"])):
            index.rank_path(rank)
        index.side_files()
    except (KeyError, TypeError):
        raise ShardsError(f"{root / INDEX}: 'ranks' or 'side_files' is malformed; "
                          "re-run `dsexport shard`") from None
    return index


def _matches(path: Path, entry: dict) -> bool:
    return (path.is_file() and path.stat().st_size == entry["bytes"]
            and sha256_file(path) == entry["sha256"])


def verify(root: str | Path) -> ShardsIndex:
    """Check every file shards.json lists against its size and sha256."""
    index = read_index(root)
    listed = {r["file"]: r for r in index.data["ranks"]}
    listed.update(index.data["side_files"])
    for rel, entry in listed.items():
        if not _matches(inside(index.root, rel, f"{index.root / INDEX}", ShardsError), entry):
            raise ShardsError(f"{index.root / rel}: missing, or its size or sha256 differs "
                              f"from {INDEX} (altered or truncated)")
    return index


def open_rank(index: ShardsIndex, rank: int) -> SafetensorsFile:
    """A rank file, checked against the plan: names in order, per-rank shapes, dtype."""
    if not 0 <= rank < index.tp:
        raise ShardsError(f"{index.root}: no rank {rank} (tp is {index.tp})")
    path = index.rank_path(rank)
    if not path.is_file() or path.stat().st_size != index.data["ranks"][rank]["bytes"]:
        raise ShardsError(f"{path}: missing, or its size differs from {INDEX}")
    f = SafetensorsFile(path)
    try:
        got = [(n, f.shape(n), f.dtype(n)) for n in f.names()]
        want = [(n, tuple(s), d) for n, s, d in rank_layout(index.config, index.tp,
                                                            index.dtype)]
        if got != want:
            i = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w),
                     min(len(got), len(want)))
            have = got[i] if i < len(got) else "nothing"
            raise ShardsError(f"{path}: holds {have!r} where the plan in {INDEX} expects "
                              f"{want[i] if i < len(want) else 'nothing'!r}")
    except BaseException:
        f.close()
        raise
    return f


def read_rank(root: str | Path | ShardsIndex, rank: int,
              dtype: Optional[str] = None) -> Iterator[tuple[str, np.ndarray]]:
    """(name, rank tensor) in plan order, in the shards' dtype or converted to `dtype`.

    Arrays in the stored dtype are read-only views into the mapped file (valid after
    the iterator moves on: their pages are dropped from the resident set, not unmapped)."""
    index = root if isinstance(root, ShardsIndex) else read_index(root)
    f = open_rank(index, rank)
    try:
        for name in f.names():
            arr = f.array(name)
            yield name, arr if dtype in (None, index.dtype) else convert(arr, index.dtype,
                                                                         dtype)
            f.release()
    finally:
        f.close()


# --- writing ----------------------------------------------------------------------

def _prepare_out(out: Path) -> Path:
    """The output directory, created; refuses a file or a foreign non-empty directory."""
    out = out.resolve()
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: exists and is not a directory")
    if out.is_dir():
        foreign = [p.name for p in out.iterdir() if not _OURS.search(p.name)]
        if foreign:
            raise ExportError(f"--out {out}: exists and holds {foreign[0]!r}, which is not "
                              "part of a shards directory; refusing to write there")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"--out {out}: cannot create ({e.strerror})") from None
    remove_stale_temps(out)
    return out


def _fingerprint(ckpt: Checkpoint) -> list:
    """What identifies the source without reading it: files, sizes, mtimes."""
    paths = [*ckpt.files, ckpt.config_path]
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]


def run_key(ckpt: Checkpoint, tp: int, dtype: str) -> str:
    """Changes whenever the bytes a rank file would hold could change."""
    desc = {"format_version": FORMAT_VERSION, "tp": tp, "dtype": dtype,
            "model": ckpt.config.to_dict(), "source": _fingerprint(ckpt),
            "layout": [[n, list(s), d] for n, s, d in rank_layout(ckpt.config, tp, dtype)]}
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


def _reusable(out: Path, rank: int, key: str) -> Optional[dict]:
    """The sidecar of a complete rank file from an earlier run with the same key."""
    try:
        entry = json.loads((out / f"rank{rank}.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if entry.get("key") == key and _matches(out / rank_file(rank), entry):
        return entry
    return None


def _write_rank(ckpt: Checkpoint, out: Path, tp: int, rank: int, dtype: str, key: str,
                progress: ShardProgress) -> dict:
    layout = rank_layout(ckpt.config, tp, dtype)
    total = len(layout)
    entry = _reusable(out, rank, key)
    if entry is not None:
        progress("skip", rank, total, total)
        return entry
    (out / f"rank{rank}.json").unlink(missing_ok=True)
    meta = {"format": FORMAT, "rank": str(rank), "tp": str(tp)}
    with SafetensorsWriter(out / rank_file(rank), layout, meta, checksum=True) as w:
        for i, (name, chunks) in enumerate(rank_chunks(ckpt, tp, rank, dtype), 1):
            w.write_chunks(name, chunks)
            progress("tensor", rank, i, total)
        w.commit()
    entry = {"rank": rank, "file": rank_file(rank), "sha256": w.file.sha256,
             "bytes": w.file.bytes, "data_bytes": sum(nbytes(s, d) for _, s, d in layout),
             "key": key}
    write_text_atomic(out / f"rank{rank}.json", json.dumps(entry, indent=2) + "\n")
    return entry


def _remove_other_ranks(out: Path, tp: int) -> None:
    """Rank files of an earlier run with a larger tp would only confuse readers."""
    for p in out.glob("rank*.*"):
        m = re.match(r"^rank(\d+)\.(safetensors|json)$", p.name)
        if m and int(m.group(1)) >= tp:
            p.unlink()


def _copy_side_files(ckpt: Checkpoint, out: Path) -> dict:
    target = out / TOKENIZER_DIR
    shutil.rmtree(target, ignore_errors=True)
    listed = {}
    for src in ckpt.side_files():
        target.mkdir(exist_ok=True)
        with AtomicFile(target / src.name, checksum=True) as f:
            f.write(src.read_bytes())
        listed[f"{TOKENIZER_DIR}/{src.name}"] = {"sha256": f.sha256, "bytes": f.bytes}
    return listed


def _index_data(ckpt: Checkpoint, tp: int, dtype: str, key: str, ranks: list[dict],
                side: dict) -> dict:
    specs = weight_specs(ckpt.config)
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "tp": tp, "dtype": dtype,
        "model": ckpt.config.to_dict(), "hf_config": ckpt.hf_config,
        "source": {"path": str(ckpt.path.resolve()), "format": ckpt.format,
                   "config": str(ckpt.config_path.resolve()),
                   "dtype": ckpt.weights_dtype()},
        "tp_plan": [{"name": s.name, "shape": list(s.shape), "split": s.split.value,
                     "axis": s.axis, "rank_shape": list(s.rank_shape(tp))} for s in specs],
        "ranks": [{k: r[k] for k in ("rank", "file", "sha256", "bytes", "data_bytes")}
                  for r in ranks],
        "side_files": side, "key": key,
    }


@contextmanager
def _checkpoint(source: str | Path | Checkpoint, config: str | Path | None):
    """`source` as an open Checkpoint (closed afterwards only if opened here)."""
    if isinstance(source, Checkpoint):
        yield source
        return
    with Checkpoint(source, config) as ckpt:
        yield ckpt


def write_shards(source: str | Path | Checkpoint, out: str | Path, tp: int,
                 dtype: Optional[str] = None, progress: ShardProgress = _no_progress,
                 config: str | Path | None = None) -> ShardsIndex:
    """Split a checkpoint into per-rank files under `out`; returns the finished index.

    The checkpoint is validated (names, shapes, dtypes, file integrity) before anything
    is written; NaN/Inf are caught per slice while writing (`shard.check_finite`).
    `dtype` None keeps the checkpoint's own dtype (bf16 stays bf16)."""
    out = Path(out)
    with _checkpoint(source, config) as ckpt:
        check_tp(ckpt.config, tp)
        ckpt.validate()
        dtype = dtype or ckpt.weights_dtype()
        out = _prepare_out(out)
        key = run_key(ckpt, tp, dtype)
        (out / INDEX).unlink(missing_ok=True)  # from here on it does not look finished
        _remove_other_ranks(out, tp)
        ranks = [_write_rank(ckpt, out, tp, r, dtype, key, progress) for r in range(tp)]
        side = _copy_side_files(ckpt, out)
        data = _index_data(ckpt, tp, dtype, key, ranks, side)
    write_text_atomic(out / INDEX, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return ShardsIndex(out, data)


def check_shards(index: ShardsIndex, tp: int) -> None:
    """Shards used for a build must be for the build's tp."""
    if index.tp != tp:
        raise CheckpointError(f"{index.root / INDEX}: shards are for tp={index.tp}, "
                              f"not --tp {tp}; pass --tp {index.tp} or re-shard")

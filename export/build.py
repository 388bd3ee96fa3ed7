"""`dsexport build`: checkpoint -> per-rank prefill/decode MindIR + manifest, atomically.

Everything is written into a temporary sibling of the output directory and renamed
into place only when complete, so an interrupted or failed build never leaves a
directory that looks finished; a previous build at the same place stays intact
until the new one is ready.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator, Optional

from ..graphs.signatures import GRAPH_KINDS, graph_signature
from ..graphs.tp_plan import check_tp, weight_specs
from .checkpoint import Checkpoint
from .errors import ExportError
from .manifest import MANIFEST_NAME, kv_cache_section, write_manifest

TARGET_DTYPES = {"cpu": "float32"}


def dsflow_version() -> str:
    try:
        return metadata.version("dsflow")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass
class BuildOptions:
    model_dir: Path
    out: Path
    tp: int = 1
    target: str = "cpu"
    dtype: Optional[str] = None
    max_seq_len: Optional[int] = None


# progress(event, rank, kind, done, total): "tensor" per weight loaded, "graph" per export
Progress = Callable[[str, int, str, int, int], None]


def _no_progress(*_args) -> None:
    pass


@contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A temporary directory beside `out`, moved to `out` on success, removed on failure."""
    out = out.resolve()
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).exists():
        raise ExportError(f"--out {out}: exists, is not empty and is not a dsflow build; "
                          "refusing to overwrite it (choose another --out)")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as e:
        raise ExportError(f"--out {out}: cannot write in {parent} ({e.strerror})") from None
    try:
        yield tmp
        old = None
        if out.exists():
            old = parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _export_rank(ckpt: Checkpoint, opts: BuildOptions, dtype: str, rank: int, root: Path,
                 progress: Progress) -> list[dict]:
    from ..graphs.model import RankModel
    from .mindir import export_graph
    from .shard import rank_tensors

    cfg = ckpt.config
    net = RankModel(cfg, opts.tp, dtype)
    total = len(weight_specs(cfg))

    def counted():
        for i, item in enumerate(rank_tensors(ckpt, opts.tp, rank, dtype), 1):
            yield item
            progress("tensor", rank, "weights", i, total)

    net.load(counted())
    rank_dir = root / f"rank{rank}"
    rank_dir.mkdir()
    graphs = []
    for i, kind in enumerate(GRAPH_KINDS, 1):
        sig = graph_signature(kind, cfg, opts.tp, dtype)
        path = export_graph(net, sig, rank_dir / kind)
        graphs.append({"rank": rank, "kind": kind, "file": path.relative_to(root).as_posix(),
                       **sig.to_dict()})
        progress("graph", rank, kind, i, len(GRAPH_KINDS))
    return graphs


def build(opts: BuildOptions, progress: Progress = _no_progress) -> Path:
    """Run the whole export; returns the finished artifacts directory."""
    if opts.target not in TARGET_DTYPES:
        raise ExportError(f"--target {opts.target}: unknown (choose from "
                          f"{', '.join(TARGET_DTYPES)})")
    dtype = opts.dtype or TARGET_DTYPES[opts.target]
    with Checkpoint(opts.model_dir) as ckpt:
        cfg = ckpt.config
        check_tp(cfg, opts.tp)
        max_seq = opts.max_seq_len or cfg.max_position_embeddings
        if max_seq < 2:
            raise ExportError(f"--max-seq-len {max_seq}: must be at least 2")
        ckpt.validate()
        tok_files = ckpt.tokenizer_files()
        import mindspore as ms  # heavy: only once the inputs are known to be good
        ms.set_context(mode=ms.GRAPH_MODE)
        ms.set_device("CPU")
        with staging_dir(opts.out) as root:
            (root / "tokenizer").mkdir()
            for f in tok_files:
                shutil.copyfile(f, root / "tokenizer" / f.name)
            graphs = []
            for rank in range(opts.tp):
                graphs += _export_rank(ckpt, opts, dtype, rank, root, progress)
            write_manifest(root, {
                "dsflow_version": dsflow_version(),
                "mindspore_version": ms.__version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "source": str(Path(opts.model_dir).resolve()),
                "target": opts.target,
                "dtype": dtype,
                "tp": opts.tp,
                "model": cfg.to_dict(),
                "tp_plan": [{"name": s.name, "shape": list(s.shape), "split": s.split.value,
                             "axis": s.axis} for s in weight_specs(cfg)],
                "kv_cache": kv_cache_section(cfg, opts.tp, dtype, max_seq),
                "graphs": graphs,
            })
    return opts.out.resolve()

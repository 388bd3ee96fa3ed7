"""`dsexport build`: checkpoint -> per-rank prefill/decode MindIR + manifest, atomically.

Everything is written into a temporary sibling of the output directory and renamed
into place only when complete, so an interrupted or failed build never leaves a
directory that looks finished; a previous build at the same place stays intact
until the new one is ready.

Weights reach each rank's graph through per-rank shards (export/weights/rank_files.py): the
model may already be a `dsexport shard` output (used as is), or any checkpoint
export/checkpoint/reader.py reads, which is sharded first, into `BuildOptions.shards_dir`
(kept, and reused by the next build) or else into a scratch directory inside the
staging directory that is deleted before the manifest is written.
"""
from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator, Optional

from dsflow.graphs.config import ModelConfig
from dsflow.graphs.kernels import (TARGET_CACHE_MODES, TARGET_DTYPES, cache_dtype,
                                   check_target)
from dsflow.graphs.onnx_model import DEFAULT_BLOCK_SIZE, ONNX_TARGET, QuantPolicy
from dsflow.graphs.signatures import CACHE_MODES, GRAPH_KINDS, INPLACE, graph_signature
from dsflow.graphs.tp_plan import check_tp, weight_specs
from dsflow.export.checkpoint.reader import Checkpoint
from dsflow.common.dtypes import convert
from dsflow.common.errors import ExportError, OptionError
from dsflow.artifacts.manifest import (GENERATION_CONFIG, MANIFEST_NAME, kv_cache_section,
                                       write_manifest)
from dsflow.common.atomic import make_staging_dir
from dsflow.artifacts.lite import (CPU_RELEASE, ascend_cache_mode, release_numbers,
                                   resident_refusal, takes_device_tensors)
from dsflow.export.weights.rank_files import (ShardsIndex, check_shards, is_shards_dir, read_index, read_rank,
                          write_shards)

# Prompt/cache length gears for Ascend (GE compiles one per bucket, lazily); CPU graphs
# take any length unless buckets are asked for.
DEFAULT_ASCEND_BUCKETS = (512, 1024, 2048, 4096, 8192, 16384)
SCRATCH_SHARDS = ".shards"  # inside the staging directory; removed before the manifest


def dsflow_version() -> str:
    try:
        return metadata.version("dsflow")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass
class BuildOptions:
    # a checkpoint (HF safetensors or .bin directory, MindSpore .ckpt file or
    # directory) or a `dsexport shard` output directory
    model_dir: Path
    out: Path
    tp: int = 1
    target: str = "cpu"
    dtype: Optional[str] = None
    max_seq_len: Optional[int] = None
    # where to write (or reuse) the rank shards of a checkpoint; None: a scratch dir
    shards_dir: Optional[Path] = None
    # config.json or MindFormers yaml, when the checkpoint has neither beside it
    config: Optional[Path] = None
    # prompt/cache length buckets (default: DEFAULT_ASCEND_BUCKETS on Ascend, none on CPU)
    buckets: Optional[list[int]] = None
    # Ascend: batch-size gears and the card of each rank (for the rank table)
    batch_sizes: tuple[int, ...] = (1,)
    device_ids: Optional[list[int]] = None
    # "window" or "resident" (graphs/signatures.py); None: the target's default
    cache_mode: Optional[str] = None
    # --target onnx: weight-only quantisation ("none", "int8", "int4"; None: none) and
    # the MatMulNBits block size
    quant: Optional[str] = None
    quant_block_size: Optional[int] = None

    def resolved_cache_mode(self) -> str:
        """The --cache-mode, else the target's default; on Ascend the default is resident
        only where the Lite of the exporting MindSpore's release takes device tensors
        (artifacts/lite.py ascend_cache_mode), else window; ONNX graphs update their
        cache in place (graphs/signatures.py INPLACE)."""
        if self.target == ONNX_TARGET:
            return INPLACE
        if self.cache_mode or self.target != "ascend":
            return self.cache_mode or TARGET_CACHE_MODES[self.target]
        return ascend_cache_mode(_mindspore_version())


def _mindspore_version() -> Optional[str]:
    """The installed MindSpore's version, read without importing it (slow)."""
    try:
        return metadata.version("mindspore")
    except metadata.PackageNotFoundError:
        return None


def resolve_buckets(opts: BuildOptions, max_seq: int) -> Optional[list[int]]:
    """The bucket list to build for: validated, sorted, never beyond max_seq_len."""
    if opts.buckets is None:
        if opts.target != "ascend":
            return None
        return [b for b in DEFAULT_ASCEND_BUCKETS if b < max_seq] + [max_seq]
    buckets = sorted(set(opts.buckets))
    if not buckets or buckets[0] < 1:
        raise ExportError(f"--buckets {opts.buckets}: lengths must be positive")
    if buckets[-1] > max_seq:
        raise ExportError(f"--buckets: {buckets[-1]} exceeds --max-seq-len {max_seq}")
    return buckets


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
    tmp = make_staging_dir(out)
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


def _rank_weights(shards: ShardsIndex, rank: int, dtype: str) -> Iterator:
    """(name, array in `dtype`) of `rank` from the shards, for `RankModel.load` (which
    takes bf16 as uint16 bit patterns, as the shards store it)."""
    for name, arr in read_rank(shards, rank):
        yield name, convert(arr, shards.dtype, dtype)


def _export_rank(shards: ShardsIndex, opts: BuildOptions, dtype: str, rank: int, root: Path,
                 progress: Progress) -> list[dict]:
    from dsflow.graphs.model import RankModel
    from dsflow.export.pipeline.mindir import export_graph

    cfg = shards.config
    net = RankModel(cfg, opts.tp, dtype, target=opts.target)
    total = len(weight_specs(cfg))

    def counted():
        for i, item in enumerate(_rank_weights(shards, rank, dtype), 1):
            yield item
            progress("tensor", rank, "weights", i, total)

    net.load(counted())
    rank_dir = root / f"rank{rank}"
    rank_dir.mkdir()
    graphs = []
    for i, kind in enumerate(GRAPH_KINDS, 1):
        sig = graph_signature(kind, cfg, opts.tp, cache_dtype(opts.target, dtype),
                              opts.resolved_cache_mode())
        path = export_graph(net, sig, rank_dir / kind)
        graphs.append({"rank": rank, "kind": kind, "file": path.relative_to(root).as_posix(),
                       **sig.to_dict()})
        progress("graph", rank, kind, i, len(GRAPH_KINDS))
    return graphs


@dataclass
class _Source:
    """What a build needs from its input before MindSpore is imported."""

    config: ModelConfig
    tokenizer_files: list[Path]
    shards: Optional[ShardsIndex] = None  # already sharded input
    ckpt: Optional[Checkpoint] = None     # to be sharded into the staging directory


def _open_source(opts: BuildOptions) -> _Source:
    """Validate the input (shards or checkpoint) fully before any output exists."""
    if is_shards_dir(opts.model_dir):
        shards = read_index(opts.model_dir)
        check_shards(shards, opts.tp)
        return _Source(shards.config, shards.tokenizer_files(), shards=shards)
    ckpt = Checkpoint(opts.model_dir, opts.config)
    try:
        check_tp(ckpt.config, opts.tp)
        ckpt.validate()
        return _Source(ckpt.config, ckpt.tokenizer_files(), ckpt=ckpt)
    except BaseException:
        ckpt.close()
        raise


def _shards_for(source: _Source, opts: BuildOptions, dtype: str, root: Path) -> ShardsIndex:
    if source.shards is not None:
        return source.shards
    return write_shards(source.ckpt, opts.shards_dir or root / SCRATCH_SHARDS, opts.tp, dtype)


def _graph_mode_on_cpu(ms) -> None:
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        ms.set_device("CPU")
    except RuntimeError:  # the device is fixed once MindSpore has run: it is CPU here
        pass


def _lite_stage(root: Path, data: dict, opts: BuildOptions,
                notice: Callable[[str], None]) -> None:
    """Lite configs, rank table, and conversion (or the script for the Ascend host)."""
    from dsflow.export.pipeline.lite_build import apply_lite_entries, lite_stage
    result = lite_stage(root, data, buckets=data["buckets"], batch_sizes=opts.batch_sizes,
                        device_ids=opts.device_ids, shown_as=str(opts.out))
    apply_lite_entries(data["graphs"], result)
    data["lite"] = result["section"]
    data["kv_cache"].update(result["kv_cache"])  # a resident cache's fixed slots/capacity
    if result.get("notice"):
        notice(result["notice"])


def _generation_config(model_dir: Path) -> Optional[Path]:
    """generation_config.json beside the checkpoint (or in a shards dir's tokenizer/)."""
    for p in (model_dir / GENERATION_CONFIG, model_dir / "tokenizer" / GENERATION_CONFIG):
        if p.is_file():
            return p
    return None


def _check_options(opts: BuildOptions) -> str:
    """Validate target, dtype, cache mode and quantisation; returns the weight dtype."""
    if opts.target == ONNX_TARGET:
        from dsflow.export.pipeline.onnx_build import check_onnx_options
        check_onnx_options(opts.tp, opts.dtype, opts.cache_mode, opts.quant,
                           opts.quant_block_size)
        return "float32"
    if opts.target not in TARGET_DTYPES:
        raise ExportError(f"--target {opts.target}: unknown (choose from "
                          f"{', '.join((*TARGET_DTYPES, ONNX_TARGET))})")
    if opts.quant is not None or opts.quant_block_size is not None:
        raise OptionError(f"--quant with --target {opts.target}: the MindIR targets have no "
                          "quantisation; use --target onnx for int8/int4 weights")
    dtype = opts.dtype or TARGET_DTYPES[opts.target]
    check_target(opts.target, dtype)
    if opts.resolved_cache_mode() not in CACHE_MODES:
        raise ExportError(f"--cache-mode {opts.cache_mode}: unknown (choose from "
                          f"{', '.join(CACHE_MODES)})")
    return dtype


def _check_release(opts: BuildOptions) -> None:
    """The installed MindSpore fits the target: CPU runs on 2.10 only; a resident Ascend
    cache needs a Lite release that takes device tensors (artifacts/lite.py)."""
    version = _mindspore_version()
    found = release_numbers(version)
    if opts.target == "cpu" and found is not None and found[:2] != CPU_RELEASE:
        raise ExportError(
            f"--target cpu: MindSpore {version} is installed, but the CPU path "
            f"runs on MindSpore {'.'.join(map(str, CPU_RELEASE))} only (older releases here "
            "serve Ascend exports for the Lite of the same release): use a venv with "
            "`pip install 'mindspore==2.10.*'`")
    if (opts.target == "ascend" and opts.cache_mode == "resident"
            and not takes_device_tensors(version)):
        raise ExportError(resident_refusal(version, "--cache-mode resident"))


def _engine_versions(opts: BuildOptions) -> dict:
    """Import the graph library (heavy: only once the inputs are known to be good)."""
    if opts.target == ONNX_TARGET:
        from dsflow.export.pipeline.onnx_build import onnx_versions
        return onnx_versions()
    import mindspore as ms
    _graph_mode_on_cpu(ms)
    return {"mindspore_version": ms.__version__}


def _export_graphs(shards: ShardsIndex, opts: BuildOptions, dtype: str, root: Path,
                   max_seq: int, progress: Progress) -> tuple[list[dict], dict]:
    """Every rank's graphs; returns their manifest entries and any target section."""
    graphs: list[dict] = []
    if opts.target == ONNX_TARGET:
        from dsflow.export.pipeline.onnx_build import export_onnx_rank, onnx_section
        policy = QuantPolicy.from_mode(opts.quant or "none",
                                       opts.quant_block_size or DEFAULT_BLOCK_SIZE)
        for rank in range(opts.tp):
            graphs += export_onnx_rank(shards, rank, root, max_seq, policy, progress)
        return graphs, {"onnx": onnx_section(policy)}
    for rank in range(opts.tp):
        graphs += _export_rank(shards, opts, dtype, rank, root, progress)
    return graphs, {}


def build(opts: BuildOptions, progress: Progress = _no_progress,
          notice: Callable[[str], None] = _no_progress) -> Path:
    """Run the whole export; returns the finished artifacts directory.

    `notice(text)` receives messages for the user (e.g. that converter_lite was not
    found and which script to run on the Ascend host)."""
    dtype = _check_options(opts)
    _check_release(opts)
    source = _open_source(opts)
    try:
        cfg = source.config
        max_seq = opts.max_seq_len or cfg.max_position_embeddings
        if max_seq < 2:
            raise ExportError(f"--max-seq-len {max_seq}: must be at least 2")
        if opts.target == ONNX_TARGET:
            from dsflow.export.pipeline.onnx_build import check_onnx_model
            check_onnx_model(cfg)
        buckets = resolve_buckets(opts, max_seq)
        versions = _engine_versions(opts)
        with staging_dir(opts.out) as root:
            shards = _shards_for(source, opts, dtype, root)
            (root / "tokenizer").mkdir()
            for f in source.tokenizer_files:
                shutil.copyfile(f, root / "tokenizer" / f.name)
            generation = _generation_config(Path(opts.model_dir))
            if generation is not None:
                shutil.copyfile(generation, root / GENERATION_CONFIG)
            graphs, sections = _export_graphs(shards, opts, dtype, root, max_seq, progress)
            shutil.rmtree(root / SCRATCH_SHARDS, ignore_errors=True)
            data = {
                "dsflow_version": dsflow_version(),
                **versions,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "source": str(Path(opts.model_dir).resolve()),
                "target": opts.target,
                "dtype": dtype,
                "tp": opts.tp,
                "model": cfg.to_dict(),
                "tp_plan": [{"name": s.name, "shape": list(s.shape), "split": s.split.value,
                             "axis": s.axis} for s in weight_specs(cfg)],
                "kv_cache": kv_cache_section(cfg, opts.tp, _cache_dtype(opts, dtype),
                                             max_seq, opts.resolved_cache_mode()),
                "buckets": buckets,
                "graphs": graphs,
                **sections,
            }
            if opts.target == "ascend":
                _lite_stage(root, data, opts, notice)
            write_manifest(root, data)
    finally:
        if source.ckpt is not None:
            source.ckpt.close()
    return opts.out.resolve()


def _cache_dtype(opts: BuildOptions, dtype: str) -> str:
    return dtype if opts.target == ONNX_TARGET else cache_dtype(opts.target, dtype)

"""Worker backend on MindSpore Lite (Ascend, GE provider): same interface as
`backends/mindspore.MindSporeBackend` (configure / prefill / decode / copy_slot), so the worker
protocol, coordinator and sampling do not change; choosing the backend is the only
difference. Nothing here has run on an NPU: it is written against the documented
`mindspore_lite` Python API and tested with a fake module (tests/fakes).

How one rank runs (references: mindspore-ai/mindspore-lite
mindspore-lite/python/api/{model.py,context.py,tensor.py}; docs/lite/cloud_docs
mindir/runtime_cpp.md "Multiple Models Sharing Weights" and runtime_distributed_python.md;
examples/base_models/qwen3_8b/infer_qwen3_8b_mslite_tp.py, infer_qwen3_8b_mslite_1p.py):

1. HCCL_NPU_SOCKET_PORT_RANGE is set before `import mindspore_lite` (ranks otherwise
   collide on port 16666; the example sets it at module top and in each worker).
2. Context: target ["ascend"], ascend.device_id, ascend.rank_id, ascend.provider "ge"
   (only GE does distributed inference), precision "enforce_origin" (= GE's
   must_keep_origin_dtype, also in the ini).
3. Prefill and decode Models join one ModelGroup(ModelGroupFlag.SHARE_WEIGHT) *before*
   either is built (model.py ModelGroupFlag example), so the weights are held once.
   The flag is always passed: the class default is SHARE_WORKSPACE although its
   docstring says SHARE_WEIGHT.
4. Builds are staggered (ranks compiling the same custom kernels at once corrupt the
   compile cache): by default rank r waits for rank r-1's "built" marker in the
   working directory (the cluster's per-run directory) plus 8 s, as the example waits
   for each rank's build signal and sleeps 8 s. Each build passes the graph's ini and,
   for tp > 1, the rank table through `config_dict`, which overrides the ini's relative
   path (model.py build_from_file docstring).
5. `barrier()` runs after building and before any predict (HCCL times out if a rank
   starts its first AllReduce while another still builds). With the current worker
   protocol the coordinator sends no request before every rank reported "ready", which
   happens after this constructor returns, so a no-op barrier is already safe there.
6. The KV cache is the worker's slot cache (runtime/slot_backend.py), held in host
   memory in the cache dtype: each step uploads the window of the live slots with its
   inputs and downloads the new K/V with the logits. The documented Python API has no
   way to gather slots on the device outside a model, so a device-resident slot cache
   needs graphs that own it (docs/DESIGN.md, "KV cache: slots"); until then this costs
   one window transfer per step (docs/ASCEND.md says how much).
7. The batch is padded up to the next gear of --batch-sizes (slot_backend), and every
   prefill chunk length and window length is a bucket (the coordinator picks them from
   the manifest's buckets).
8. `resize` is called whenever a graph's input shapes change (the 1p example resizes
   per bucket; with GE the input tensors' shapes decide the gear anyway).

dtype: the documented `mindspore_lite.DataType` has FLOAT16/FLOAT32/INT32 but no
BFLOAT16 (tensor.py at mindspore-lite HEAD; the C++ binding knows kNumberTypeBFloat16
but hands its bits to numpy as float16), so a bf16 cache cannot be allocated on the
device through the Python API. The Ascend graphs therefore keep bf16 weights but an
fp16 KV cache (graphs/kernels/__init__.py ASCEND_CACHE_DTYPE); a bf16 cache is still refused
with that explanation unless the installed mindspore_lite exposes DataType.BFLOAT16. Logits are float32 and
token ids int32 per the signatures.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Protocol

import numpy as np

from dsflow.artifacts.lite import RANK_TABLE_NAME, check_rank_table, model_file
from dsflow.artifacts.manifest import Manifest
from dsflow.common.errors import DsflowError
from dsflow.runtime.slot_backend import SlotBackend

PORT_RANGE_ENV = "HCCL_NPU_SOCKET_PORT_RANGE"
DEFAULT_PORT_RANGE = "21500-21600"  # the Qwen3 Lite example's range
RANK_TABLE_ENV = "RANK_TABLE_FILE"
SETTLE_S = 8.0
TURN_TIMEOUT_S = 3600.0
DOWNLOADS = "https://www.mindspore.cn/lite/docs/en/master/use/downloads.html"
PREFILL_IO = (("input_ids", "start", "valid_length", "key_window", "value_window"),
              ("logits", "key", "value"))
DECODE_IO = (("input_ids", "positions", "key_window", "value_window"),
             ("logits", "key", "value"))
LITE_DTYPE_NAMES = {"float32": "FLOAT32", "float16": "FLOAT16", "int32": "INT32",
                    "bfloat16": "BFLOAT16"}
NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int32": np.int32}


class LiteUnavailableError(DsflowError):
    """mindspore_lite cannot be imported here (a CPU host, or an incomplete install)."""


class LiteBackendError(DsflowError):
    """Artifacts or a request the Lite backend cannot serve; the message says why."""


def import_mindspore_lite():
    """Set the HCCL port range (and the custom-op path if findable), then import."""
    os.environ.setdefault(PORT_RANGE_ENV, DEFAULT_PORT_RANGE)
    opp = os.environ.get("ASCEND_OPP_PATH")
    if opp and (Path(opp) / "vendors" / "mslite_custom_ops").is_dir():
        os.environ.setdefault("ASCEND_CUSTOM_OPP_PATH", f"{opp}/vendors/mslite_custom_ops")
    try:
        import mindspore_lite
    except ImportError as e:
        raise LiteUnavailableError(
            f"mindspore_lite is not importable in {sys.executable} ({e}). The Ascend backend "
            "runs on the Ascend host: install CANN (source its set_env.sh), then the "
            f"mindspore_lite wheel matching CANN and this Python from {DOWNLOADS} "
            "(pip install mindspore_lite-<version>-cp3X-cp3X-linux_<arch>.whl). "
            "On CPU hosts use --device cpu.") from None
    return mindspore_lite


def lite_dtype(mslite, name: str):
    """mslite.DataType member for a signature dtype, or a clear refusal."""
    member = getattr(mslite.DataType, LITE_DTYPE_NAMES.get(name, "?"), None)
    if member is None:
        raise LiteBackendError(
            f"this mindspore_lite has no DataType for {name!r} (its documented types: "
            f"{', '.join(m.name for m in mslite.DataType)}), so a {name} KV cache cannot be "
            "allocated on the device; build the Ascend artifacts with a float16 or float32 "
            "cache, or use a mindspore_lite whose DataType has BFLOAT16")
    return member


class BuildTurns(Protocol):
    """When a rank may start building (`wait`) and when it has finished (`done`)."""

    def wait(self, rank: int) -> None: ...

    def done(self, rank: int) -> None: ...


# Seconds a rank waits after the previous rank built (the Qwen3 example's 8 s); the
# tests set it to 0 through this variable.
STAGGER_ENV = "DSFLOW_LITE_BUILD_STAGGER_S"


class FileTurns:
    """Build in rank order: rank r starts once rank r-1 left its marker, plus `settle_s`.

    Markers live in `directory` (the worker's working directory: one fresh run
    directory per cluster) and carry the coordinator's pid, so runs never mix.
    """

    def __init__(self, directory: Path, settle_s: float = SETTLE_S,
                 timeout_s: float = TURN_TIMEOUT_S, sleep: Callable[[float], None] = time.sleep,
                 poll_s: float = 1.0):
        self.directory, self.settle_s, self.timeout_s = Path(directory), settle_s, timeout_s
        self.sleep, self.poll_s = sleep, poll_s

    def _marker(self, rank: int) -> Path:
        return self.directory / f".dsflow-lite-built-{os.getppid()}-{rank}"

    def wait(self, rank: int) -> None:
        if rank == 0:
            return
        waited = 0.0
        while not self._marker(rank - 1).exists():
            if waited > self.timeout_s:
                raise LiteBackendError(f"rank {rank}: rank {rank - 1} did not finish building "
                                       f"within {self.timeout_s:.0f} s")
            self.sleep(self.poll_s)
            waited += self.poll_s
        self.sleep(self.settle_s)

    def done(self, rank: int) -> None:
        self._marker(rank).touch()


class LiteBackend(SlotBackend):
    """One rank's prefill + decode on an Ascend device through mindspore_lite."""

    def __init__(self, manifest: Manifest, rank: int, device_id: int,
                 barrier: Optional[Callable[[], None]] = None, turns: Optional[BuildTurns] = None,
                 rank_table: Optional[Path] = None):
        self._ms = ms = import_mindspore_lite()
        self.rank, self.device = rank, f"ascend:{int(device_id)}"
        lite = manifest.lite
        self.buckets = sorted(manifest.buckets or lite.get("buckets") or [])
        self.batch_sizes = sorted(lite.get("batch_sizes") or [1])
        super().__init__(manifest, self.batch_sizes)
        if not self.buckets:
            raise LiteBackendError(f"{manifest.root}: no shape buckets recorded; Ascend "
                                   "artifacts are built with --buckets")
        self.sigs = {k: manifest.signature(k) for k in ("prefill", "decode")}
        self._check_io()
        lite_dtype(ms, manifest.cache_dtype)  # refuses a cache dtype Lite cannot hold
        self.cache_dtype = NP_DTYPES[manifest.cache_dtype]
        config_dict = self._rank_table_dict(manifest, rank, int(device_id), rank_table)
        self.models = {"prefill": ms.Model(), "decode": ms.Model()}
        self.group = ms.ModelGroup(ms.ModelGroupFlag.SHARE_WEIGHT)
        self.group.add_model([self.models["prefill"], self.models["decode"]])
        settle = float(os.environ.get(STAGGER_ENV, SETTLE_S))
        turns = turns or (FileTurns(Path.cwd(), settle_s=settle, poll_s=min(1.0, settle or 0.05))
                          if manifest.tp > 1 else None)
        if turns:
            turns.wait(rank)
        self._build(manifest, self._context(rank, int(device_id)), config_dict)
        if turns:
            turns.done(rank)
        (barrier or (lambda: None))()
        self._shapes: dict[str, list] = {}

    # ---- setup ------------------------------------------------------------------
    def _check_io(self) -> None:
        """Fail loudly if the signatures change under this backend's fixed I/O order."""
        for kind, (ins, outs) in (("prefill", PREFILL_IO), ("decode", DECODE_IO)):
            sig = self.sigs[kind]
            names = (tuple(t.name for t in sig.inputs), tuple(t.name for t in sig.outputs))
            if names != (ins, outs):
                raise LiteBackendError(f"{kind} signature changed; update runtime/backends/lite.py")

    def _build(self, manifest: Manifest, ctx, config_dict: Optional[dict]) -> None:
        """Build both graphs (already in the SHARE_WEIGHT group) with their inis."""
        for kind, model in self.models.items():
            entry = manifest.graph(self.rank, kind)
            if "config" not in entry:
                raise LiteBackendError(f"{manifest.root}: rank {self.rank} {kind} has no Lite "
                                       "config; build the artifacts with --target ascend")
            model.build_from_file(str(model_file(manifest.root, entry)),
                                  self._ms.ModelType.MINDIR, ctx,
                                  config_path=str(manifest.root / entry["config"]),
                                  config_dict=config_dict)

    def _context(self, rank: int, device_id: int):
        ctx = self._ms.Context()
        ctx.target = ["ascend"]
        ctx.ascend.device_id = device_id
        ctx.ascend.rank_id = rank
        ctx.ascend.provider = "ge"
        ctx.ascend.precision_mode = "enforce_origin"
        return ctx

    @staticmethod
    def _rank_table_dict(manifest: Manifest, rank: int, device_id: int,
                         explicit: Optional[Path]) -> Optional[dict]:
        """tp > 1: the rank table (argument, $RANK_TABLE_FILE, or the artifacts' copy)."""
        if manifest.tp == 1:
            return None
        name = manifest.lite.get("rank_table") or RANK_TABLE_NAME
        path = Path(explicit or os.environ.get(RANK_TABLE_ENV) or manifest.root / name)
        check_rank_table(path, rank, device_id)
        return {"ascend_context": {"rank_table_file": str(path.resolve())}}

    # ---- running a graph ----------------------------------------------------------
    def _check_length(self, n: int, what: str) -> None:
        if n not in self.buckets:
            raise LiteBackendError(f"{what} length {n} is not a GE gear of these artifacts "
                                   f"({self.buckets}); the coordinator pads to the manifest's "
                                   "buckets (runtime/scheduler.py SlotPlan)")

    def _run(self, kind: str, inputs: list[np.ndarray]) -> tuple[np.ndarray, ...]:
        """One predict: resize when the gear changes, then host arrays in, arrays out."""
        names = self.sigs[kind].input_names()
        arrays = dict(zip(names, inputs))
        if kind == "prefill":
            self._check_length(arrays["input_ids"].shape[1], "prompt chunk")
        self._check_length(arrays["key_window"].shape[3], "cache window")
        model = self.models[kind]
        shapes = [list(a.shape) for a in inputs]
        if self._shapes.get(kind) != shapes:
            model.resize(model.get_inputs(), shapes)
            self._shapes[kind] = shapes
        T = self._ms.Tensor
        outs = model.predict([T(np.ascontiguousarray(a)) for a in inputs])
        logits, key, value = (o.get_data_to_numpy() for o in outs[:3])
        return (np.asarray(logits, np.float32), key.astype(self.cache_dtype, copy=False),
                value.astype(self.cache_dtype, copy=False))

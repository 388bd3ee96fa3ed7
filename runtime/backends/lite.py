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
6. The KV cache stays on the device (artifacts built with the resident cache mode,
   the Ascend default where the Lite release takes device tensors: artifacts/lite.py
   ZERO_COPY_RELEASE; graphs/signatures.py): `configure` allocates two pairs of
   device tensors of the built shape, `Tensor(shape, dtype, device="ascend:N")`,
   zeroed once with set_data_from_numpy (whose result is checked: `set_data`). Each
   predict takes the small host inputs (ids, positions, slot ids) plus the current
   pair and gets `outputs=[host logits, the other pair]` (preallocated outputs:
   model.py predict(inputs, outputs)), then the pairs swap (ping-pong). The host
   logits are built from numpy: `Tensor(shape=, dtype=)` has no host buffer
   (src/litert/cxx_api/types.cc) and GE refuses such an output ("Output data ptr is
   nullptr", ge_graph_executor.cc). Device tensors as predict inputs/outputs need the
   2026 zero-copy GE executor; the executors of 2.3-2.7 read host pointers, so on those
   releases resident artifacts are refused with one line saying how to rebuild
   (`--cache-mode window`), before anything is built. Per step only ids and logits
   cross PCIe; on the card the graph copies the whole cache into the output pair and
   gathers the batch's slots. The documented API has no device-side copy outside a
   model, so `copy_slot` is not supported (configure says so); the slots and capacity
   are the build's (the manifest's kv_cache.slots / capacity), and configure refuses
   any other. Artifacts built with `--cache-mode window` (the default on 2.5-2.7) run
   the slot cache in host memory, each step uploading the window of the live slots
   and downloading the new K/V (runtime/slot_backend.py).
7. The batch is padded up to the next gear of --batch-sizes (slot_backend), and every
   prefill chunk length (and window length, window mode) is a bucket (the coordinator
   picks them from the manifest's buckets).
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

import hashlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Protocol

import numpy as np

from dsflow.artifacts.lite import (RANK_TABLE_NAME, SUPPORTED_RELEASES, check_rank_table,
                                   model_file, release_numbers, resident_refusal,
                                   takes_device_tensors)
from dsflow.artifacts.manifest import Manifest
from dsflow.common.errors import DsflowError
from dsflow.graphs.signatures import RESIDENT
from dsflow.runtime.slot_backend import PAD_POSITION, SlotBackend

log = logging.getLogger("dsflow.lite")

PORT_RANGE_ENV = "HCCL_NPU_SOCKET_PORT_RANGE"
DEFAULT_PORT_RANGE = "21500-21600"  # the Qwen3 Lite example's range
RANK_TABLE_ENV = "RANK_TABLE_FILE"
SETTLE_S = 8.0
TURN_TIMEOUT_S = 3600.0
DOWNLOADS = "https://www.mindspore.cn/lite/docs/en/master/use/downloads.html"
PREFILL_IO = (("input_ids", "key_window", "start", "valid_length", "value_window"),
              ("logits", "key", "value"))
DECODE_IO = (("input_ids", "key_window", "positions", "value_window"),
             ("logits", "key", "value"))
RESIDENT_IO = {
    "prefill": (("input_ids", "key_cache", "slot_ids", "start", "valid_length", "value_cache"),
                ("logits", "key_cache", "value_cache")),
    "decode": (("input_ids", "key_cache", "positions", "slot_ids", "value_cache"),
               ("logits", "key_cache", "value_cache"))}
CACHE_INPUTS = ("key_cache", "value_cache")
LITE_DTYPE_NAMES = {"float32": "FLOAT32", "float16": "FLOAT16", "int32": "INT32",
                    "bfloat16": "BFLOAT16"}
NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int32": np.int32}
# HCCL waits this long (s) for the other ranks at a collective's first link-up; CANN's
# default is 120 s (range 120-7200, CANN environment-variable reference), less than GE
# compiling one gear while the other ranks wait. A user's value is kept.
CONNECT_TIMEOUT_ENV, CONNECT_TIMEOUT_S = "HCCL_CONNECT_TIMEOUT", "1800"
# Per-rank GE compile cache and CANN work directory (see `rank_cache_dir`).
GE_CACHE_ENV = "DSFLOW_GE_CACHE"
WORK_PATH_ENV = "ASCEND_WORK_PATH"
# Run with a mindspore_lite whose version differs from the exporting MindSpore's.
VERSION_OVERRIDE_ENV = "DSFLOW_ALLOW_LITE_VERSION_MISMATCH"


class LiteUnavailableError(DsflowError):
    """mindspore_lite cannot be imported here (a CPU host, or an incomplete install)."""


class LiteBackendError(DsflowError):
    """Artifacts or a request the Lite backend cannot serve; the message says why."""


def import_mindspore_lite():
    """Set the HCCL port range and link-up timeout (and the custom-op path if findable),
    then import."""
    os.environ.setdefault(PORT_RANGE_ENV, DEFAULT_PORT_RANGE)
    os.environ.setdefault(CONNECT_TIMEOUT_ENV, CONNECT_TIMEOUT_S)
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


def check_lite_version(manifest: Manifest, lite_version: Optional[str],
                       allow: bool) -> Optional[str]:
    """Refuse a mindspore_lite whose release differs from the exporting MindSpore's.

    GE's adapters for the fused attention operators changed their input mapping
    between releases, so a mismatched runtime may feed the graphs the wrong inputs
    without any error. MindSpore Lite ships in step with MindSpore (same version
    numbers); the release numbers must match (pre-release suffixes are ignored).
    With `allow`, a mismatch is returned as a warning instead."""
    exported = manifest.data.get("mindspore_version")
    if exported and release_numbers(exported) and release_numbers(exported) == release_numbers(lite_version):
        return None
    problem = (f"{manifest.root}: exported by MindSpore {exported or '(not recorded)'}, "
               f"but this mindspore_lite is {lite_version or '(unknown)'}")
    if not allow:
        raise LiteBackendError(
            f"{problem}; GE's operator adapters differ between releases and could feed the "
            "graphs the wrong inputs silently. Install the mindspore_lite of the exporting "
            "release, or rebuild the artifacts with the matching MindSpore; to run anyway, "
            f"pass --allow-version-mismatch (or set {VERSION_OVERRIDE_ENV}=1)")
    return f"{problem}; running anyway (version check overridden): results may be wrong"


def rank_cache_dir(manifest: Manifest, rank: int, lite_version: Optional[str]) -> Path:
    """This rank's GE graph-compile cache, created (GE fails with E13026 on a missing
    ge.graph_compiler_cache_dir).

    One directory per rank, so ranks never compile into the same files at once; keyed
    by the artifacts (path and build time: a rebuild never meets a stale cache) and the
    mindspore_lite version (GE caches are not portable across versions). Under
    $DSFLOW_GE_CACHE, else $XDG_CACHE_HOME/dsflow/ge-cache (~/.cache/dsflow/ge-cache)."""
    base = os.environ.get(GE_CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dsflow",
        "ge-cache")
    key = f"{Path(manifest.root).resolve()}|{manifest.data.get('created', '')}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = Path(base) / f"{digest}-lite-{lite_version or 'unknown'}" / f"rank{rank}"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LiteBackendError(f"{path}: cannot create the GE compile cache ({e.strerror}); "
                               f"set {GE_CACHE_ENV} to a writable directory") from None
    return path


def set_data(tensor, array: np.ndarray, name: str) -> None:
    """tensor.set_data_from_numpy(array), or LiteBackendError naming the tensor.

    The C++ binding returns False when the copy fails (dtype or byte size differ, or a
    host-to-device copy fails: lite_tensor_pybind.cc SetTensorNumpyData); tensor.py
    raises RuntimeError for a dtype or size mismatch itself and, in the releases read,
    drops the binding's bool (returns None). Both a raise and a False are failures."""
    try:
        ok = tensor.set_data_from_numpy(array)
    except RuntimeError as e:
        raise LiteBackendError(f"{name}: set_data_from_numpy failed ({e})") from None
    if ok is False:
        raise LiteBackendError(
            f"{name}: set_data_from_numpy refused {array.dtype} {list(array.shape)} "
            f"({array.nbytes} bytes) for a tensor of {tensor.dtype} {list(tensor.shape)} "
            f"({tensor.data_size} bytes), or the copy to the device failed")


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
                 rank_table: Optional[Path] = None,
                 allow_version_mismatch: Optional[bool] = None):
        self._ms = ms = import_mindspore_lite()
        self.rank, self.device = rank, f"ascend:{int(device_id)}"
        if allow_version_mismatch is None:
            allow_version_mismatch = os.environ.get(VERSION_OVERRIDE_ENV, "") not in ("", "0")
        self.version = getattr(ms, "__version__", None)
        self.version_warning = check_lite_version(manifest, self.version,
                                                  allow_version_mismatch)
        if self.version_warning:
            log.warning("%s", self.version_warning)
        if (release_numbers(self.version) or (0, 0))[:2] not in SUPPORTED_RELEASES:
            log.warning("mindspore_lite %s is not a release dsflow's Ascend path was written "
                        "for (%s)", self.version,
                        ", ".join(".".join(map(str, r)) for r in SUPPORTED_RELEASES))
        lite = manifest.lite
        self.buckets = sorted(manifest.buckets or lite.get("buckets") or [])
        self.batch_sizes = sorted(lite.get("batch_sizes") or [1])
        super().__init__(manifest, self.batch_sizes)
        if not self.buckets:
            raise LiteBackendError(f"{manifest.root}: no shape buckets recorded; Ascend "
                                   "artifacts are built with --buckets")
        self._check_io()
        self.lite_cache_dtype = lite_dtype(ms, manifest.cache_dtype)  # refuses bf16
        self.cache_dtype = NP_DTYPES[manifest.cache_dtype]
        self.built_shape = manifest.resident_shape  # (slots, capacity), resident mode
        if self.cache_mode == RESIDENT and self.built_shape is None:
            raise LiteBackendError(f"{manifest.root}: a resident cache without fixed slots / "
                                   "capacity (a CPU build); build the artifacts with "
                                   "--target ascend")
        if self.cache_mode == RESIDENT and not takes_device_tensors(self.version):
            raise LiteBackendError(resident_refusal(
                self.version, f"{manifest.root}: built with the resident cache mode"))
        self._pairs: Optional[list[list]] = None  # two [key, value] device pairs
        self._current = 0  # the pair holding the cache
        config_dict = self._config_dict(manifest, rank, int(device_id), rank_table)
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
        io = RESIDENT_IO if self.cache_mode == RESIDENT else {"prefill": PREFILL_IO,
                                                              "decode": DECODE_IO}
        for kind, (ins, outs) in io.items():
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
                                  config_path=str(manifest.path(entry["config"],
                                                                f"rank {self.rank} {kind} config")),
                                  config_dict=config_dict)

    def _context(self, rank: int, device_id: int):
        ctx = self._ms.Context()
        ctx.target = ["ascend"]
        ctx.ascend.device_id = device_id
        ctx.ascend.rank_id = rank
        ctx.ascend.provider = "ge"
        ctx.ascend.precision_mode = "enforce_origin"
        return ctx

    def _config_dict(self, manifest: Manifest, rank: int, device_id: int,
                     explicit_table: Optional[Path]) -> dict:
        """What build_from_file's config_dict adds to the ini (and overrides in it):
        this rank's GE compile cache and CANN work directory, and for tp > 1 the rank
        table (argument, $RANK_TABLE_FILE, or the artifacts' copy)."""
        cache = rank_cache_dir(manifest, rank, self.version)
        work = cache / "work"  # CANN's per-process files (kernel_meta, ...), not the run dir
        work.mkdir(exist_ok=True)
        os.environ.setdefault(WORK_PATH_ENV, str(work))  # read when CANN compiles
        out = {"ge_session_options": {"ge.graph_compiler_cache_dir": str(cache)}}
        if manifest.tp > 1:
            name = manifest.lite.get("rank_table") or RANK_TABLE_NAME
            path = Path(explicit_table or os.environ.get(RANK_TABLE_ENV)
                        or manifest.path(name, "lite.rank_table"))
            check_rank_table(path, rank, device_id)
            out["ascend_context"] = {"rank_table_file": str(path.resolve())}
        return out

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

    # ---- the device-resident cache ----------------------------------------------
    def configure(self, slots: int, capacity: int) -> dict:
        """Window mode: the host slot cache. Resident mode: the two device pairs, which
        must have the built shape (GE compiled the graphs for it)."""
        if self.cache_mode == RESIDENT and (slots, capacity) != self.built_shape:
            built_slots, built_capacity = self.built_shape
            raise LiteBackendError(
                f"configure {slots} slots x {capacity} positions: the graphs keep the KV "
                f"cache on the device as {built_slots} slots x {built_capacity} positions, "
                "fixed at build (dsexport build --batch-sizes / --buckets)")
        return super().configure(slots, capacity)

    def _device_pairs(self) -> list[list]:
        """Both [key, value] pairs on this rank's card, allocated once, in the built shape."""
        if self._pairs is None:
            shape = list(self.resident_shape(*self.built_shape))
            self._pairs = [[self._ms.Tensor(shape=shape, dtype=self.lite_cache_dtype,
                                            device=self.device) for _ in CACHE_INPUTS]
                           for _ in range(2)]
        return self._pairs

    def _allocate_resident(self, slots: int, capacity: int) -> dict:
        zeros = np.zeros(self.resident_shape(slots, capacity), self.cache_dtype)
        pairs = self._device_pairs()
        for i, pair in enumerate(pairs):  # one upload each, at start-up: stale memory
            for name, tensor in zip(CACHE_INPUTS, pair):  # could hold NaN
                set_data(tensor, zeros, f"rank {self.rank} {name} (pair {i}, {self.device})")
        self._current = 0
        return {"cache_bytes": 2 * len(CACHE_INPUTS) * zeros.nbytes, "copy_slot": False}

    def _run_resident(self, kind: str, named: dict) -> np.ndarray:
        """One predict: host tensors for the small inputs, the current device pair in,
        host logits and the other device pair out; then swap the pairs."""
        if kind == "prefill":
            self._check_length(named["input_ids"].shape[1], "prompt chunk")
        sig = self.sigs[kind]
        now, other = self._device_pairs()[self._current], self._device_pairs()[1 - self._current]
        caches = dict(zip(CACHE_INPUTS, now))
        T = self._ms.Tensor
        inputs = [caches[name] if name in caches else T(np.ascontiguousarray(named[name]))
                  for name in sig.input_names()]
        model = self.models[kind]
        shapes = [list(t.shape) for t in inputs]
        if self._shapes.get(kind) != shapes:
            model.resize(model.get_inputs(), shapes)
            self._shapes[kind] = shapes
        rows, vocab = shapes[0][0], sig.outputs[0].shape[1]
        # a host output needs a host buffer: Tensor(shape=, dtype=) has none (types.cc
        # CreateTensor with no data) and GE refuses it ("Output data ptr is nullptr")
        logits = T(np.empty((rows, vocab), np.float32))
        model.predict(inputs, outputs=[logits, *other])
        self._current = 1 - self._current
        return np.asarray(logits.get_data_to_numpy(), np.float32)

    def copy_slot(self, src: int, dst, length: int) -> None:
        if self.cache_mode != RESIDENT:
            return super().copy_slot(src, dst, length)
        raise LiteBackendError("copy_slot: the KV cache is on the device and mindspore_lite's "
                               "Python API has no device-side copy outside a model "
                               "(configure reports copy_slot False); prefill each sample's "
                               "slot instead")

    # ---- start-up ---------------------------------------------------------------
    def gears(self) -> list[tuple[int, int]]:
        """Every (batch, length) GE compiled a gear for, in the one order all ranks use
        (resident graphs: one per batch size, at the fixed capacity)."""
        if self.cache_mode == RESIDENT:
            return [(b, self.built_shape[1]) for b in self.batch_sizes]
        return [(b, n) for b in self.batch_sizes for n in self.buckets]

    def warm_up(self, report: Callable[[str], None] = lambda line: None) -> float:
        """Run every gear of both graphs once, so GE compiles them now, not in the
        first requests that need them; returns the seconds spent.

        Each gear is one prefill (batch, chunk = the smallest bucket, window = length)
        plus one decode step (batch, window = length) on zero inputs, straight through
        `_run` (the slot cache is not configured yet). Not staggered by rank: a tp > 1
        predict contains AllReduce and returns only once every rank ran it, so rank r
        waiting for rank r-1's gear would wait forever. Ranks therefore run the gears
        in the same order, in step through the collective; the compile-cache race that
        staggering avoided in the builds is avoided here by per-rank compile caches
        (`rank_cache_dir`) and CANN work directories."""
        if self.cache_mode == RESIDENT:
            return self._warm_up_resident(report)
        start = time.perf_counter()
        todo = self.gears()
        layers, kv_heads, head_dim = self.shape
        for i, (batch, length) in enumerate(todo, 1):
            t0 = time.perf_counter()
            window = np.zeros((layers, batch, kv_heads, length, head_dim), self.cache_dtype)
            rows = np.zeros(batch, np.int32)
            self._run("prefill", self._inputs("prefill", {
                "input_ids": np.zeros((batch, self.buckets[0]), np.int32),
                "start": rows, "valid_length": rows + 1,
                "key_window": window, "value_window": window}))
            t1 = time.perf_counter()
            self._run("decode", self._inputs("decode", {
                "input_ids": rows, "positions": rows, "key_window": window,
                "value_window": window}))
            report(f"rank {self.rank}: warm-up {i}/{len(todo)} (batch {batch}, length "
                   f"{length}): prefill {t1 - t0:.1f} s, decode {time.perf_counter() - t1:.1f} s")
        return time.perf_counter() - start

    def _warm_up_resident(self, report: Callable[[str], None]) -> float:
        """Each batch gear once: a prefill chunk whose rows are all padding (valid_length
        0) and a decode step of padding rows (position -1), so the device pairs, whatever
        they hold before `configure` zeroes them, are read but never written."""
        start = time.perf_counter()
        todo = self.gears()
        for i, (batch, capacity) in enumerate(todo, 1):
            t0 = time.perf_counter()
            rows = np.zeros(batch, np.int32)
            slots = np.arange(batch, dtype=np.int32)
            self._run_resident("prefill", {
                "input_ids": np.zeros((batch, self.buckets[0]), np.int32), "slot_ids": slots,
                "start": rows, "valid_length": rows})
            t1 = time.perf_counter()
            self._run_resident("decode", {"input_ids": rows, "slot_ids": slots,
                                          "positions": rows + PAD_POSITION})
            report(f"rank {self.rank}: warm-up {i}/{len(todo)} (batch {batch}, cache "
                   f"{capacity}): prefill {t1 - t0:.1f} s, decode {time.perf_counter() - t1:.1f} s")
        return time.perf_counter() - start

"""The MindSpore Lite (Ascend) stage of `dsexport build --target ascend`: configs, rank
table, conversion. Pure Python: nothing here imports mindspore or mindspore_lite.

Per rank and per graph it writes the ini that both `converter_lite --configFile` and
`mindspore_lite.Model.build_from_file(..., config_path)` read, a rank-table template
(tp > 1), and converts each MindIR with `converter_lite` when one is found beside a
CANN set-up; otherwise (no converter, no CANN, or a conversion failing for lack of
CANN) it writes `convert_for_ascend.sh` with the exact commands and returns a notice
saying why. It returns
the per-graph entries to record in the manifest; writing the manifest stays with
`export/pipeline/build.py`.

Shapes: the GE gears come from the same bucket list the runtime pads to
(runtime/scheduler.py SlotPlan): a cache window's `kv_len` is the smallest bucket that
holds the live length, so `kv_len` gears are exactly the buckets; prompts are prefilled
in chunks of at most the smallest bucket, so the prefill `seq` dim has that one value
(a gear per (seq, kv_len) pair would multiply the count past GE's 100).
Resident-cache graphs (the Ascend default, graphs/signatures.py) have no `kv_len`:
their cache inputs are fixed at [layers, slots, kv_heads, capacity, head_dim] with
`resident_dims`, so their gears are the batch sizes alone.
Input names, order and dynamic axes come from `graphs.signatures.graph_signature`.

Batch: by default every graph is built for batch 1 (the batch dim is fixed to 1 in
`ge.inputShape`, one gear per bucket). `batch_sizes=(1, 2, 4)` makes batch a dynamic
dim too: the gears are every (batch, bucket) pair, at most 100 (GE's limit), and the
Lite backend pads a request's batch up to the smallest batch gear that holds it.

Sources (public references, none of it run here):
- ini sections and keys: mindspore-ai/docs docs/lite/cloud_docs/source_en/mindir/
  runtime_cpp.md ("Ascend Backend GE Inference": [ge_session_options], [ge_graph_options]
  ge.inputShape / ge.dynamicDims / ge.dynamicNodeType) and converter_tool_ascend.md
  (`[ge_graph_options]` form "ge.inputShape=x1:-1,3,224,224;x2:-1,3,1024,1024",
  "ge.dynamicDims=1,1;2,2;3,3;4,4": gears separated by ';', one value per -1 in input
  order; up to 100 gears; converter `--optimize=ascend_oriented` with
  `[ascend_context] provider=ge`); the session options are MindFormers' published
  910B GE recipe (plugin_custom_ops=All, ge.externalWeight=1, ge.exec.formatMode=1,
  must_keep_origin_dtype, atomicCleanPolicy=1, ge.event=notify, staticMemoryPolicy=2).
- converter flags: converter_tool.md (--fmk=MINDIR, --modelFile, --outputFile without
  suffix, --saveType=MINDIR, --optimize=none|general|ascend_oriented, --configFile;
  LD_LIBRARY_PATH=${PACKAGE_ROOT_PATH}/tools/converter/lib; CANN >= 7.5).
- rank table: HCCL ranktable v1.0 (server_list / device / device_id, device_ip,
  rank_id) and mindspore-lite examples/base_models/qwen3_8b/infer_qwen3_8b_mslite_tp.py
  `_write_rank_table` (single host: server_id 127.0.0.1, host_nic_ip "reserve").
- converter discovery: the same example's export_and_convert.sh ($CONV, then
  $MSLITE_HOME_PATH/tools/converter/converter/converter_lite, then PATH).
"""
from __future__ import annotations

import configparser
import io
import itertools
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from dsflow.graphs.config import ModelConfig
from dsflow.graphs.signatures import (BATCH, CAPACITY, KV_LEN, RESIDENT, SEQ, SLOTS,
                                      GraphSignature, check_input_order, graph_signature)
from dsflow.artifacts.lite import (LITE_SUFFIX, PLACEHOLDER_PREFIX, RANK_TABLE_NAME, LiteBuildError,
                                   converted_file)

MAX_GEARS = 100  # GE: "Up to 100 configurations are supported" (converter_tool_ascend.md)
DEFAULT_BATCH_SIZES = (1,)
CONVERTER = "converter_lite"
CONVERTER_IN_HOME = Path("tools/converter/converter/converter_lite")
HOME_ENVS = ("MSLITE_HOME", "MSLITE_HOME_PATH")  # ours, then the Qwen3 example's name
SCRIPT_NAME = "convert_for_ascend.sh"
DEVICE_IP_PLACEHOLDER = PLACEHOLDER_PREFIX + ": run `hccn_tool -i {device} -ip -g` on the Ascend host"

SESSION_OPTIONS = (
    ("ge.externalWeight", "1"),          # constants shared across the ModelGroup
    ("ge.exec.formatMode", "1"),
    ("ge.exec.precision_mode", "must_keep_origin_dtype"),  # bf16 stays bf16
    ("ge.exec.atomicCleanPolicy", "1"),
    ("ge.event", "notify"),
    ("ge.exec.staticMemoryPolicy", "2"),  # dynamically extended memory, for many gears
)

Gear = tuple[int, int]  # (batch, length): length is seq for prefill, kv_len for decode


class MissingCannError(LiteBuildError):
    """converter_lite ran but failed for lack of CANN (its libraries or environment)."""


# CANN's set_env.sh exports these; `--optimize=ascend_oriented` runs GE, i.e. needs CANN.
CANN_ENVS = ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME")
# Converter output that means "no CANN here" rather than "this graph is wrong": the
# dynamic loader (or dlopen) failing to find one of CANN's own libraries. Warnings that
# merely mention ASCEND_OPP_PATH or set_env.sh are NOT that: mindspore-lite's
# python/api/_check_ascend.py prints such warnings on hosts that do have CANN, so a
# real conversion error printed after them must be reported, not hidden behind the
# "run the script later" fallback.
MISSING_CANN = re.compile(
    r"lib(ascendcl|ge_runner|ge_compiler|graph|register|runtime|hccl|ascend_hal|acl_\w+)"
    r"\.so[^\n]*cannot open shared object file", re.I)


# ---- gears and ini ------------------------------------------------------------------
def _positive_sorted(values: Sequence[int], what: str) -> list[int]:
    out = sorted({int(v) for v in values})
    if not out or out[0] < 1:
        raise LiteBuildError(f"{what} must be a non-empty list of positive integers, "
                             f"got {list(values)}")
    return out


def gears(buckets: Sequence[int], batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES) -> list[Gear]:
    """Every (batch, length) GE compiles a profile for: batch sizes x buckets, sorted."""
    lengths = _positive_sorted(buckets, "--buckets")
    batches = _positive_sorted(batch_sizes, "batch sizes")
    out = list(itertools.product(batches, lengths))
    if len(out) > MAX_GEARS:
        raise LiteBuildError(f"{len(batches)} batch sizes x {len(lengths)} buckets = {len(out)} "
                             f"GE gears; GE accepts at most {MAX_GEARS}: use fewer of either")
    return out


def resident_dims(buckets: Sequence[int], batch_sizes: Sequence[int]) -> tuple[int, int]:
    """(slots, capacity) of a resident cache built for GE: GE compiles static shapes per
    gear, and one cache shape serves every gear, so both are fixed at build. Slots =
    the largest batch gear (a full batch; and padding rows need slots of their own,
    graphs/model.py SlotWriter); capacity = the largest bucket (= --max-seq-len,
    export/pipeline/build.py resolve_buckets), the longest sequence the artifacts take."""
    return (_positive_sorted(batch_sizes, "batch sizes")[-1],
            _positive_sorted(buckets, "--buckets")[-1])


def _gear_values(buckets: Sequence[int], batch_sizes: Sequence[int]) -> dict[str, list[int]]:
    """The values each named axis takes across the gears."""
    lengths = _positive_sorted(buckets, "--buckets")
    slots, capacity = resident_dims(buckets, batch_sizes)
    # a prefill chunk is at most the smallest bucket (runtime/scheduler.py SlotPlan)
    return {BATCH: _positive_sorted(batch_sizes, "batch sizes"), SEQ: lengths[:1],
            KV_LEN: lengths, SLOTS: [slots], CAPACITY: [capacity]}


def _dim_text(dim: Any, values: dict[str, list[int]]) -> str:
    """An axis with one value in every gear is written as that value; otherwise -1."""
    if isinstance(dim, int):
        return str(dim)
    if dim not in values:
        raise LiteBuildError(f"signature axis {dim!r} has no GE gear rule")
    return str(values[dim][0]) if len(values[dim]) == 1 else "-1"


def ge_inputs(sig: GraphSignature) -> list:
    """The graph inputs in the order the `ge.inputShape` entries are written.

    Lite matches the entries to the graph inputs by name (mindspore-lite
    src/extendrt/delegate/ascend_ge/ge_graph_executor.cc UpdateGraphInputs; the MindIR
    loader strips the stored `<graph>:` prefix, ParseParameterName), so the entry order
    is harmless to Lite. The order still fixes the order of each gear's values (one per
    -1, entry after entry), which GE's multibatch code reads after sorting its Data
    nodes by name (CANN multi_batch_options.cc SortDataNodesByName); the signatures list
    their inputs in name order (graphs/signatures.check_input_order), so every reading
    agrees."""
    check_input_order(sig)
    return list(sig.inputs)


def ge_input_shape(sig: GraphSignature, buckets: Sequence[int],
                   batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES) -> str:
    """`name:d0,d1;...` for every graph input (GE order); dims that vary are -1."""
    values = _gear_values(buckets, batch_sizes)
    return ";".join(f"{t.name}:" + ",".join(_dim_text(d, values) for d in t.shape)
                    for t in ge_inputs(sig))


def ge_dynamic_dims(sig: GraphSignature, buckets: Sequence[int],
                    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES) -> Optional[str]:
    """One `;`-separated gear per (batch, bucket); each lists a value per -1 of
    `ge_input_shape`, in its order. None when there is a single gear: GE refuses
    dynamicDims with fewer than 2 gears (E10035, CheckDynamicParams in
    multi_batch_options.cc), so one gear is written as static shapes instead."""
    values = _gear_values(buckets, batch_sizes)
    rows: list[str] = []
    for batch, length in gears(buckets, batch_sizes):
        gear = {BATCH: batch, SEQ: min(buckets), KV_LEN: length}
        row = ",".join(str(gear[d]) for t in ge_inputs(sig) for d in t.shape
                       if _dim_text(d, values) == "-1")
        if row not in rows:  # a resident graph has no kv_len: one gear per batch size
            rows.append(row)
    if len(rows) < 2:
        return None
    return ";".join(rows)


def _ini_parser() -> configparser.ConfigParser:
    """configparser keeping key case (GE's keys are camelCase) and no interpolation."""
    parser = configparser.ConfigParser(interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment]
    return parser


def lite_config(sig: GraphSignature, buckets: Sequence[int],
                batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
                rank_table_file: Optional[str] = None) -> str:
    """The ini text for one rank's graph."""
    context = {"plugin_custom_ops": "All", "provider": "ge"}
    if rank_table_file:
        context["rank_table_file"] = rank_table_file
    graph = {"ge.inputShape": ge_input_shape(sig, buckets, batch_sizes)}
    dims = ge_dynamic_dims(sig, buckets, batch_sizes)
    if dims is not None:
        graph.update({"ge.dynamicDims": dims, "ge.dynamicNodeType": "1"})
    parser = _ini_parser()
    parser.read_dict({"ascend_context": context, "ge_session_options": dict(SESSION_OPTIONS),
                      "ge_graph_options": graph})
    out = io.StringIO()
    parser.write(out, space_around_delimiters=False)
    return out.getvalue()


def parse_ini(text: str) -> dict[str, dict[str, str]]:
    """Sections -> {key: value}, case kept (for tests and for checking a config)."""
    parser = _ini_parser()
    parser.read_string(text)
    return {name: dict(parser[name]) for name in parser.sections()}


# ---- rank table ---------------------------------------------------------------------
def rank_table(tp: int, device_ids: Optional[Sequence[int]] = None,
               device_ips: Optional[Sequence[str]] = None) -> dict:
    """HCCL rank table v1.0 for one host: rank r runs on device_ids[r].

    device_ip is each NPU's own NIC address (`hccn_tool -i <device> -ip -g`); unknown
    here, so it is a placeholder the user fills in (or deletes: the Qwen3 Lite example
    ran single-host TP with no device_ip at all). `check_rank_table` refuses a table
    that still holds a placeholder, naming the command.
    """
    devices = list(range(tp)) if device_ids is None else [int(d) for d in device_ids]
    if len(devices) != tp or len(set(devices)) != tp:
        raise LiteBuildError(f"need {tp} distinct device ids for tp {tp}, got {devices}")
    ips = list(device_ips) if device_ips else [DEVICE_IP_PLACEHOLDER.format(device=d)
                                               for d in devices]
    device = [{"device_id": str(d), "device_ip": ip, "rank_id": str(r)}
              for r, (d, ip) in enumerate(zip(devices, ips))]
    return {"version": "1.0", "server_count": "1", "status": "completed",
            "server_list": [{"server_id": "127.0.0.1", "device": device,
                             "host_nic_ip": "reserve"}]}


# ---- converter ----------------------------------------------------------------------
@dataclass(frozen=True)
class Converter:
    path: Path
    env: dict[str, str] = field(default_factory=dict)  # additions (LD_LIBRARY_PATH)


def _with_lib(path: Path, env: Mapping[str, str]) -> Converter:
    """converter_lite needs its package's tools/converter/lib on LD_LIBRARY_PATH."""
    real = path.resolve()
    lib = real.parent.parent / "lib"  # <home>/tools/converter/{converter,lib}
    if real.parent.name != "converter" or not lib.is_dir():
        return Converter(path)
    old = env.get("LD_LIBRARY_PATH", "")
    return Converter(path, {"LD_LIBRARY_PATH": f"{lib}:{old}" if old else str(lib)})


def find_converter(env: Optional[Mapping[str, str]] = None) -> Optional[Converter]:
    """converter_lite on PATH, else under $MSLITE_HOME (or $MSLITE_HOME_PATH); or None."""
    env = os.environ if env is None else env
    found = shutil.which(CONVERTER, path=env.get("PATH", ""))
    if found:
        return _with_lib(Path(found), env)
    for name in HOME_ENVS:
        if env.get(name):
            candidate = Path(env[name]) / CONVERTER_IN_HOME
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return _with_lib(candidate, env)
    return None


def find_cann(env: Optional[Mapping[str, str]] = None) -> Optional[Path]:
    """The CANN toolkit set_env.sh announced (ASCEND_HOME_PATH / ASCEND_TOOLKIT_HOME), or None."""
    env = os.environ if env is None else env
    for name in CANN_ENVS:
        if env.get(name) and Path(env[name]).is_dir():
            return Path(env[name])
    return None


def converter_args(mindir: str, out_stem: str, config_ini: str) -> list[str]:
    """Flags per converter_tool.md; the output name gets `.mindir` (or `_graph.mindir`)."""
    return ["--fmk=MINDIR", f"--modelFile={mindir}", f"--outputFile={out_stem}",
            "--saveType=MINDIR", "--optimize=ascend_oriented", f"--configFile={config_ini}"]


def convert(mindir: Path, out_stem: Path, config_ini: Path, converter: Converter,
            run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
            cwd: Optional[Path] = None) -> Path:
    """Run converter_lite on one graph; return the written file or raise with its output.

    `cwd` is the directory relative paths in the ini resolve against: the rank table's
    `rank_table_file` reaches GE as ge.exec.rankTableFile, opened from the process's
    working directory (the artifacts directory; the generated script cd's there too)."""
    cmd = [str(converter.path), *converter_args(str(mindir), str(out_stem), str(config_ini))]
    try:
        proc = run(cmd, env={**os.environ, **converter.env}, capture_output=True, text=True,
                   cwd=None if cwd is None else str(cwd))
    except OSError as e:
        raise LiteBuildError(f"{converter.path}: cannot run ({e.strerror})") from None
    out = converted_file(out_stem)
    if proc.returncode != 0 or out is None:
        text = proc.stdout + proc.stderr
        tail = "\n".join(text.strip().splitlines()[-15:])
        error = MissingCannError if MISSING_CANN.search(text) else LiteBuildError
        raise error(f"converter_lite failed on {mindir} (exit {proc.returncode}"
                             f"{'' if out else ', no output file'}):\n{tail}")
    return out


def convert_script(jobs: Sequence[tuple[str, str, str]]) -> str:
    """A bash script converting every (mindir, out_stem, ini), paths relative to itself."""
    lines = [
        "#!/usr/bin/env bash",
        "# Written by `dsexport build --target ascend`: the graphs could not be converted on",
        "# the build host (see its notice). Run this on the Ascend host, after",
        "# `source <CANN>/set_env.sh`, with",
        "# converter_lite on PATH or MSLITE_HOME=<unpacked mindspore-lite-*-linux-*.tar.gz>.",
        "# The runtime picks the converted files up by name; without them it loads the",
        "# MindSpore MindIR directly (slower first build).",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        'CONV="${CONV:-$(command -v converter_lite || true)}"',
        'HOME_DIR="${MSLITE_HOME:-${MSLITE_HOME_PATH:-}}"',
        'if [ -z "$CONV" ] && [ -n "$HOME_DIR" ]; then',
        f'  CONV="$HOME_DIR/{CONVERTER_IN_HOME}"',
        "fi",
        'if [ -z "$CONV" ] || [ ! -x "$CONV" ]; then',
        '  echo "converter_lite not found: put it on PATH or set MSLITE_HOME" >&2; exit 1',
        "fi",
        'case "$(dirname "$CONV")" in */converter)  # <home>/tools/converter/{converter,lib}',
        '  LIB="$(cd "$(dirname "$CONV")/../lib" 2>/dev/null && pwd || true)"',
        '  if [ -n "$LIB" ]; then export LD_LIBRARY_PATH="$LIB:${LD_LIBRARY_PATH:-}"; fi;;',
        "esac",
    ]
    for mindir, stem, ini in jobs:
        lines.append(f'echo "converting {mindir}"')
        lines.append('"$CONV" ' + " ".join(converter_args(mindir, stem, ini)))
    lines.append('echo "all graphs converted"')
    return "\n".join(lines) + "\n"


# ---- the stage ----------------------------------------------------------------------
def _convert_all(art_dir: Path, jobs: Sequence[tuple[str, str, str]], entries: list[dict],
                 env: Optional[Mapping[str, str]],
                 run: Callable[..., subprocess.CompletedProcess]) -> Optional[str]:
    """Convert every (mindir, stem, ini) job, updating its entry; None when all were.

    Otherwise returns why the conversion was left to the script: no converter_lite, no
    CANN beside it (ascend_oriented optimisation runs GE), or a conversion that failed
    for lack of CANN. Any other converter failure is an error: the graph is at fault.
    """
    converter = find_converter(env)
    if converter is None:
        return "converter_lite not found (PATH, $MSLITE_HOME)"
    if find_cann(env) is None:
        return (f"converter_lite found ({converter.path}) but no CANN set up here "
                f"({' / '.join(CANN_ENVS)} unset: `source <CANN>/set_env.sh`), and "
                "--optimize=ascend_oriented needs it")
    root = art_dir.resolve()  # absolute: the converter runs with cwd = root
    for (src, stem, ini), entry in zip(jobs, entries):
        try:
            out = convert(root / src, root / stem, root / ini, converter, run, cwd=root)
        except MissingCannError as e:
            for (_, old_stem, _), done in zip(jobs, entries):  # leave no partial output
                leftover = converted_file(art_dir / old_stem)
                if leftover is not None:
                    leftover.unlink()
                done.update(stage="mindir", lite_file=done["lite_stem"] + ".mindir")
            return (f"converter_lite ({converter.path}) failed for lack of CANN "
                    f"({str(e).splitlines()[-1].strip()})")
        entry.update(stage="lite", lite_file=out.relative_to(root).as_posix())
    return None


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.write_text(text, encoding="utf-8")
    os.chmod(path, mode)


def _check_signature(g: dict, sig: GraphSignature) -> None:
    """The manifest's recorded inputs must be the signature's (names, shapes, dtypes)."""
    if "inputs" in g and g["inputs"] != sig.to_dict()["inputs"]:
        raise LiteBuildError(f"{g['file']}: recorded inputs differ from "
                             f"graph_signature({sig.kind!r}); rebuild the MindIR")


def lite_stage(art_dir: Path, manifest_data: dict, buckets: Optional[Sequence[int]] = None,
               batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
               device_ids: Optional[Sequence[int]] = None,
               env: Optional[Mapping[str, str]] = None,
               run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
               shown_as: Optional[str] = None) -> dict:
    """Write inis (+ rank table), convert or script it; return what the manifest records.

    Returns {"section": {...} for manifest["lite"], "graphs": {"rank<R>/<kind>":
    {"stage", "lite_file", "lite_stem", "config"}}, "notice": str or None,
    "kv_cache": {"slots", "capacity"} of a resident cache (else {}) for manifest["kv_cache"]}.
    All paths are relative to `art_dir`; the notice names the directory `shown_as`
    (default: art_dir's name; a build passes its final --out, not the staging dir).
    """
    art_dir = Path(art_dir)
    shown = shown_as or art_dir.name
    cfg = ModelConfig.from_dict(manifest_data["model"])
    tp = int(manifest_data["tp"])
    dtype = manifest_data["kv_cache"]["dtype"]  # the signatures carry the cache dtype
    mode = manifest_data["kv_cache"].get("cache_mode", "window")
    buckets = _positive_sorted(buckets or manifest_data.get("buckets") or [], "--buckets")
    gears(buckets, batch_sizes)  # validate the gear count early
    table = None
    if tp > 1:
        table = RANK_TABLE_NAME
        _write(art_dir / table, json.dumps(rank_table(tp, device_ids), indent=2) + "\n")
    entries, jobs = {}, []
    for g in manifest_data["graphs"]:
        sig = graph_signature(g["kind"], cfg, tp, dtype, mode)
        _check_signature(g, sig)
        src = Path(g["file"])
        ini = src.parent / f"{g['kind']}.ini"
        stem = src.parent / f"{g['kind']}{LITE_SUFFIX}"
        _write(art_dir / ini, lite_config(sig, buckets, batch_sizes, table))
        entries[f"rank{g['rank']}/{g['kind']}"] = {
            "stage": "mindir", "lite_stem": stem.as_posix(),
            "lite_file": stem.as_posix() + ".mindir", "config": ini.as_posix()}
        jobs.append((src.as_posix(), stem.as_posix(), ini.as_posix()))
    why_not = _convert_all(art_dir, jobs, list(entries.values()), env, run)
    notice = script = None
    if why_not is not None:
        script = SCRIPT_NAME
        _write(art_dir / script, convert_script(jobs), 0o755)
        notice = (f"{why_not}: the graphs stay MindSpore MindIR, which mindspore_lite can "
                  f"load directly. To convert them, run {shown}/{script} on the Ascend host.")
    if table:
        notice = ((notice + " ") if notice else "") + (
            f"Fill in device_ip in {shown}/{table} (`hccn_tool -i <device> -ip -g`) "
            "or delete those fields.")
    section = {"buckets": buckets, "batch_sizes": _positive_sorted(batch_sizes, "batch sizes"),
               "rank_table": table, "script": script}
    kv_cache = {}
    if mode == RESIDENT:
        kv_cache = dict(zip(("slots", "capacity"), resident_dims(buckets, batch_sizes)))
    return {"section": section, "graphs": entries, "notice": notice, "kv_cache": kv_cache}


def apply_lite_entries(graphs: list[dict], result: dict) -> None:
    """Merge `lite_stage`'s per-graph entries into the manifest's `graphs` list."""
    for g in graphs:
        g.update(result["graphs"][f"rank{g['rank']}/{g['kind']}"])



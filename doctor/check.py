"""The doctor's end-to-end check: the tiny model built for a target at tp 1 and 2, run,
timed, and compared with a reference run (greedy tokens, and logits under teacher
forcing with the reference's tokens, so every run scores the same sequence)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from dsflow.artifacts.lite import RANK_TABLE_NAME
from dsflow.common.errors import DsflowError

PROMPT = "def quick_sort(arr):"
NEW_TOKENS = 8
MAX_SEQ = 64
ASCEND_BUCKETS = [32, 64]  # the prompt (< 32 tokens) and its cache (+8) each fit a gear
# max |logit difference| / max(1, max |reference logit|): fp32 vs fp32 at another tp
# differs only by summation order; bf16 weights with fp16 attention vs fp32 by ~1e-2.
TOLERANCE = {"cpu": 1e-4, "ascend": 5e-2}


@dataclass
class Run:
    target: str
    tp: int
    build_s: float = 0.0
    startup_s: float = 0.0
    warm_up_s: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    tokens: list[int] = field(default_factory=list)
    logits: Optional[np.ndarray] = None  # [1 + NEW_TOKENS, vocab]
    error: Optional[str] = None

    @property
    def name(self) -> str:
        return f"{self.target} tp{self.tp}"

    def timings(self) -> str:
        warm = f", warm-up {self.warm_up_s:.1f} s" if self.warm_up_s else ""
        return (f"build {self.build_s:.1f} s, start-up {self.startup_s:.1f} s{warm}, "
                f"prefill {self.prefill_ms:.0f} ms, decode {self.decode_ms:.1f} ms/token")


def _build(checkpoint: Path, out: Path, target: str, tp: int,
           device_ids: Optional[Sequence[int]], cache_mode: Optional[str]) -> None:
    from dsflow.export.pipeline.build import BuildOptions, build
    build(BuildOptions(model_dir=checkpoint, out=out, tp=tp, target=target, max_seq_len=MAX_SEQ,
                       buckets=ASCEND_BUCKETS if target == "ascend" else None,
                       device_ids=list(device_ids) if device_ids else None,
                       cache_mode=cache_mode))
    if target == "ascend" and tp > 1:
        _single_host_rank_table(out / RANK_TABLE_NAME)


def _single_host_rank_table(path: Path) -> None:
    """The build leaves device_ip placeholders for the user to fill in; on one host
    HCCL runs without them (docs/ASCEND.md section 4), so the doctor deletes them."""
    table = json.loads(path.read_text(encoding="utf-8"))
    for server in table["server_list"]:
        for device in server["device"]:
            device.pop("device_ip", None)
    path.write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")


def _execute(run: Run, artifacts: Path, device_ids: Optional[Sequence[int]],
             forced: Optional[list[int]]) -> None:
    from dsflow.runtime.engine import Engine
    from dsflow.runtime.sampling import SamplingParams
    with Engine(artifacts, device=run.target, device_ids=device_ids) as engine:
        run.startup_s = engine.startup_s
        run.warm_up_s = max(r.get("warm_up_s", 0.0) for r in engine.cluster.ready)
        ids = engine.encode(PROMPT)
        done = engine.generate([ids], SamplingParams(max_new_tokens=NEW_TOKENS,
                                                     ignore_eos=True))[0]
        run.tokens = list(done.token_ids)
        run.prefill_ms, run.decode_ms = done.prefill_ms, done.decode_ms_per_token
        run.logits = engine.forced_logits([ids], [forced or run.tokens])[0]


def run_target(checkpoint: Path, work: Path, target: str, tp: int,
               device_ids: Optional[Sequence[int]] = None,
               forced: Optional[list[int]] = None, cache_mode: Optional[str] = None) -> Run:
    """Build and run one (target, tp); any failure is recorded in `Run.error`.
    `cache_mode` None: the build's default (on Ascend: the exporting MindSpore's)."""
    run = Run(target, tp)
    out = work / f"{target}-tp{tp}"
    try:
        t0 = time.perf_counter()
        _build(checkpoint, out, target, tp, device_ids, cache_mode)
        run.build_s = time.perf_counter() - t0
        _execute(run, out, device_ids, forced)
    except DsflowError as e:
        run.error = str(e)
    except Exception as e:  # reported in one line: the doctor never shows a traceback
        run.error = f"{type(e).__name__}: {e}"
    return run


def compare(ref: Run, run: Run) -> tuple[bool, str]:
    """(agrees, one line): logits within the target's tolerance and the same greedy
    tokens, except where the reference itself had a near-tie (top-2 margin within the
    tolerance), which a lower precision may legitimately break the other way."""
    if run.error or ref.error:
        return False, "not compared (a run failed)"
    scale = max(1.0, float(np.abs(ref.logits).max()))
    diff = float(np.abs(run.logits - ref.logits).max()) / scale
    tol = TOLERANCE[run.target]
    ok = diff <= tol
    text = f"logits max |diff| {diff:.2e} of scale {scale:.2f} (tolerance {tol:.0e})"
    mismatch = next((i for i, (a, b) in enumerate(zip(ref.tokens, run.tokens)) if a != b), None)
    if mismatch is None:
        return ok, f"tokens identical to {ref.name}; {text}"
    top2 = np.sort(ref.logits[mismatch])[-2:]
    margin = float(top2[1] - top2[0]) / scale
    tie = margin <= tol
    return ok and tie, (f"tokens differ from {ref.name} at step {mismatch} (reference margin "
                        f"{margin:.2e}: {'a near-tie, tolerated' if tie else 'NOT a tie'}); "
                        f"{text}")

"""How many sequences the KV cache holds and how long each may grow (`SlotPlan`), from
the artifacts and the options (`plan_slots`); the step-token budget."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from dsflow.artifacts.manifest import Manifest
from dsflow.common.errors import DsflowError
from dsflow.graphs.signatures import INPLACE, RESIDENT
from dsflow.runtime.sampling import SamplingParams
from dsflow.runtime.slot_cache import KV_ALIGN, SEQ_ALIGN, CacheLimitError, gear

DEFAULT_MAX_BATCH = 8
# Without --max-batch / --cache-mb the slots are capped by this budget per rank (at
# least one slot): 8 x 16K tokens of a 1.3B fp32 model would be 51 GiB of address space.
DEFAULT_CACHE_MB = 4096
DEFAULT_PREFILL_CHUNK = 256
# Tokens per step (decodes + prefill) while sequences decode; see prefill_budget.
DEFAULT_STEP_TOKENS = 64
# On ONNX Runtime (the in-place cache) a step costs its graph calls more than its tokens:
# every call streams all the weights (~14 ms of a 20 ms batch-8 step, 125M fp32), and a
# chunk after a past is a call of its own (GroupQueryAttention's CPU limit). Fewer, larger
# chunks: 8 streaming clients kept ITL p99 <= 2.5x one client's in 7 of 7 runs at 128 (4
# of 6 at 64) and >= 5x its tokens/s as well in 5 of 7 (3 of 6 at 64; docs/BENCHMARKS.md,
# "Serving on the ONNX backend").
STEP_TOKENS_BY_CACHE_MODE = {INPLACE: 128}


@dataclass(frozen=True)
class SlotPlan:
    """How many sequences the cache holds (slots), how long each may grow (capacity),
    and the prompt tokens per prefill step."""
    slots: int
    capacity: int
    prefill_chunk: int
    bytes_per_token: int  # per rank, keys and values
    buckets: Optional[tuple[int, ...]] = None
    step_tokens: int = DEFAULT_STEP_TOKENS
    copies: int = 1  # 2 for a resident cache: the graphs' input and output pairs

    @property
    def cache_bytes(self) -> int:
        return self.copies * self.slots * self.capacity * self.bytes_per_token

    def describe(self) -> str:
        copies = " (two copies: resident ping-pong)" if self.copies == 2 else ""
        return (f"KV cache: {self.slots} sequences x {self.capacity} tokens = "
                f"{self.cache_bytes / 2**20:.0f} MiB per rank{copies}; prefill chunk "
                f"{self.prefill_chunk} tokens, {self.step_tokens} tokens per step while "
                "decoding")

    def prefill_budget(self, decoding: int) -> int:
        """Prompt tokens one step may prefill while `decoding` sequences decode: the
        whole chunk when none do; else what the step budget leaves after the decodes,
        in whole SEQ_ALIGN units (a chunk is padded to one anyway), and at least one
        unit so that prompts always progress. With shape buckets (Ascend) the chunk is
        the prefill graphs' one seq gear, so the budget does not apply."""
        if decoding == 0 or self.buckets:
            return self.prefill_chunk
        left = (self.step_tokens - decoding) // SEQ_ALIGN * SEQ_ALIGN
        return min(self.prefill_chunk, max(SEQ_ALIGN, left))

    def check_fits(self, prompt_len: int, params: SamplingParams) -> None:
        need = prompt_len + params.max_new_tokens
        if need > self.capacity:
            raise CacheLimitError(
                f"prompt ({prompt_len} tokens) + max new tokens ({params.max_new_tokens}) = "
                f"{need} exceeds the maximum sequence length of this engine "
                f"({self.capacity}); shorten the prompt, lower --max-new-tokens, or raise "
                "--max-seq-len (up to the artifacts' limit)")
        if params.n > self.slots:
            raise CacheLimitError(f"n = {params.n} samples exceed the {self.slots} sequences "
                                  "the cache holds (--max-batch / --cache-mb)")

    def window(self, longest: int) -> int:
        """kv_len of a step whose rows hold at most `longest` positions."""
        return min(gear(longest, self.buckets, KV_ALIGN), self.capacity)

    def chunk_len(self, longest: int) -> int:
        return gear(longest, self.buckets, SEQ_ALIGN)


def plan_slots(manifest: Manifest, max_batch: Optional[int] = None,
               max_seq_len: Optional[int] = None, cache_mb: Optional[float] = None,
               prefill_chunk: Optional[int] = None,
               max_step_tokens: Optional[int] = None) -> SlotPlan:
    """Slots and capacity from the options: capacity = --max-seq-len (default and limit:
    the artifacts' max_seq_len); slots = --max-batch, or as many as --cache-mb holds
    (both: the smaller), default 8 within DEFAULT_CACHE_MB. With shape buckets (Ascend)
    the capacity is rounded up to a bucket, slots are capped by the largest batch gear
    and chunks by the smallest bucket (export/pipeline/lite_build.py gears). A resident
    cache counts twice (input and output pairs); one built for GE has its slots and
    capacity fixed (`_pinned_plan`)."""
    if manifest.resident_shape:
        return _pinned_plan(manifest, max_batch, max_seq_len, cache_mb, prefill_chunk,
                            max_step_tokens)
    copies = 2 if manifest.cache_mode == RESIDENT else 1
    limit = manifest.max_seq_len
    capacity = max_seq_len or limit
    if not 2 <= capacity <= limit:
        raise DsflowError(f"--max-seq-len {capacity}: must be in 2..{limit} (the artifacts' "
                          "max_seq_len; rebuild with a larger --max-seq-len)")
    buckets = tuple(manifest.buckets) if manifest.buckets else None
    if buckets:
        capacity = gear(capacity, buckets, 1, "--max-seq-len")
    per_token = manifest.kv_bytes_per_token * copies  # per slot position, all copies
    if max_batch is not None and max_batch < 1:
        raise DsflowError(f"--max-batch {max_batch}: must be >= 1")
    slots = max_batch or DEFAULT_MAX_BATCH
    if max_batch is None and cache_mb is None:
        slots = max(1, min(slots, DEFAULT_CACHE_MB * 2**20 // (capacity * per_token)))
    if cache_mb is not None:
        fit = int(cache_mb * 2**20 // (capacity * per_token))
        if fit < 1:
            raise DsflowError(f"--cache-mb {cache_mb}: too small for one sequence of "
                              f"{capacity} tokens ({capacity * per_token / 2**20:.1f} MiB "
                              "per rank); raise it or lower --max-seq-len")
        slots = min(max_batch, fit) if max_batch else fit
    gears = manifest.lite.get("batch_sizes")
    if gears:
        slots = min(slots, max(gears))
    return SlotPlan(slots, capacity, _chunk(prefill_chunk, buckets), manifest.kv_bytes_per_token,
                    buckets, _step(max_step_tokens, manifest.cache_mode), copies)


def _chunk(prefill_chunk: Optional[int], buckets: Optional[tuple[int, ...]]) -> int:
    chunk = prefill_chunk or DEFAULT_PREFILL_CHUNK
    if chunk < 1:
        raise DsflowError(f"--prefill-chunk {chunk}: must be >= 1")
    if buckets:  # the prefill graphs have one chunk gear: the smallest bucket
        chunk = min(chunk, buckets[0])
    return chunk


def _pinned_plan(manifest: Manifest, max_batch: Optional[int], max_seq_len: Optional[int],
                 cache_mb: Optional[float], prefill_chunk: Optional[int],
                 max_step_tokens: Optional[int]) -> SlotPlan:
    """A resident cache built for GE has its slots and capacity fixed in the graphs
    (export/pipeline/lite_build.py resident_dims): options may restate them, not change
    them, and --cache-mb may only refuse them."""
    slots, capacity = manifest.resident_shape
    fixed = "(dsexport build --batch-sizes / --buckets); rebuild to change it"
    for option, value, built in (("--max-batch", max_batch, slots),
                                 ("--max-seq-len", max_seq_len, capacity)):
        if value is not None and value != built:
            raise DsflowError(f"{option} {value}: these artifacts keep the KV cache on the "
                              f"device as {slots} slots x {capacity} positions, fixed at "
                              f"build {fixed}")
    buckets = tuple(manifest.buckets) if manifest.buckets else None
    plan = SlotPlan(slots, capacity, _chunk(prefill_chunk, buckets),
                    manifest.kv_bytes_per_token, buckets, _step(max_step_tokens), copies=2)
    if cache_mb is not None and plan.cache_bytes > cache_mb * 2**20:
        raise DsflowError(f"--cache-mb {cache_mb}: the device-resident cache of these "
                          f"artifacts needs {plan.cache_bytes / 2**20:.0f} MiB per rank "
                          f"({slots} slots x {capacity} positions, two copies) {fixed}")
    return plan


def _step(max_step_tokens: Optional[int], cache_mode: Optional[str] = None) -> int:
    default = STEP_TOKENS_BY_CACHE_MODE.get(cache_mode, DEFAULT_STEP_TOKENS)
    step = default if max_step_tokens is None else max_step_tokens
    if step < 1:
        raise DsflowError(f"--max-step-tokens {step}: must be >= 1")
    return step

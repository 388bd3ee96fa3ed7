"""The coordinator and the Python API: open artifacts once, generate many times.

    from dsflow.runtime import Engine, SamplingParams
    with Engine("dsflow-artifacts") as engine:
        for event in engine.stream(["def fib(n):"], SamplingParams(max_new_tokens=64)):
            print(event.text, end="", flush=True)
        results = engine.generate(["# quick sort in C"], SamplingParams(temperature=0.7))

One batch runs at a time: prompts of a call are right-padded into one prefill, then
decoded in lockstep until every sequence has stopped.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from dsflow.artifacts.manifest import Manifest, read_manifest
from dsflow.common.errors import DsflowError
from dsflow.runtime.cluster import Cluster
from dsflow.runtime.kv_cache import plan_shapes
from dsflow.runtime.sampling import Sampler, SamplingParams
from dsflow.runtime.tokenizer import IncrementalDecoder, Tokenizer

log = logging.getLogger("dsflow.engine")

Prompt = Union[str, Sequence[int]]


@dataclass
class Completion:
    index: int
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: Optional[str] = None  # "stop" or "length"
    prefill_ms: float = 0.0
    decode_ms_per_token: float = 0.0
    time_to_first_token_ms: float = 0.0

    def to_dict(self) -> dict:
        return {"index": self.index, "prompt_token_ids": self.prompt_token_ids,
                "token_ids": self.token_ids, "text": self.text,
                "finish_reason": self.finish_reason,
                "timings": {"prefill_ms": round(self.prefill_ms, 3),
                            "decode_ms_per_token": round(self.decode_ms_per_token, 3),
                            "time_to_first_token_ms": round(self.time_to_first_token_ms, 3)}}


@dataclass
class StreamEvent:
    """New text of one sequence; `finished` is set on its last event."""
    index: int
    text: str
    token_ids: list[int]
    finished: Optional[Completion] = None


class _SequenceState:
    """Per-sequence bookkeeping: stop conditions and stop-string-safe streaming."""

    def __init__(self, completion: Completion, tokenizer: Tokenizer, params: SamplingParams):
        self.c = completion
        self.params = params
        self.eos = frozenset() if params.ignore_eos else tokenizer.eos_ids
        self.detok = IncrementalDecoder(tokenizer)
        self.emitted = 0  # characters of c.text already streamed
        self.holdback = max((len(s) for s in params.stop), default=0)

    @property
    def done(self) -> bool:
        return self.c.finish_reason is not None

    def add(self, token: int) -> str:
        """Record one token; return the text that can be streamed now."""
        self.c.token_ids.append(token)
        if token in self.eos:
            self.c.token_ids.pop()  # stop token: not part of the output
            self.c.finish_reason = "stop"
            self.c.text += self.detok.flush()
            return self._release(final=True)
        self.c.text += self.detok.push(token)
        if self._cut_at_stop_string():
            return self._release(final=True)
        if len(self.c.token_ids) >= self.params.max_new_tokens:
            self.c.finish_reason = "length"
            self.c.text += self.detok.flush()
            self._cut_at_stop_string()
            return self._release(final=True)
        return self._release(final=False)

    def _cut_at_stop_string(self) -> bool:
        start = max(0, self.emitted - self.holdback)
        hits = [i for i in (self.c.text.find(s, start) for s in self.params.stop) if i >= 0]
        if not hits:
            return False
        self.c.text = self.c.text[:min(hits)]
        self.c.finish_reason = "stop"
        return True

    def _release(self, final: bool) -> str:
        """Text not yet streamed, minus a tail that could still become a stop string."""
        end = len(self.c.text)
        if not final and self.params.stop:
            for k in range(min(self.holdback - 1, end), 0, -1):
                tail = self.c.text[end - k:]
                if any(s.startswith(tail) for s in self.params.stop):
                    end -= k
                    break
        out = self.c.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return out


def check_device(manifest: Manifest, device: Optional[str],
                 device_ids: Optional[Sequence[int]]) -> str:
    """The device to run on; refuses graphs that cannot run there, before any worker starts."""
    target = manifest.target
    device = device or target
    if device not in ("cpu", "ascend"):
        raise DsflowError(f"--device {device}: unknown (choose cpu or ascend)")
    if device != target:
        why = ("their fused Ascend operators have no CPU kernels" if target == "ascend"
               else "Ascend runs the Lite models built with --target ascend")
        raise DsflowError(f"{manifest.root} was built with --target {target}; it cannot run "
                          f"on --device {device} ({why}); rebuild with --target {device}")
    if device_ids is not None:
        if device == "cpu":
            raise DsflowError("--devices applies to --device ascend only")
        if len(device_ids) != manifest.tp or len(set(device_ids)) != len(device_ids):
            raise DsflowError(f"--devices needs {manifest.tp} distinct card ids (one per "
                              f"rank, tp={manifest.tp}), got {list(device_ids)}")
    return device


class Engine:
    """Artifacts loaded into tp worker processes, ready to generate."""

    def __init__(self, artifacts: Union[str, Path] = "dsflow-artifacts", verbose: bool = False,
                 verify: bool = False, device: Optional[str] = None,
                 device_ids: Optional[Sequence[int]] = None):
        """device: "cpu" or "ascend" (default: what the artifacts were built for);
        device_ids: the card of each rank on Ascend (default 0..tp-1)."""
        self.manifest: Manifest = read_manifest(artifacts)
        self.manifest.check_signatures()
        if verify:
            self.manifest.verify()
        self.device = check_device(self.manifest, device, device_ids)
        cfg = self.manifest.config
        self.tokenizer = Tokenizer(self.manifest.tokenizer_dir(),
                                   extra_eos_ids=[cfg.eos_token_id] if cfg.eos_token_id is not None
                                   else [])
        self.vocab_limit = min(self.tokenizer.vocab_size, cfg.vocab_size)
        # filler for padded prompt slots and finished sequences: any valid row will do
        self.pad_id = self.tokenizer.pad_id if self.tokenizer.pad_id < cfg.vocab_size else 0
        self._lock = threading.Lock()
        t0 = time.perf_counter()
        self.cluster = Cluster(self.manifest.root, self.manifest.tp, verbose=verbose,
                               device=self.device, device_ids=device_ids).start()
        self.startup_s = time.perf_counter() - t0

    # ---- prompts --------------------------------------------------------------
    def encode(self, prompt: Prompt, chat: bool = False) -> list[int]:
        if not isinstance(prompt, str):
            return [int(t) for t in prompt]
        return self.tokenizer.encode_chat(prompt) if chat else self.tokenizer.encode(prompt)

    # ---- generation -------------------------------------------------------------
    def stream(self, prompts: Union[Prompt, Sequence[Prompt]],
               params: SamplingParams = SamplingParams(), chat: bool = False
               ) -> Iterator[StreamEvent]:
        """Yield text as it is generated, for every prompt of one batch."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = [self.encode(p, chat) for p in prompts]
        if not ids or any(len(p) == 0 for p in ids):
            raise DsflowError("empty prompt: give at least one token of text")
        bad = [t for p in ids for t in p if not 0 <= t < self.manifest.config.vocab_size]
        if bad:
            raise DsflowError(f"prompt token id {bad[0]} is outside the vocabulary "
                              f"(0..{self.manifest.config.vocab_size - 1})")
        sampler = Sampler(params, self.vocab_limit)
        with self._lock:
            yield from self._run_batch(ids, params, sampler)

    def generate(self, prompts: Union[Prompt, Sequence[Prompt]],
                 params: SamplingParams = SamplingParams(), chat: bool = False
                 ) -> list[Completion]:
        done = [e.finished for e in self.stream(prompts, params, chat) if e.finished]
        return sorted(done, key=lambda c: c.index)

    def _gather_logits(self, op: str, payload: dict) -> np.ndarray:
        return np.concatenate(self.cluster.request(op, payload), axis=1)

    def _prefill(self, ids: list[list[int]], max_new_tokens: int) -> np.ndarray:
        """Right-pad the prompts into one batch, run prefill on every rank, size the
        cache for `max_new_tokens`; returns the gathered last-token logits."""
        seq, kv_len = plan_shapes(max(len(p) for p in ids), max_new_tokens,
                                  self.manifest.max_seq_len, self.manifest.buckets)
        batch = np.full((len(ids), seq), self.pad_id, np.int32)
        for b, p in enumerate(ids):
            batch[b, :len(p)] = p
        lengths = np.array([len(p) for p in ids], np.int32)
        return self._gather_logits("prefill", {"input_ids": batch, "valid_length": lengths,
                                               "kv_len": kv_len})

    def _decode(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return self._gather_logits("decode", {"input_ids": tokens.astype(np.int32),
                                              "positions": positions.astype(np.int32)})

    def _release(self) -> None:
        if not self.cluster.failed and not self.cluster.busy:
            self.cluster.request("release", {})

    def forced_logits(self, prompts: Sequence[Sequence[int]],
                      forced: Sequence[Sequence[int]]) -> np.ndarray:
        """Logits after each prompt and after each given next token (teacher forcing):
        [batch, 1 + n, vocab]. For parity checks and scoring; all `forced` lists must
        have the same length n."""
        n = len(forced[0])
        if any(len(f) != n for f in forced) or len(forced) != len(prompts):
            raise DsflowError("forced_logits: one continuation per prompt, all the same length")
        ids = [list(map(int, p)) for p in prompts]
        vocab = self.manifest.config.vocab_size
        with self._lock:
            try:
                out = [self._prefill(ids, max(n, 1))[:, :vocab]]
                positions = np.array([len(p) for p in ids])
                for step in range(n):
                    tokens = np.array([f[step] for f in forced])
                    out.append(self._decode(tokens, positions + step)[:, :vocab])
            finally:
                self._release()
        return np.stack(out, axis=1)

    def _run_batch(self, ids: list[list[int]], params: SamplingParams,
                   sampler: Sampler) -> Iterator[StreamEvent]:
        states = [_SequenceState(Completion(b, list(p)), self.tokenizer, params)
                  for b, p in enumerate(ids)]
        t0 = time.perf_counter()
        try:
            logits = self._prefill(ids, params.max_new_tokens)
            prefill_ms = (time.perf_counter() - t0) * 1e3
            for s in states:
                s.c.prefill_ms = s.c.time_to_first_token_ms = prefill_ms
            positions = np.array([len(p) for p in ids])  # where each next token goes
            steps, t_decode = 0, time.perf_counter()
            while True:
                tokens = sampler(logits)
                for s, tok in zip(states, tokens):
                    if s.done:
                        continue
                    text = s.add(int(tok))
                    if s.done:
                        s.c.decode_ms_per_token = ((time.perf_counter() - t_decode) * 1e3
                                                   / max(steps, 1))
                    yield StreamEvent(s.c.index, text, [int(tok)], s.c if s.done else None)
                active = np.array([not s.done for s in states])
                if not active.any():
                    break
                # finished sequences keep feeding a token at a frozen position: harmless
                logits = self._decode(np.where(active, tokens, self.pad_id), positions)
                positions = positions + active
                steps += 1
        finally:
            self._release()

    # ---- lifetime -----------------------------------------------------------------
    def close(self) -> None:
        self.cluster.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

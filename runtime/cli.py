"""`dsrun`: generate text from dsflow artifacts with one worker process per rank."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

import click

from dsflow.common.cli import (CONTEXT_SETTINGS, read_stdin_text, run_command, setup_logging,
                               version_option)
from dsflow.common.errors import DsflowError, OptionError
from dsflow.runtime.cli_options import engine_options, options_from
from dsflow.runtime.engine import Engine
from dsflow.runtime.sampling import SamplingParams


class _OrderedPrinter:
    """Streams prompt 0 live; later prompts' text is held until the ones before finish,
    so several prompts print as readable blocks in order, each as early as possible."""

    def __init__(self, n: int, show_headers: bool):
        self.n, self.headers = n, show_headers
        self.current = 0
        self.buffers = [""] * n
        self.finished = [False] * n
        self._header(0)

    def _header(self, i: int) -> None:
        if self.headers and i < self.n:
            click.echo(f"{'' if i == 0 else chr(10)}=== prompt {i + 1} ===")

    def add(self, index: int, text: str, finished: bool) -> None:
        if index == self.current:
            click.echo(text, nl=False)
            sys.stdout.flush()
        else:
            self.buffers[index] += text
        self.finished[index] = self.finished[index] or finished
        while self.current < self.n and self.finished[self.current]:
            click.echo("")
            self.current += 1
            if self.current < self.n:
                self._header(self.current)
                click.echo(self.buffers[self.current], nl=False)


@click.command(context_settings=CONTEXT_SETTINGS)
@version_option("dsrun")
@engine_options
@click.option("--prompt", "prompts", multiple=True,
              help="Prompt text; repeat for a batch (prompts may differ in length). "
                   "Without --prompt, the prompt is read from standard input.")
@click.option("--max-new-tokens", type=int, default=None,
              help="Stop after this many generated tokens (vLLM: max_tokens). Default, like "
                   "--temperature/--top-k/--top-p: the checkpoint's generation_config.json, "
                   "else 128.")
@click.option("--temperature", type=float, default=None,
              help="Sampling temperature; 0 = greedy (deterministic; the default unless "
                   "generation_config.json says do_sample).")
@click.option("--top-k", type=int, default=None,
              help="Sample among the k most likely tokens only (0 = off).")
@click.option("--top-p", type=float, default=None,
              help="Nucleus sampling: smallest set of tokens with this total probability.")
@click.option("--seed", type=int, default=None, help="Random seed for sampling.")
@click.option("--stop", "stops", multiple=True,
              help="Stop when this text is generated (not included in the output); repeatable.")
@click.option("--stop-token-id", "stop_token_ids", type=int, multiple=True,
              help="Also stop at this token id; repeatable.")
@click.option("--n", "n", type=int, default=1, show_default=True,
              help="Samples per prompt (they share the prompt's prefill).")
@click.option("--chat", is_flag=True,
              help="Wrap each prompt in the model's chat template (instruct models).")
@click.option("--suffix", default=None,
              help="Fill in the middle: the prompt is the code before the hole, this the "
                   "code after it (DeepSeek-Coder's FIM format).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object per prompt (token ids, text, finish_reason, timings) "
                   "instead of streaming text.")
@click.option("--score", "score_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None,
              help="Instead of generating, print the log-likelihood of this UTF-8 text file "
                   "under the artifacts and its bits per byte (teacher forcing through the "
                   "exported graphs).")
@click.option("--score-window", type=int, default=None,
              help="With --score: tokens of context per chunk (chunks do not overlap; each "
                   "starts after <bos>). Default 256, the embedded default's training context, or "
                   "the maximum sequence length minus 1 when that is shorter.")
@click.option("-q", "--quiet", is_flag=True, help="No timing summary on standard error.")
@click.option("-v", "--verbose", is_flag=True,
              help="Show MindSpore's log lines, the workers' output, and the traceback of "
                   "a failure.")
@run_command("dsrun")
def main(artifacts: Path, prompts: tuple[str, ...], max_new_tokens: int, temperature: float,
         top_k: int, top_p: float, seed: Optional[int], stops: tuple[str, ...],
         stop_token_ids: tuple[int, ...], n: int, chat: bool, suffix: Optional[str],
         max_batch: Optional[int], max_seq_len: Optional[int], cache_mb: Optional[float],
         prefill_chunk: Optional[int], max_step_tokens: Optional[int], prefix_reuse: bool,
         step_timeout: Optional[float], as_json: bool, verify: bool, device: Optional[str],
         devices: Optional[str], allow_version_mismatch: bool, score_file: Optional[Path],
         score_window: Optional[int], quiet: bool,
         verbose: bool) -> None:
    """Generate text from a DeepSeek-Coder model exported by `dsexport build`.

    \b
    Examples:
      dsrun --prompt "def quick_sort(arr):" --max-new-tokens 100
      dsrun --chat --prompt "Write a Python function that reverses a list"
      dsrun --prompt "def add(a, b):" --prompt "// C: binary search" --json
      dsrun --prompt "def fib(n):" --suffix "    return a" --max-new-tokens 32
      dsrun --score some_module.py
    """
    setup_logging(verbose)
    # option mistakes exit 2 here, before the artifacts are read
    options = options_from(verify=verify, device=device, devices=devices,
                           allow_version_mismatch=allow_version_mismatch, max_batch=max_batch,
                           max_seq_len=max_seq_len, cache_mb=cache_mb,
                           prefill_chunk=prefill_chunk, max_step_tokens=max_step_tokens,
                           prefix_reuse=prefix_reuse, step_timeout=step_timeout,
                           verbose=verbose)
    engine_args = dict(artifacts=artifacts, options=options)
    if score_file is not None:
        _score(score_file, score_window, as_json, engine_args)
        return
    if not prompts:
        if sys.stdin.isatty():
            raise DsflowError("no prompt: pass --prompt TEXT (repeatable) or pipe text on "
                              "standard input")
        prompts = (read_stdin_text(),)
    # options given override the checkpoint's generation defaults (as in transformers)
    given = {k: v for k, v in dict(max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_k=top_k, top_p=top_p).items() if v is not None}
    given.update(seed=seed, stop=tuple(stops), stop_token_ids=tuple(stop_token_ids), n=n)
    params = SamplingParams(**given)
    if suffix is not None and chat:
        raise OptionError("--suffix (fill in the middle) and --chat cannot be combined")
    try:
        params.check()
    except DsflowError as e:
        raise OptionError(str(e)) from None
    engine = Engine(**engine_args)
    try:
        params = dataclasses.replace(engine.default_params, **given)  # checked on submit
        if max_new_tokens is None:
            params = _fit_default_length(engine, prompts, params, chat)
        if not quiet and not as_json:
            click.echo(f"[{engine.plan.describe()}]", err=True)
        if suffix is not None:
            prompts = tuple(engine.encode(p, suffix=suffix) for p in prompts)
        results = _run(engine, list(prompts), params, chat, as_json)
    finally:
        engine.close()
    if not quiet and not as_json and results:
        r = results[0]
        n = sum(len(c.token_ids) for c in results)
        click.echo(f"[{n} tokens; startup {engine.startup_s:.1f} s, prefill {r.prefill_ms:.0f} ms, "
                   f"decode {r.decode_ms_per_token:.1f} ms/token at batch {len(results)}]",
                   err=True)


def _fit_default_length(engine, prompts: tuple, params, chat: bool):
    """The default --max-new-tokens (128, or generation_config.json's) shortened to what
    the longest prompt leaves of a sequence, so that artifacts built with a small
    --max-seq-len do not refuse a run the user gave no length for. A prompt that alone
    fills the sequence is still refused, by the engine, with its own message."""
    longest = max(len(engine.encode(p, chat=chat)) for p in prompts)
    room = engine.plan.capacity - longest
    if 1 <= room < params.max_new_tokens:
        return dataclasses.replace(params, max_new_tokens=room)
    return params


def _run(engine, prompts: list[str], params: SamplingParams, chat: bool, as_json: bool) -> list:
    if as_json:
        results = engine.generate(prompts, params, chat=chat)
        for c in results:
            click.echo(json.dumps(c.to_dict(), ensure_ascii=False))
        return results
    printer = _OrderedPrinter(len(prompts) * params.n, show_headers=len(prompts) * params.n > 1)
    results = []
    for event in engine.stream(prompts, params, chat=chat):
        printer.add(event.index, event.text, event.finished is not None)
        if event.finished is not None:
            results.append(event.finished)
    return sorted(results, key=lambda c: c.index)


def _score(path: Path, window: Optional[int], as_json: bool, engine_args: dict) -> None:
    """dsrun --score: one line of figures (or a JSON object) for the file."""
    from dsflow.runtime.scoring import score_text
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise OptionError(f"--score {path}: not UTF-8 text ({e.reason} at byte {e.start})"
                          ) from None
    with Engine(**engine_args) as engine:
        result = score_text(engine, text, window)
    if as_json:
        click.echo(json.dumps({"file": str(path), **result.to_dict()}))
    else:
        click.echo(f"{path}: {result.bytes} bytes, {result.tokens} tokens, log-likelihood "
                   f"{-result.nats:.1f} nats ({result.nats_per_token:.4f} nats/token), "
                   f"{result.bits_per_byte:.4f} bits/byte")


if __name__ == "__main__":
    main()

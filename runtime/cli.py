"""`dsrun`: generate text from dsflow artifacts with one worker process per rank."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import click

from dsflow.common.cli import (CONTEXT_SETTINGS, read_stdin_text, run_command, setup_logging,
                               version_option)
from dsflow.common.errors import DsflowError, OptionError
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
@click.option("--artifacts", type=click.Path(path_type=Path), default="dsflow-artifacts",
              show_default=True, help="Directory written by `dsexport build`.")
@click.option("--prompt", "prompts", multiple=True,
              help="Prompt text; repeat for a batch (prompts may differ in length). "
                   "Without --prompt, the prompt is read from standard input.")
@click.option("--max-new-tokens", type=int, default=128, show_default=True,
              help="Stop after this many generated tokens.")
@click.option("--temperature", type=float, default=0.0, show_default=True,
              help="Sampling temperature; 0 = greedy (deterministic).")
@click.option("--top-k", type=int, default=0, show_default=True,
              help="Sample among the k most likely tokens only (0 = off).")
@click.option("--top-p", type=float, default=1.0, show_default=True,
              help="Nucleus sampling: smallest set of tokens with this total probability.")
@click.option("--seed", type=int, default=None, help="Random seed for sampling.")
@click.option("--stop", "stops", multiple=True,
              help="Stop when this text is generated (not included in the output); repeatable.")
@click.option("--chat", is_flag=True,
              help="Wrap each prompt in the model's chat template (instruct models).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object per prompt (token ids, text, finish_reason, timings) "
                   "instead of streaming text.")
@click.option("--verify", is_flag=True,
              help="Check the sha256 of every artifact against the manifest before loading.")
@click.option("--device", type=click.Choice(["cpu", "ascend"]), default=None,
              help="Where the ranks run. Default: the target the artifacts were built for.")
@click.option("--devices", default=None,
              help="Ascend card of each rank, comma-separated (e.g. 0,1,2,3). Default 0..tp-1.")
@click.option("--score", "score_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None,
              help="Instead of generating, print the log-likelihood of this UTF-8 text file "
                   "under the artifacts and its bits per byte (teacher forcing through the "
                   "exported graphs).")
@click.option("--score-window", type=int, default=None,
              help="With --score: tokens of context per chunk (chunks do not overlap; each "
                   "starts after <bos>). Default 256, the embedded default's training context.")
@click.option("--allow-version-mismatch", is_flag=True,
              help="ascend: run although the installed mindspore_lite's release differs "
                   "from the MindSpore that exported the graphs (refused by default: GE's "
                   "operator adapters change between releases).")
@click.option("-q", "--quiet", is_flag=True, help="No timing summary on standard error.")
@click.option("-v", "--verbose", is_flag=True,
              help="Show MindSpore's log lines, the workers' output, and the traceback of "
                   "a failure.")
@run_command("dsrun")
def main(artifacts: Path, prompts: tuple[str, ...], max_new_tokens: int, temperature: float,
         top_k: int, top_p: float, seed: Optional[int], stops: tuple[str, ...], chat: bool,
         as_json: bool, verify: bool, device: Optional[str], devices: Optional[str],
         allow_version_mismatch: bool, score_file: Optional[Path],
         score_window: Optional[int], quiet: bool, verbose: bool) -> None:
    """Generate text from a DeepSeek-Coder model exported by `dsexport build`.

    \b
    Examples:
      dsrun --prompt "#write a quick sort algorithm" --max-new-tokens 100
      dsrun --chat --prompt "Write a Python function that reverses a list"
      dsrun --prompt "def add(a, b):" --prompt "// C: binary search" --json
      dsrun --score some_module.py
    """
    setup_logging(verbose)
    if score_file is not None:
        _score(score_file, score_window, artifacts, as_json, verify, device, devices, verbose)
        return
    if not prompts:
        if sys.stdin.isatty():
            raise DsflowError("no prompt: pass --prompt TEXT (repeatable) or pipe text on "
                              "standard input")
        prompts = (read_stdin_text(),)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, seed=seed, stop=tuple(stops))
    from dsflow.common.options import int_list
    from dsflow.runtime.engine import Engine
    if allow_version_mismatch:  # read by each rank's Lite backend (runtime/backends/lite.py)
        from dsflow.runtime.backends.lite import VERSION_OVERRIDE_ENV
        os.environ[VERSION_OVERRIDE_ENV] = "1"
    try:
        params.check()
    except DsflowError as e:
        raise OptionError(str(e)) from None
    engine = Engine(artifacts, verbose=verbose, verify=verify, device=device,
                    device_ids=int_list(devices, "--devices"))
    try:
        results = _run(engine, list(prompts), params, chat, as_json)
    finally:
        engine.close()
    if not quiet and not as_json and results:
        r = results[0]
        n = sum(len(c.token_ids) for c in results)
        click.echo(f"[{n} tokens; startup {engine.startup_s:.1f} s, prefill {r.prefill_ms:.0f} ms, "
                   f"decode {r.decode_ms_per_token:.1f} ms/token at batch {len(results)}]",
                   err=True)


def _run(engine, prompts: list[str], params: SamplingParams, chat: bool, as_json: bool) -> list:
    if as_json:
        results = engine.generate(prompts, params, chat=chat)
        for c in results:
            click.echo(json.dumps(c.to_dict(), ensure_ascii=False))
        return results
    printer = _OrderedPrinter(len(prompts), show_headers=len(prompts) > 1)
    results = []
    for event in engine.stream(prompts, params, chat=chat):
        printer.add(event.index, event.text, event.finished is not None)
        if event.finished is not None:
            results.append(event.finished)
    return sorted(results, key=lambda c: c.index)


def _score(path: Path, window: Optional[int], artifacts: Path, as_json: bool, verify: bool,
           device: Optional[str], devices: Optional[str], verbose: bool) -> None:
    """dsrun --score: one line of figures (or a JSON object) for the file."""
    from dsflow.common.options import int_list
    from dsflow.runtime.engine import Engine
    from dsflow.runtime.scoring import DEFAULT_WINDOW, score_text
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise OptionError(f"--score {path}: not UTF-8 text ({e.reason} at byte {e.start})"
                          ) from None
    with Engine(artifacts, verbose=verbose, verify=verify, device=device,
                device_ids=int_list(devices, "--devices")) as engine:
        result = score_text(engine, text, window or DEFAULT_WINDOW)
    if as_json:
        click.echo(json.dumps({"file": str(path), **result.to_dict()}))
    else:
        click.echo(f"{path}: {result.bytes} bytes, {result.tokens} tokens, log-likelihood "
                   f"{-result.nats:.1f} nats ({result.nats_per_token:.4f} nats/token), "
                   f"{result.bits_per_byte:.4f} bits/byte")

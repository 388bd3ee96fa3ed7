"""`dsexport doctor`, and the `dsexport` entry point: export's own commands plus this
one (registered here, not in export/, because the doctor runs the runtime too)."""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

import click

from dsflow.common.cli import CONTEXT_SETTINGS, EXIT_FAILURE, run_command
from dsflow.doctor.check import (ASCEND_BUCKETS, MAX_SEQ, NEW_TOKENS, PROMPT, Run, compare,
                                 run_target)
from dsflow.doctor.environment import Environment, probe
from dsflow.doctor.tiny_model import CONFIG, write_tiny_checkpoint
from dsflow.export.cli.main import main as export_main

TPS = (1, 2)


def _section(title: str) -> None:
    click.echo(f"\n== {title} ==")


def _environment(env: Environment) -> None:
    _section("environment")
    width = max(len(label) for label, value in env.lines if "\n" not in value)
    for label, value in env.lines:
        click.echo(f"{label}:{value}" if "\n" in value else f"{label:<{width}}  {value}")


def _runs(checkpoint: Path, work: Path, target: str, devices: Optional[list[int]],
          reference: Optional[Run], cache_mode: Optional[str] = None) -> tuple[list[Run], bool]:
    """tp 1 and 2 of one target, each compared with `reference` (default: the first)."""
    runs, ok = [], True
    for tp in TPS:
        ids = devices[:tp] if devices else None
        run = run_target(checkpoint, work, target, tp, ids,
                         forced=reference.tokens if reference and not reference.error else None,
                         cache_mode=cache_mode)
        runs.append(run)
        reference = reference or run
        if run.error:
            ok = False
            click.echo(f"{run.name}: FAILED: {run.error}")
            continue
        click.echo(f"{run.name}: {run.timings()}")
        click.echo(f"  greedy tokens {run.tokens}")
        if run is not reference:
            agrees, line = compare(reference, run)
            ok = ok and agrees
            click.echo(f"  {'ok' if agrees else 'MISMATCH'}: {line}")
    return runs, ok


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--device", type=click.Choice(["cpu", "ascend"]), default="cpu",
              show_default=True,
              help="cpu: environment + the CPU half. ascend: also the Ascend half (Lite on "
                   "the cards, compared with the CPU half).")
@click.option("--devices", default="0,1", show_default=True,
              help="ascend: the cards for tp 1 (the first) and tp 2 (the first two).")
@click.option("--keep", type=click.Path(path_type=Path), default=None,
              help="Keep the tiny model and its artifacts in this directory.")
@click.option("-v", "--verbose", is_flag=True, help="Show MindSpore's own log lines.")
@run_command("dsexport")
def doctor(device: str, devices: str, keep: Optional[Path], verbose: bool) -> None:
    """Report the environment and run a tiny end-to-end self-test; paste the output
    into a bug report.

    \b
    A two-layer random model (built in seconds) is exported for CPU and run through
    the portable graphs at tp 1 and 2; with --device ascend it is also exported for
    Ascend and run through MindSpore Lite on the cards at tp 1 and 2, comparing greedy
    tokens and logits with the CPU run and timing build, warm-up, prefill and decode.
    Exits 0 when every requested check passed, 1 otherwise.
    """
    from dsflow.common.options import int_list
    from dsflow.common.logs import quiet_mindspore
    quiet_mindspore(verbose)
    cards = int_list(devices, "--devices") or [0, 1]
    click.echo(f"dsflow doctor report ({time.strftime('%Y-%m-%d %H:%M:%S %Z')}, "
               f"--device {device})")
    env = probe(want_ascend=device == "ascend")
    _environment(env)
    work = keep or Path(tempfile.mkdtemp(prefix="dsflow-doctor-"))
    try:
        ok = _checks(env, work, device, cards)
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
    if not ok:  # the report says what failed; exit 1 like any dsflow failure
        raise click.exceptions.Exit(EXIT_FAILURE)


def _checks(env: Environment, work: Path, device: str, cards: list[int]) -> bool:
    checkpoint = write_tiny_checkpoint(work / "model")
    _section("model")
    click.echo(f"{CONFIG.num_layers} layers, hidden {CONFIG.hidden_size}, {CONFIG.num_heads} "
               f"heads / {CONFIG.num_kv_heads} KV heads, vocab {CONFIG.vocab_size}, random "
               f"weights (seed 0); prompt {PROMPT!r}, {NEW_TOKENS} greedy tokens, "
               f"max_seq_len {MAX_SEQ}")
    _section("CPU half: portable graphs, MindSpore")
    cpu_runs, ok = _runs(checkpoint, work, "cpu", None, None)
    if device == "cpu":
        _summary(ok, None)
        return ok
    _section(f"Ascend half: fused graphs, MindSpore Lite (buckets {ASCEND_BUCKETS}, "
             f"cards {cards[:max(TPS)]})")
    if env.ascend_missing:
        click.echo("NOT RUN. Missing here:")
        for item in env.ascend_missing:
            click.echo(f"  - {item}")
        _summary(ok, False)
        return False
    ascend_ok = ascend_half(env, checkpoint, work, cards, cpu_runs[0])
    _summary(ok, ascend_ok)
    return ok and ascend_ok


def ascend_half(env: Environment, checkpoint: Path, work: Path, cards: list[int],
                reference: Run) -> bool:
    """tp 1 and 2 through MindSpore Lite, built in the cache mode the found Lite takes
    (resident only where it takes device tensors), compared with `reference`."""
    click.echo(f"cache mode {env.ascend_cache_mode} (the one mindspore_lite "
               f"{env.lite_version} takes)")
    return _runs(checkpoint, work, "ascend", cards, reference, env.ascend_cache_mode)[1]


def _summary(cpu_ok: bool, ascend_ok: Optional[bool]) -> None:
    _section("result")
    line = f"CPU half: {'OK' if cpu_ok else 'FAILED'}"
    if ascend_ok is not None:
        line += f"; Ascend half: {'OK' if ascend_ok else 'FAILED or NOT RUN (see above)'}"
    click.echo(line)


def dsexport(argv: Optional[list[str]] = None) -> None:
    """The `dsexport` console script."""
    export_main.add_command(doctor)
    export_main(args=argv)

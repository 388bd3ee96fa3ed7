"""`dsexport inspect ART [--rank N] [--json]`: what each exported graph contains.

A standalone click command; export/cli/main.py registers it with `main.add_command(inspect)`.
Human output is one block per graph. `--json` prints JSON Lines: one object per graph
per line (rank, graph, target, file, inputs, outputs, ops, parameters {count, bytes},
comm_groups), so `| jq` and line-by-line readers work and output starts before every
graph of a large build has been parsed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import click

from dsflow.common.cli import CONTEXT_SETTINGS, run_command


def _shape(shape: list[int]) -> str:
    return "[" + ", ".join("?" if d < 0 else str(d) for d in shape) + "]"


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def format_graph(g: dict) -> str:
    """Human-readable block for one graph: signature, parameters, groups, op counts."""
    lines = [f"rank {g['rank']} {g['graph']} ({g['target']}): {g['file']}"]
    for kind in ("inputs", "outputs"):
        for t in g[kind]:
            lines.append(f"  {kind[:-1]:<6} {t['name']:<14} {t['dtype']:<9} {_shape(t['shape'])}")
    p = g["parameters"]
    lines.append(f"  parameters   {p['count']} tensors, {_mb(p['bytes'])}")
    lines.append(f"  comm groups  {', '.join(g['comm_groups']) or '-'}")
    ops = sorted(g["ops"].items(), key=lambda kv: (-kv[1], kv[0]))
    lines.append("  ops          " + ", ".join(f"{name} {n}" for name, n in ops))
    return "\n".join(lines)


@click.command("inspect", context_settings=CONTEXT_SETTINGS)
@click.argument("art", type=click.Path(path_type=Path))
@click.option("--rank", type=int, default=None, help="Only this rank's graphs.")
@click.option("--json", "as_json", is_flag=True,
              help="JSON Lines: one object per graph per line.")
@click.option("-v", "--verbose", is_flag=True, help="Show the traceback of a failure.")
@run_command("dsexport")
def inspect(art: Path, rank: Optional[int], as_json: bool, verbose: bool) -> None:
    """Report the graphs of an artifacts directory ART without running them.

    Per graph: inputs and outputs (name, dtype, shape; ? = dynamic), parameter count
    and bytes, communication groups, and operator counts by type (e.g. the fused
    Ascend operators of a --target ascend build)."""
    from dsflow.common.logs import quiet_mindspore
    quiet_mindspore(False)
    from dsflow.export.pipeline.inspect_mindir import inspect_artifacts
    graphs = inspect_artifacts(art, rank)
    for i, g in enumerate(graphs):
        if as_json:
            click.echo(json.dumps(g))
        else:
            click.echo(("\n" if i else "") + format_graph(g))

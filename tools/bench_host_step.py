#!/usr/bin/env python3
"""Host time and pipe bytes per decode step: the runtime of a source tree "before"
(e.g. the commit before the three-part runtime: every rank sent its whole logits slice
and the coordinator sampled) next to this one ("after": the ranks sample and send
token ids or top candidates), interleaved in one run.

Each contender runs in its own process (importing `dsflow` from its tree), starts an
Engine on --artifacts, and generates --batch sequences of --tokens tokens with each
sampling setting. `Cluster.request` (the pipe to the ranks, the same in both) is
wrapped to time every round trip and to size its replies (pickled bytes). For each
steady decode step (one decode round trip to the next, no prefill in between):
    host ms = step period - time inside round trips (coordinator work: scheduling,
              sampling, unpickling, detokenization);
    bytes   = the replies of the round trips in it (a second sampling round included).
Medians over steps and --rounds rounds (contenders alternate), with the ratio.

    git archive <commit> | tar -x -C /tmp/before/dsflow      # the old tree
    mkdir -p /tmp/after && ln -s "$PWD" /tmp/after/dsflow  # this tree
    python tools/bench_host_step.py --artifacts A --before /tmp/before --after /tmp/after
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

SETTINGS = {
    "greedy": dict(temperature=0.0),
    "top_k40": dict(temperature=0.8, top_k=40, seed=1),
    "top_p0.9": dict(temperature=0.8, top_p=0.9, seed=1),
    "logprobs5": dict(temperature=0.0, logprobs=5),
}


def contender(artifacts: str, batch: int, tokens: int) -> dict:
    """Runs inside the contender's process."""
    import pickle
    import time

    from dsflow.runtime import Engine, SamplingParams
    from dsflow.runtime import cluster as cluster_module

    timeline: list[tuple[str, float, float, int]] = []
    original = cluster_module.Cluster.request

    def request(self, op, payload, *args, **kw):
        t0 = time.perf_counter()
        replies = original(self, op, payload, *args, **kw)
        t1 = time.perf_counter()
        timeline.append((op, t0, t1, sum(len(pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL))
                                          for r in replies)))
        return replies
    cluster_module.Cluster.request = request
    out = {}
    with Engine(artifacts, max_batch=batch) as engine:
        prompts = [f"def function_{i}(x):\n    " for i in range(batch)]
        for name, setting in SETTINGS.items():
            params = SamplingParams(max_new_tokens=tokens, ignore_eos=True, **setting)
            engine.generate(prompts, params)  # compiles, warm caches
            timeline.clear()
            engine.generate(prompts, params)
            out[name] = _steps(timeline)
    return out


def _steps(timeline) -> dict:
    starts = [i for i, (op, *_rest) in enumerate(timeline) if op == "decode"]
    host, sizes = [], []
    for a, b in zip(starts, starts[1:]):
        between = timeline[a:b]
        if any(op == "prefill" for op, *_ in between):
            continue
        period = timeline[b][1] - timeline[a][1]
        inside = sum(t1 - t0 for _, t0, t1, _ in between)
        host.append((period - inside) * 1e3)
        sizes.append(sum(n for *_, n in between))
    return {"host_ms": statistics.median(host), "bytes": statistics.median(sizes),
            "round_trip_ms": statistics.median(
                (timeline[i][2] - timeline[i][1]) * 1e3 for i in starts),
            "steps": len(host)}


def run(tree: str, args) -> dict:
    # `dsflow` from the tree, in the contender and in the rank workers it starts
    env = {**os.environ, "PYTHONPATH": tree}
    code = ("import sys, json\n"
            "import dsflow.runtime\n"
            f"assert dsflow.runtime.__file__.startswith({tree!r}), dsflow.runtime.__file__\n"
            f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
            "from bench_host_step import contender\n"
            f"print('RESULT', json.dumps(contender({args.artifacts!r}, {args.batch}, "
            f"{args.tokens})))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=1800)
    if out.returncode:
        sys.exit(f"contender {tree} failed:\n{out.stderr[-3000:]}")
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifacts", required=True)
    p.add_argument("--before", required=True, help="directory holding the old dsflow/ tree")
    p.add_argument("--after", required=True,
                   help="directory holding the new dsflow/ tree (a symlink to this "
                        "checkout will do)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    print("load:", os.getloadavg())
    results: dict[str, list[dict]] = {"before": [], "after": []}
    for _ in range(args.rounds):
        for name, tree in (("before", args.before), ("after", args.after)):
            results[name].append(run(tree, args))
    print("load:", os.getloadavg())
    print(f"{'setting':<11} {'host ms before':>15} {'after':>8} {'ratio':>6}   "
          f"{'bytes before':>12} {'after':>8} {'ratio':>7}   {'round trip ms b/a':>18}")
    for setting in SETTINGS:
        med = {k: {m: statistics.median(r[setting][m] for r in v)
                   for m in ("host_ms", "bytes", "round_trip_ms")}
               for k, v in results.items()}
        b, a = med["before"], med["after"]
        print(f"{setting:<11} {b['host_ms']:>15.2f} {a['host_ms']:>8.2f} "
              f"{a['host_ms'] / b['host_ms']:>6.2f}   {b['bytes']:>12.0f} {a['bytes']:>8.0f} "
              f"{a['bytes'] / b['bytes']:>7.4f}   {b['round_trip_ms']:>8.2f} / "
              f"{a['round_trip_ms']:.2f}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Time to first token of a request that shares a long prefix with the previous one,
with prefix reuse (the default) and without (--no-prefix-reuse), in one run.

Two engines on --artifacts (one of each). A "file" of --prefix-tokens tokens (source
text of this repository) is sent with one ending, then with another (an editor
sending the same file with the cursor elsewhere); the second request's time to first
token is measured on both engines, alternating, --rounds times (each round uses a new
file, so nothing but the previous request is cached). The greedy tokens of the two
engines are compared: reuse must not change them.

    python tools/bench_prefix_reuse.py --artifacts A --prefix-tokens 1400
"""
from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from dsflow.runtime import Engine, SamplingParams

REPO = Path(__file__).resolve().parents[1]
PARAMS = SamplingParams(max_new_tokens=8, ignore_eos=True)


def files(engine: Engine, tokens: int, count: int) -> list[list[int]]:
    """`count` distinct token sequences of `tokens` tokens, from the repository's code."""
    text = "".join(p.read_text(encoding="utf-8") for p in sorted(REPO.glob("runtime/**/*.py")))
    ids = engine.encode(text)
    step = max(1, (len(ids) - tokens) // max(count, 1))
    return [ids[i * step:i * step + tokens] for i in range(count)]


def second_ttft(engine: Engine, prefix: list[int]) -> tuple[float, list[int]]:
    """The first request (one ending) runs to the end; then the second's TTFT."""
    tok = engine.tokenizer
    engine.submit(prefix + tok.encode("\n# the cursor here\n", add_bos=False), PARAMS).result()
    c = engine.submit(prefix + tok.encode("\ndef elsewhere(", add_bos=False),
                      PARAMS).result()[0]
    return c.time_to_first_token_ms, c.token_ids


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifacts", required=True)
    p.add_argument("--prefix-tokens", type=int, default=1400)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    print("load:", os.getloadavg())
    with Engine(args.artifacts, max_batch=2) as reuse, \
            Engine(args.artifacts, max_batch=2, prefix_reuse=False) as fresh:
        prefixes = files(reuse, args.prefix_tokens, args.rounds + 1)
        for e in (reuse, fresh):  # compiles of the shapes, untimed
            second_ttft(e, prefixes[-1])
        times: dict[str, list[float]] = {"reuse": [], "fresh": []}
        for prefix in prefixes[:-1]:
            a, ta = second_ttft(reuse, prefix)
            b, tb = second_ttft(fresh, prefix)
            assert ta == tb, "prefix reuse changed the tokens"
            times["reuse"].append(a)
            times["fresh"].append(b)
        reused = reuse.health()["prefix_reused_tokens"]
    print("load:", os.getloadavg())
    r, f = statistics.median(times["reuse"]), statistics.median(times["fresh"])
    print(f"second request, {args.prefix_tokens}-token shared prefix, TTFT median of "
          f"{args.rounds}: with reuse {r:.1f} ms, without {f:.1f} ms, ratio {r / f:.3f}; "
          f"same greedy tokens; tokens reused in all: {reused}")
    print("reuse:", [round(x, 1) for x in times["reuse"]])
    print("fresh:", [round(x, 1) for x in times["fresh"]])


if __name__ == "__main__":
    main()

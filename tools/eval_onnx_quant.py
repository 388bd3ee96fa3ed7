#!/usr/bin/env python3
"""Quality of the ONNX target's weight-only quantisation on the shipped default model:
bits per byte on the held-out standard-library code (docs/DEFAULT_MODEL.md), through
dsflow's own ONNX graphs and `dsrun --score`'s scoring (runtime/scoring.py), for each
--quant mode and block size, next to fp32 in the same run.

    python tools/eval_onnx_quant.py --bytes 30000 --variants none,int8,int4,int4:64,int4:128
"""
from __future__ import annotations

import argparse
import json
import sysconfig
import tempfile
import time
from pathlib import Path


def heldout_text(n_bytes: int) -> str:
    from dsflow.export.pipeline.default_model import DEFAULT_MODEL_DIR
    record = json.loads((DEFAULT_MODEL_DIR / "training.json").read_text())
    root = Path(sysconfig.get_paths()["stdlib"])
    text = "".join((root / r).read_text(encoding="utf-8") for r in record["heldout_files"]
                   if (root / r).is_file())
    return text[:n_bytes]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bytes", type=int, default=30000)
    p.add_argument("--variants", default="none,int8,int4",
                   help="quant[:block size], comma-separated")
    args = p.parse_args()
    from dsflow.export.pipeline.build import BuildOptions, build
    from dsflow.export.pipeline.default_model import default_model_dir
    from dsflow.runtime.engine import Engine
    from dsflow.runtime.scoring import score_text
    text = heldout_text(args.bytes)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants.split(","):
            quant, _, block = variant.partition(":")
            out = Path(tmp) / variant.replace(":", "-")
            art = build(BuildOptions(model_dir=default_model_dir(), out=out, target="onnx",
                                     quant=quant, quant_block_size=int(block) if block else None,
                                     max_seq_len=512))
            with Engine(art) as engine:
                t0 = time.perf_counter()
                bpb = score_text(engine, text).bits_per_byte
            size = (out / "rank0" / "model.onnx.data").stat().st_size
            rows.append((variant, bpb, size, time.perf_counter() - t0))
            print(f"{variant}: {bpb:.4f} bits/byte", flush=True)
    base = rows[0][1]
    print(f"\n{len(text.encode())} held-out bytes\n")
    print("| variant | bits/byte | x first | weights MiB | scoring s |")
    print("|---|---|---|---|---|")
    for variant, bpb, size, secs in rows:
        print(f"| {variant} | {bpb:.4f} | {bpb / base:.4f} | {size / 2**20:.1f} | {secs:.0f} |")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Held-out figures for the model card (docs/DEFAULT_MODEL.md): bits per byte of the
shipped default model on the held-out standard-library files, against gzip -9 and a
unigram model measured on the same text in the same run, plus the loss-curve plot.

Model figures use transformers on the shipped bf16 weights (fp32 compute), scoring each
held-out file the way `dsrun --score` does (non-overlapping 256-token chunks, each after
<bos>); `--dsflow-bytes N` also scores the first N bytes through dsflow's exported graphs
at tp 1 and 2 to show they agree with it.

    python tools/eval_default_model.py --run-dir /work/train-run --plot docs/default_model_loss.png
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_default_model import BOS_ID, Hyper, prepare_data, stdlib_root  # noqa: E402

from dsflow.export.pipeline.default_model import DEFAULT_MODEL_DIR  # noqa: E402
from dsflow.runtime.scoring import DEFAULT_WINDOW, chunks  # noqa: E402
from dsflow.runtime.tokenizer import Tokenizer  # noqa: E402


def heldout_texts() -> list[str]:
    record = json.loads((DEFAULT_MODEL_DIR / "training.json").read_text())
    return [(stdlib_root() / rel).read_text(encoding="utf-8")
            for rel in record["heldout_files"]]


@torch.no_grad()
def model_nats(model, ids: list[int], window: int = DEFAULT_WINDOW) -> float:
    nats = 0.0
    for piece in chunks(ids, window):
        x = torch.tensor([[BOS_ID] + piece])
        logp = torch.log_softmax(model(x).logits[0, :-1].double(), dim=-1)
        nats -= logp.gather(-1, x[0, 1:, None]).sum().item()
    return nats


def unigram_bits(train_stream: np.ndarray, ids: list[int]) -> float:
    """Add-one unigram over the 32022 real ids, counted on the training stream."""
    counts = np.bincount(train_stream, minlength=32022)[:32022].astype(np.float64) + 1.0
    logp = np.log2(counts / counts.sum())
    return float(-logp[np.asarray(ids)].sum())


def dsflow_bits_per_byte(text: str, tp: int) -> float:
    from dsflow.export.pipeline.build import BuildOptions, build
    from dsflow.runtime.engine import Engine
    from dsflow.runtime.scoring import score_text
    with tempfile.TemporaryDirectory() as tmp:
        art = build(BuildOptions(model_dir=DEFAULT_MODEL_DIR, out=Path(tmp) / "art", tp=tp,
                                 max_seq_len=512))
        with Engine(art) as engine:
            return score_text(engine, text).bits_per_byte


def plot(run: Path, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    by_step = {}  # a resumed run logs again the steps after its last checkpoint: keep the last
    for line in (run / "log.jsonl").read_text().splitlines():
        row = json.loads(line)
        by_step[row["step"]] = row
    rows = [by_step[s] for s in sorted(by_step)]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["tokens"] / 1e6 for r in rows], [r["loss"] for r in rows], lw=0.8,
            label="training batch")
    held = [r for r in rows if "heldout_loss" in r]
    ax.plot([r["tokens"] / 1e6 for r in held], [r["heldout_loss"] for r in held], "o-",
            label="held-out windows")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_ylim(bottom=min(r["loss"] for r in rows) - 0.3, top=8)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("dsflow embedded default model")
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", type=Path, default=Path("/work/train-run"))
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--dsflow-bytes", type=int, default=0)
    ap.add_argument("--files", type=int, default=0, help="only the first N held-out files")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.plot:
        plot(args.run_dir, args.plot)
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32).eval()
    tok = Tokenizer(DEFAULT_MODEL_DIR)
    train_stream = prepare_data(args.run_dir, Hyper())["train"]
    texts = heldout_texts()[:args.files or None]
    n_bytes = sum(len(t.encode()) for t in texts)
    ids = [tok.encode(t, add_bos=False) for t in texts]
    n_tokens = sum(map(len, ids))
    nats = sum(model_nats(model, i) for i in ids)
    figures = {
        "model": nats / math.log(2) / n_bytes,
        "gzip -9, each file": sum(len(gzip.compress(t.encode(), 9)) for t in texts) * 8 / n_bytes,
        "gzip -9, all files concatenated":
            len(gzip.compress("".join(texts).encode(), 9)) * 8 / n_bytes,
        "unigram (tokens, add-one, training counts)":
            sum(unigram_bits(train_stream, i) for i in ids) / n_bytes,
    }
    print(f"held-out: {len(texts)} files, {n_bytes} bytes, {n_tokens} tokens "
          f"({n_bytes / n_tokens:.2f} bytes/token); model {nats / n_tokens:.4f} nats/token")
    for name, bpb in figures.items():
        print(f"  {name:44} {bpb:.4f} bits/byte")
    if args.dsflow_bytes:
        text = "".join(texts)[:args.dsflow_bytes]
        ref = model_nats(model, tok.encode(text, add_bos=False)) / math.log(2) / len(text.encode())
        print(f"first {args.dsflow_bytes} held-out bytes: transformers {ref:.4f} bits/byte")
        for tp in (1, 2):
            print(f"  dsflow tp {tp}: {dsflow_bits_per_byte(text, tp):.4f} bits/byte", flush=True)


if __name__ == "__main__":
    main()

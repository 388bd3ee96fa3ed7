#!/usr/bin/env python3
"""The numerical cost of the Ascend dtype policy, emulated on the CPU with torch.

On Ascend, dsflow's graphs keep bf16 weights and a bf16 residual stream, but cast q/k/v
to fp16 for the fused attention and keep the KV cache in fp16 (mindspore_lite has no
bf16 tensors; docs/ASCEND.md). No NPU is here, so this runs the same model in
transformers three ways on held-out text (teacher forcing, the chunks `dsrun --score`
uses) and prints, against the fp32 reference measured in the same run:

- fp32:   the reference (what the CPU export computes);
- bf16:   everything in bf16, attention included;
- ascend: bf16 everywhere except attention: q, k, v (hence the cache) rounded to fp16,
          scores and softmax accumulated in fp32, the probabilities and the
          output rounded to fp16, then back to bf16. fp32 accumulation is what the
          graphs ask of the fused kernels: PromptFlashAttention and
          IncreFlashAttention run with inner_precise 0, high-precision mode for fp16
          inputs (graphs/kernels/ascend.py; 1 would be high-performance mode, whose
          internal precision the op docs do not state and this does not model).
          How the kernels compute inside high-precision mode is CANN's: this is a
          model of it, not a measurement.

for each: bits per byte, its change from fp32, and top-1 agreement with fp32 (the share
of positions whose most likely next token is the same).

    python tools/ascend_dtype_cost.py                    # the shipped default model
    python tools/ascend_dtype_cost.py --model DIR --text FILE
"""
from __future__ import annotations

import argparse
import json
import math
import sysconfig
from pathlib import Path

import numpy as np
import torch

from dsflow.export.pipeline.default_model import DEFAULT_MODEL_DIR
from dsflow.runtime.scoring import DEFAULT_WINDOW, chunks
from dsflow.runtime.tokenizer import Tokenizer

REAL_VOCAB = 32022


def fp16_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                   **kwargs):
    """Causal attention with the Ascend kernels' roundings (see the module docstring).
    The mask argument is ignored: the batches here are unpadded causal sequences."""
    def r16(x):
        return x.to(torch.float16).to(torch.float32)
    q, k, v = r16(query), r16(key), r16(value)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    scores = (q @ k.transpose(-1, -2)) * scale
    n = scores.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()[-scores.shape[-2]:]
    probs = r16(torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1))
    out = r16(probs @ v).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


def load(model_dir: Path, policy: str):
    from transformers import AttentionInterface, LlamaForCausalLM
    AttentionInterface.register("fp16_attention", fp16_attention)
    dtype = torch.float32 if policy == "fp32" else torch.bfloat16
    attn = "fp16_attention" if policy == "ascend" else "eager"
    return LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype,
                                            attn_implementation=attn).eval()


@torch.no_grad()
def run_policy(model, pieces: list[list[int]], start_id: int, batch: int = 8):
    """(total nats over all tokens, argmax over the real vocabulary at every position)."""
    nats, tops = 0.0, []
    for i in range(0, len(pieces), batch):
        group = pieces[i:i + batch]
        n = len(group[0])
        same = [p for p in group if len(p) == n]
        ids = torch.tensor([[start_id] + p for p in same])
        logits = model(ids).logits[:, :-1].float()
        logp = torch.log_softmax(logits.double(), dim=-1)
        nats -= logp.gather(-1, ids[:, 1:, None]).sum().item()
        tops.append(logits[..., :REAL_VOCAB].argmax(-1).reshape(-1).numpy())
        rest = [p for p in group if len(p) != n]
        if rest:
            sub_nats, sub_tops = run_policy(model, rest, start_id, batch)
            nats += sub_nats
            tops.append(sub_tops)
    return nats, np.concatenate(tops)


def heldout_text(limit: int) -> str:
    """Held-out standard-library files of the shipped model (never trained on), in
    order, up to `limit` bytes."""
    record = json.loads((DEFAULT_MODEL_DIR / "training.json").read_text())
    root = Path(sysconfig.get_paths()["stdlib"])
    text = ""
    for rel in record["heldout_files"]:
        if (root / rel).is_file() and len(text) < limit:
            text += (root / rel).read_text(encoding="utf-8")
    return text[:limit]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--text", type=Path, default=None,
                    help="UTF-8 text to score (default: held-out stdlib files)")
    ap.add_argument("--bytes", type=int, default=30_000, help="text length used")
    ap.add_argument("--window", type=int, default=DEFAULT_WINDOW)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    text = (args.text.read_text(encoding="utf-8") if args.text else heldout_text(args.bytes))
    text = text[:args.bytes]
    tok = Tokenizer(args.model)
    pieces = chunks(tok.encode(text, add_bos=False), args.window)
    start = json.loads((args.model / "config.json").read_text())["bos_token_id"]
    n_bytes = len(text.encode("utf-8"))
    print(f"{args.model}: {n_bytes} bytes, {sum(map(len, pieces))} tokens, "
          f"windows of {args.window}")
    print(f"{'policy':8} {'bits/byte':>10} {'change':>10} {'top-1 = fp32':>13}")
    ref_bpb, ref_top = None, None
    for policy in ("fp32", "bf16", "ascend"):
        nats, top = run_policy(load(args.model, policy), pieces, start)
        bpb = nats / math.log(2) / n_bytes
        if ref_bpb is None:
            ref_bpb, ref_top = bpb, top
        agree = float((top == ref_top).mean())
        print(f"{policy:8} {bpb:10.4f} {bpb - ref_bpb:+10.4f} {agree:13.4%}", flush=True)


if __name__ == "__main__":
    main()

"""The MindFormers half of tools/crosscheck_mindformers.py; runs inside the MindFormers venv.

MindFormers 1.9.0 needs mindspore 2.9.0 and dsflow needs 2.10.0: two MindSpore versions
cannot share a process, so crosscheck_mindformers.py runs this script with the other
venv's python. It never imports dsflow; it only drives MindFormers' own code:

    convert   HF directory -> .ckpt   mindformers/models/llama/convert_weight.py, convert_pt_to_ms
    reverse   .ckpt -> torch .bin     mindformers/models/llama/convert_reversed.py, convert_ms_to_pt
    generate  greedy tokens and logits of mindformers/models/llama/llama.py LlamaForCausalLM,
              configured from a MindFormers predict yaml (the same yaml dsflow reads)

Results go to a JSON file (generate: tokens and logits as nested lists) so the caller
needs no MindSpore to read them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def convert(hf_dir: str, out: str, dtype: str) -> None:
    """MindFormers' HF -> MindSpore converter, as its convert_weight.py calls it."""
    import mindspore as ms
    from mindformers.models.llama.convert_weight import convert_pt_to_ms
    convert_pt_to_ms(hf_dir, out, dtype=getattr(ms, DTYPES[dtype]))


def reverse(ckpt: str, out: str, dtype: str) -> None:
    """MindFormers' MindSpore -> HF converter (a torch.save state dict)."""
    import torch
    from mindformers.models.llama.convert_reversed import convert_ms_to_pt
    convert_ms_to_pt(ckpt, out, dtype=getattr(torch, DTYPES[dtype]))


def cpu_model_config(yaml_path: str):
    """LlamaConfig from the predict yaml, with the settings MindFormers needs on CPU.

    Each override works around a missing CPU path in MindFormers 1.9.0 / MindSpore 2.9.0:
    - use_past=False: the incremental path (mindformers/modules/infer_attention.py,
      paged_attention_mgr.py) uses ReshapeAndCache, PagedAttention, FlashAttentionScore
      and ApplyRotaryPosEmb, none of which has a CPU kernel; every step then runs the
      whole padded sequence.
    - use_rope_slice=True: the default rotate-half in mindformers/modules/layers.py
      (RotaryEmbedding) multiplies by a swap matrix with a BatchMatMul that fails to
      broadcast on CPU; the slice form computes the same rotate-half with StridedSlice.
    - fused_rms_norm=False: the fused RmsNorm op used by LlamaRMSNorm
      (mindformers/models/llama/llama_layer.py) has no CPU kernel; False selects the
      composed (pow, mean, rsqrt) form.
    - float32 everywhere: bf16 MatMul/Gather are unsupported on CPU, fp16 is slow.
    """
    from mindformers import MindFormerConfig
    from mindformers.models.llama import LlamaConfig
    model_config = MindFormerConfig(yaml_path).model.model_config
    fields = {k: v for k, v in model_config.items() if k != "type"}
    fields.update(use_past=False, use_rope_slice=True, fused_rms_norm=False,
                  use_flash_attention=False, is_dynamic=False, do_sample=False,
                  compute_dtype="float32", param_init_type="float32",
                  layernorm_compute_type="float32", softmax_compute_type="float32",
                  rotary_dtype="float32", batch_size=1)
    return LlamaConfig(**fields)


def load_model(yaml_path: str, ckpt: str):
    """LlamaForCausalLM on CPU (PyNative), its weights from `ckpt` (all must be used)."""
    import mindspore as ms
    from mindformers.models.llama import LlamaForCausalLM
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    model = LlamaForCausalLM(cpu_model_config(yaml_path))
    model.set_train(False)
    not_loaded, unused = ms.load_param_into_net(model, ms.load_checkpoint(ckpt))
    if not_loaded or unused:
        raise SystemExit(f"{ckpt}: parameters not loaded {not_loaded}, unused {unused}")
    model.argmax = numpy_argmax
    return model


def numpy_argmax(logits, axis: int):
    """Stands in for `mint.argmax` (GenerationMixin.argmax, mindformers/generation/
    text_generator.py): its ArgMaxExt kernel is not registered for CPU."""
    import mindspore as ms
    return ms.Tensor(np.argmax(logits.asnumpy(), axis=axis).astype(np.int32))


def real_vocab_processor(real_vocab: int):
    """A MindFormers logits processor that never picks the embedding's padding rows
    (ids >= real_vocab), as transformers' reference and dsflow do not."""
    from mindformers.generation.logits_process import LogitsProcessor, LogitsProcessorList

    class RealVocabOnly(LogitsProcessor):
        def process_np(self, logits, sequence_ids):
            logits[..., real_vocab:] = -np.inf
            return logits

        def process_ms(self, logits, sequence_ids, **kwargs):
            import mindspore as ms
            return ms.Tensor(self.process_np(logits.asnumpy(), sequence_ids))

    processors = LogitsProcessorList()
    processors.append(RealVocabOnly())
    return processors


def greedy(model, prompt: list[int], new_tokens: int, real_vocab: int) -> list[int]:
    """MindFormers' own generate(), greedy; returns the new tokens only (fewer when it
    chose the end-of-sequence token, which the caller reports as a mismatch)."""
    out = model.generate([prompt], max_new_tokens=new_tokens, do_sample=False,
                         logits_processor=real_vocab_processor(real_vocab))
    return [int(t) for t in out[0][len(prompt):]]


def forced_logits(model, ids: list[int], first: int, seq_length: int, pad: int) -> np.ndarray:
    """Logits at positions first..len(ids)-1 of one forward pass over `ids` padded to
    seq_length: with use_past=False the graph only runs at seq_length (the shape its
    causal mask is built for, mindformers/models/llama/llama.py LlamaModel)."""
    import mindspore as ms
    padded = np.full((1, seq_length), pad, np.int32)
    padded[0, :len(ids)] = ids
    out = model(ms.Tensor(padded))
    logits = out[0] if isinstance(out, tuple) else out
    return logits.asnumpy().reshape(seq_length, -1)[first:len(ids)]


def generate(yaml_path: str, ckpt: str, prompts: list[list[int]], new_tokens: int,
             real_vocab: int) -> dict:
    model = load_model(yaml_path, ckpt)
    seq_length, pad = model.config.seq_length, model.config.pad_token_id
    runs = []
    for prompt in prompts:
        tokens = greedy(model, prompt, new_tokens, real_vocab)
        logits = forced_logits(model, prompt + tokens[:-1], len(prompt) - 1, seq_length, pad)
        runs.append({"tokens": tokens, "logits": logits.tolist()})
    return {"runs": runs}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert")
    c.add_argument("--hf", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--dtype", choices=DTYPES, required=True)
    r = sub.add_parser("reverse")
    r.add_argument("--ckpt", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--dtype", choices=DTYPES, required=True)
    g = sub.add_parser("generate")
    g.add_argument("--yaml", required=True)
    g.add_argument("--ckpt", required=True)
    g.add_argument("--prompts", required=True, help="JSON list of token id lists")
    g.add_argument("--new-tokens", type=int, required=True)
    g.add_argument("--real-vocab", type=int, required=True)
    g.add_argument("--out", required=True, help="JSON file for tokens and logits")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "convert":
        convert(args.hf, args.out, args.dtype)
    elif args.command == "reverse":
        reverse(args.ckpt, args.out, args.dtype)
    else:
        result = generate(args.yaml, args.ckpt, json.loads(Path(args.prompts).read_text()),
                          args.new_tokens, args.real_vocab)
        Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""HuggingFace DeepSeek-Coder -> MindSpore .ckpt with MindFormers names, streaming.

Takes the flags of MindFormers' research/deepseek/convert_weight.py (and of its
top-level convert_weight.py: --input_path/--output_path/--dtype), so existing
commands keep working:

    python tools/convert_weight.py \\
        --torch_ckpt_path ./deepseek-coder-33b-instruct/pytorch_model-00001-of-00007.bin \\
        --mindspore_ckpt_path ./deepseek_33b.ckpt

--torch_ckpt_path is, as there, any weights file of the HuggingFace directory (the
whole directory is converted) or the directory itself; safetensors, sharded .bin and
.ckpt inputs all work. Unlike the seed, nothing is loaded whole (peak memory is one
tensor, not the model in fp32), the .bin pickles are never executed, and the source
is validated against its config first. Default dtype: the checkpoint's own.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dsflow.export.weights.convert import run_tool, to_mindspore_ckpt
from dsflow.common.options import parse_dtype
from dsflow.common.errors import DsflowError

SUPPORTED_MODELS = ("deepseek", "llama")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--torch_ckpt_path", "--input_path", dest="src", default="./hf.bin",
                   help="a weights file of the HuggingFace directory, or the directory")
    p.add_argument("--mindspore_ckpt_path", "--output_path", dest="dst",
                   default="transform.ckpt", help="the .ckpt file to write")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: keep)")
    p.add_argument("--config", default=None,
                   help="config.json or MindFormers yaml, if not in the directory")
    p.add_argument("--model", default="deepseek", help="accepted for compatibility: "
                   + " or ".join(SUPPORTED_MODELS))
    p.add_argument("--qkv_concat", default="false", help="only false is supported")
    return p.parse_args(argv)


def convert(args: argparse.Namespace) -> Path:
    if args.model not in SUPPORTED_MODELS:
        raise DsflowError(f"--model {args.model}: this converter serves "
                          f"{', '.join(SUPPORTED_MODELS)}")
    if args.qkv_concat.lower() not in ("false", "0", "no"):
        raise DsflowError("--qkv_concat: fused q/k/v checkpoints are not supported")
    src = Path(args.src)
    model_dir = src if src.is_dir() else src.parent
    return to_mindspore_ckpt(model_dir, args.dst, parse_dtype(args.dtype), args.config)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_tool("convert_weight", lambda: convert(args))


if __name__ == "__main__":
    sys.exit(main())

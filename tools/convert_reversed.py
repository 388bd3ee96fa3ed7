"""MindSpore .ckpt with MindFormers names -> HuggingFace safetensors directory, streaming.

Takes the flags of MindFormers' research/deepseek/convert_reversed.py (plus --dtype,
as its top-level convert_weight.py --reversed does):

    python tools/convert_reversed.py --mindspore_ckpt_path ./deepseek_33b.ckpt \\
        --torch_ckpt_path ./deepseek-coder-33b-hf --config ./predict_deepseek_33b.yaml

--torch_ckpt_path names the HuggingFace directory to create. The seed wrote one
torch.save file there; dsflow writes safetensors (config.json, model*.safetensors,
tokenizer files) and never a pickle, so a path ending in .bin or .safetensors stands
for the directory without that suffix. The config comes from --config, else from a
config.json or MindFormers yaml beside the .ckpt; tokenizer files from
--tokenizer_dir, else from beside the .ckpt. Default dtype: the checkpoint's own.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dsflow.export.weights.convert import run_tool, to_hf_directory
from dsflow.common.options import parse_dtype


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mindspore_ckpt_path", "--input_path", dest="src",
                   default="transform.ckpt", help="the .ckpt file to read")
    p.add_argument("--torch_ckpt_path", "--output_path", dest="dst", default="./output",
                   help="the HuggingFace directory to create")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: keep)")
    p.add_argument("--config", default=None,
                   help="config.json or MindFormers yaml (default: beside the .ckpt)")
    p.add_argument("--tokenizer_dir", default=None,
                   help="where tokenizer files are (default: beside the .ckpt)")
    p.add_argument("--max_shard_size", type=int, default=5 * 10**9,
                   help="bytes per model-*.safetensors file")
    return p.parse_args(argv)


def output_dir(path: str) -> Path:
    p = Path(path)
    if p.suffix in (".bin", ".safetensors"):
        print(f"convert_reversed: writing the HuggingFace directory {p.with_suffix('')} "
              f"(safetensors) for {p}", file=sys.stderr)
        return p.with_suffix("")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_tool("convert_reversed", lambda: to_hf_directory(
        args.src, output_dir(args.dst), parse_dtype(args.dtype), args.config,
        args.tokenizer_dir, args.max_shard_size))


if __name__ == "__main__":
    sys.exit(main())

"""Sharding at 33B scale: peak RSS and throughput of `dsexport shard` next to a plain copy.

Synthesizes a checkpoint with DeepSeek-Coder-33B's real dimensions (hidden 7168,
intermediate 19200, 56 heads, 8 KV heads, vocab 32256, bf16) but only as many layers
as make at least --min-gib GiB, as index-sharded safetensors and as a .bin variant
(one torch.save per shard, as transformers 4.x wrote them), then for each variant:

- copies the same files to the same disk (shutil.copyfile + fsync), in a child process;
- shards them to --tp ranks with `rank_shards.write_shards` (what `dsexport shard`
  runs; files are fsynced too), in a child process.

Peak RSS is each child's own high-water mark, VmHWM in /proc/self/status, read by the
child as it finishes (not ru_maxrss: Linux carries that over from the parent through
fork and exec). The synthesis runs in children too. MB/s is source bytes / wall
seconds of the work (imports excluded) for both. Targets: peak RSS
<= 1 GiB + the largest single tensor; shard MB/s >= half the copy's.
Synthesized files are removed at the end unless --keep.

    python tools/bench_convert.py --workdir /work/bench-convert
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from dsflow.export.checkpoint.hf_writer import split_layout, write_hf_directory
from dsflow.export.checkpoint.mapped_file import nbytes
from dsflow.graphs.config import ModelConfig
from dsflow.graphs.tp_plan import weight_specs

MB, GIB = 10**6, 2**30
SHARD_BYTES = 2 * 10**9  # per checkpoint file, so both variants are index-sharded


def config_33b(layers: int) -> ModelConfig:
    return ModelConfig(vocab_size=32256, hidden_size=7168, intermediate_size=19200,
                       num_layers=layers, num_heads=56, num_kv_heads=8,
                       rope_theta=100000.0, rope_scaling_factor=4.0,
                       max_position_embeddings=16384, bos_token_id=32013,
                       eos_token_id=32021, torch_dtype="bfloat16")


def layers_for(min_bytes: int) -> int:
    """Fewest layers whose bf16 checkpoint holds at least `min_bytes`."""
    layers = 1
    while sum(nbytes(s.shape, "bfloat16") for s in weight_specs(config_33b(layers))) \
            < min_bytes:
        layers += 1
    return layers


def random_bf16(shape: tuple, rng: np.random.Generator) -> np.ndarray:
    """Finite bf16 bit patterns of magnitude < 2 (exponent below 0x80), random sign."""
    bits = rng.integers(0, 0x4000, size=shape, dtype=np.uint16)
    return bits | (rng.integers(0, 2, size=shape, dtype=np.uint16) << 15)


def synthesize(cfg: ModelConfig, out: Path) -> None:
    rng = np.random.default_rng(0)
    layout = [(s.name, s.shape, "bfloat16") for s in weight_specs(cfg)]
    tensors = ((name, random_bf16(shape, rng)) for name, shape, _ in layout)
    write_hf_directory(out, cfg.to_hf_dict(), layout, tensors, max_shard_bytes=SHARD_BYTES)


def to_bin_variant(st_dir: Path, out: Path) -> None:
    """pytorch_model-0000i-of-0000N.bin + index: torch.save of each shard's dict."""
    import torch
    from dsflow.export.checkpoint.safetensors import SafetensorsFile
    out.mkdir()
    shutil.copyfile(st_dir / "config.json", out / "config.json")
    files = [p.name for p in source_files(st_dir)]
    weight_map, total = {}, 0
    for i, fname in enumerate(files, 1):
        target = f"pytorch_model-{i:05d}-of-{len(files):05d}.bin"
        with SafetensorsFile(st_dir / fname) as f:
            shard = {n: torch.from_numpy(np.array(f.array(n)).view(np.int16))
                     .view(torch.bfloat16) for n in f.names()}
            total += f.size
        torch.save(shard, out / target)
        weight_map.update(dict.fromkeys(shard, target))
        del shard
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))


def source_files(model: Path) -> list[Path]:
    return sorted(p for p in model.iterdir() if p.suffix in (".safetensors", ".bin"))


# --- the measured children ---------------------------------------------------------

def child_copy(src: Path, dst: Path) -> dict:
    dst.mkdir()
    start = time.perf_counter()
    for p in source_files(src):
        shutil.copyfile(p, dst / p.name)
        with open(dst / p.name, "rb+") as f:
            os.fsync(f.fileno())
    return {"seconds": time.perf_counter() - start}


def child_shard(src: Path, dst: Path, tp: int) -> dict:
    from dsflow.export.weights.rank_files import write_shards
    start = time.perf_counter()
    index = write_shards(src, dst, tp)
    return {"seconds": time.perf_counter() - start,
            "written": sum(r["bytes"] for r in index.data["ranks"])}


def peak_rss() -> int:
    """This process's resident high-water mark in bytes."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/self/status has no VmHWM")


def measure(*args: str) -> dict:
    """Run this script as a child doing one job; its JSON result (with peak_rss)."""
    p = subprocess.run([sys.executable, __file__, "--child", *args], stdout=subprocess.PIPE,
                       check=False)
    if p.returncode:
        raise SystemExit(f"child {' '.join(args)} failed (exit {p.returncode})")
    return json.loads(p.stdout)


def bench_variant(name: str, model: Path, work: Path, tp: int, largest: int) -> dict:
    size = sum(p.stat().st_size for p in source_files(model))
    os.sync()
    copy = measure("copy", str(model), str(work / "copy"))
    shutil.rmtree(work / "copy")
    os.sync()
    shard = measure("shard", str(model), str(work / "shards"), "--tp", str(tp))
    shutil.rmtree(work / "shards")
    return {"variant": name, "source_bytes": size, "written": shard["written"],
            "copy_s": copy["seconds"], "shard_s": shard["seconds"],
            "rss": shard["peak_rss"], "rss_limit": GIB + largest}


def table(rows: list[dict], tp: int) -> str:
    lines = [f"| source | GB read | GB written (tp={tp}) | copy MB/s | shard MB/s | "
             "shard / copy | shard peak RSS MB | target RSS MB (1 GiB + largest tensor) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        copy_rate = r["source_bytes"] / r["copy_s"] / MB
        shard_rate = r["source_bytes"] / r["shard_s"] / MB
        lines.append(f"| {r['variant']} | {r['source_bytes'] / 1e9:.2f} | "
                     f"{r['written'] / 1e9:.2f} | {copy_rate:.0f} | {shard_rate:.0f} | "
                     f"{shard_rate / copy_rate:.2f} | {r['rss'] / MB:.0f} | "
                     f"{r['rss_limit'] / MB:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("bench-convert"))
    ap.add_argument("--tp", type=int, default=4)
    ap.add_argument("--min-gib", type=float, default=4.0)
    ap.add_argument("--formats", default="safetensors,bin")
    ap.add_argument("--keep", action="store_true", help="keep the synthesized checkpoints")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, src, dst = args.child[:3]
        jobs = {"copy": lambda: child_copy(Path(src), Path(dst)),
                "shard": lambda: child_shard(Path(src), Path(dst), args.tp),
                "synth": lambda: synthesize(config_33b(int(src)), Path(dst)) or {},
                "bin": lambda: to_bin_variant(Path(src), Path(dst)) or {}}
        print(json.dumps({**jobs[kind](), "peak_rss": peak_rss()}))
        return
    run(args)


def run(args: argparse.Namespace) -> None:
    cfg = config_33b(layers_for(int(args.min_gib * GIB)))
    total = sum(nbytes(s.shape, "bfloat16") for s in weight_specs(cfg))
    largest = max(nbytes(s.shape, "bfloat16") for s in weight_specs(cfg))
    formats = args.formats.split(",")
    need = total * (len(formats) + 1.5)
    args.workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.workdir).free
    if free < need:
        raise SystemExit(f"{args.workdir}: {free / 1e9:.1f} GB free, the benchmark needs "
                         f"{need / 1e9:.1f} GB")
    files = split_layout([(s.name, s.shape, "bfloat16") for s in weight_specs(cfg)],
                         SHARD_BYTES)
    print(f"33B dimensions, {cfg.num_layers} layers: {total / 1e9:.2f} GB of bf16 in "
          f"{len(files)} files; largest tensor {largest / MB:.0f} MB", file=sys.stderr)
    st_dir, bin_dir = args.workdir / "ckpt-safetensors", args.workdir / "ckpt-bin"
    rows = []
    try:
        if not st_dir.exists():
            measure("synth", str(cfg.num_layers), str(st_dir))
        if "safetensors" in formats:
            rows.append(bench_variant("safetensors", st_dir, args.workdir, args.tp, largest))
        if "bin" in formats:
            if not bin_dir.exists():
                measure("bin", str(st_dir), str(bin_dir))
            rows.append(bench_variant("pytorch .bin", bin_dir, args.workdir, args.tp,
                                      largest))
    finally:
        for d in ("copy", "shards"):
            shutil.rmtree(args.workdir / d, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(st_dir, ignore_errors=True)
            shutil.rmtree(bin_dir, ignore_errors=True)
    print(table(rows, args.tp))
    print(f"\ncommand: python tools/bench_convert.py --workdir {args.workdir} --tp {args.tp}"
          f" --min-gib {args.min_gib}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Train dsflow's embedded default model: DeepSeek-Coder's architecture at a small size,
from scratch, with torch on the CPU, on the Python standard library's own source.

Why the standard library: it is on every machine that runs dsflow and its licence (PSF)
allows redistributing a model derived from it. The real DeepSeek tokenizer may not be
redistributed, so a byte-level BPE is trained here on the same training files, in
DeepSeek-Coder's layout (BPE ids from 0, its special tokens at 32000..32021, 32256
embedding rows), and the tokenizer trained with is the tokenizer that ships.

Deterministic: a fixed sorted file list (recorded in the run directory), a hash split
into train / held-out, seeded initialisation, and batches drawn from a generator seeded
by (seed, step), so a run resumed from its checkpoint continues exactly where it was.

    python tools/train_default_model.py --run-dir /work/train-run --trial 90   # throughput
    python tools/train_default_model.py --run-dir /work/train-run              # train/resume
    python tools/train_default_model.py --run-dir /work/train-run \
        --export export/pipeline/default_model_files                          # ship it

Logs: RUN/log.jsonl (one line per step; eval lines carry held-out loss), RUN/ckpt.pt.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

# On a shared machine a spinning OpenMP thread burns the CPU share its partner waits
# for; passive waiting costs little when the cores are free.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# ids 32000.. as in DeepSeek-Coder: 13 reserved slots, then the special tokens
FIRST_SPECIAL_ID = 32000
RESERVED = [f"<|reserved_{i}|>" for i in range(13)]
SPECIAL = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜fim▁hole｜>",
           "<｜fim▁begin｜>", "<｜fim▁end｜>", "<pad>", "<|User|>", "<|Assistant|>", "<|EOT|>"]
BOS_ID, EOS_ID, EOT_ID = 32013, 32014, 32021
VOCAB_ROWS = 32256

# Same conversation format as DeepSeek-Coder-Instruct, written for this model.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages | selectattr('role', 'equalto', 'system') | list | length == 0 %}"
    "You are an AI programming assistant.\n{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n"
    "{% else %}### Response:\n{{ m['content'] }}\n<|EOT|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}")


@dataclasses.dataclass(frozen=True)
class Hyper:
    """Everything that decides the result; stored in RUN/run.json and checked on resume."""
    bpe_vocab: int = 8192
    hidden: int = 256
    intermediate: int = 688
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    seq: int = 256
    batch: int = 8
    steps: int = 800
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 40
    weight_decay: float = 0.1
    seed: int = 0
    heldout_every: int = 20       # 1 file in N (by hash of its path) is held out
    eval_windows: int = 32


# ---------------------------------------------------------------- data


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: Path) -> list[str]:
    """Sorted relative paths of the stdlib's own .py files (no tests, no site-packages:
    third-party packages there are not under the PSF licence)."""
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        parts = set(rel.parts)
        if parts & {"site-packages", "dist-packages", "test", "tests", "idle_test"}:
            continue
        try:
            p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        out.append(rel.as_posix())
    return out


def is_heldout(rel: str, every: int) -> bool:
    return int(hashlib.sha1(rel.encode()).hexdigest()[:8], 16) % every == 0


def split_files(files: list[str], every: int) -> tuple[list[str], list[str]]:
    train = [f for f in files if not is_heldout(f, every)]
    held = [f for f in files if is_heldout(f, every)]
    return train, held


def read_texts(root: Path, rels: list[str]) -> list[str]:
    return [(root / r).read_text(encoding="utf-8") for r in rels]


def train_tokenizer(texts: list[str], bpe_vocab: int, out_dir: Path, max_len: int) -> None:
    """tokenizer.json + tokenizer_config.json in DeepSeek-Coder's shape."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    # DeepSeek-Coder's pre-tokenization: newlines, words, punctuation runs and single
    # digits are split before byte-level BPE.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[\r\n]"), "isolated"),
        pre_tokenizers.Split(Regex(r"\s?\p{L}+"), "isolated"),
        pre_tokenizers.Split(Regex(r"\s?\p{P}+"), "isolated"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=bpe_vocab, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer, length=len(texts))
    filler = [f"<|unused_{i}|>" for i in range(FIRST_SPECIAL_ID - tok.get_vocab_size())]
    tok.add_special_tokens(filler + RESERVED + SPECIAL)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    bos, eot = SPECIAL[0], SPECIAL[-1]
    assert tok.token_to_id(bos) == BOS_ID and tok.token_to_id(eot) == EOT_ID
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": bos, "eos_token": eot,
        "pad_token": SPECIAL[1], "model_max_length": max_len,
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE,
    }, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def token_stream(tok_dir: Path, texts: list[str]) -> np.ndarray:
    """All files as one int32 stream: <bos> file <EOT> <bos> file <EOT> ..."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    parts = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        parts.append(np.asarray([BOS_ID] + enc.ids + [EOT_ID], np.int32))
    return np.concatenate(parts)


def prepare_data(run: Path, hp: Hyper) -> dict:
    """Tokenizer and token streams, made once per run directory and reused on resume."""
    root = stdlib_root()
    files = corpus_files(root)
    listing = run / "files.json"
    if listing.is_file():
        recorded = json.loads(listing.read_text())
        if recorded["files"] != files:
            sys.exit(f"{listing}: this Python's standard library differs from the one the "
                     "run started with; resume with the same Python")
    else:
        listing.write_text(json.dumps({"python": sys.version, "root": str(root),
                                       "files": files}, indent=1) + "\n")
    train, held = split_files(files, hp.heldout_every)
    tok_dir = run / "tokenizer"
    data = run / "data.npz"
    if not data.is_file():
        train_texts = read_texts(root, train)
        if not (tok_dir / "tokenizer.json").is_file():
            t0 = time.time()
            train_tokenizer(train_texts, hp.bpe_vocab, tok_dir, 16384)
            print(f"tokenizer trained in {time.time() - t0:.0f} s", flush=True)
        held_texts = read_texts(root, held)
        np.savez(data, train=token_stream(tok_dir, train_texts),
                 held=token_stream(tok_dir, held_texts),
                 held_bytes=np.int64(sum(len(t.encode()) + 0 for t in held_texts)))
    z = np.load(data)
    return {"train": z["train"], "held": z["held"], "held_bytes": int(z["held_bytes"]),
            "n_train_files": len(train), "n_held_files": len(held), "tok_dir": tok_dir}


# ---------------------------------------------------------------- model


def hf_config(hp: Hyper, max_len: int = 16384):
    """LlamaConfig with DeepSeek-Coder's settings at this size, via dsflow's ModelConfig
    (the one place the config.json layout is written)."""
    from transformers import LlamaConfig
    return LlamaConfig(**model_config(hp, max_len).to_hf_dict())


def model_config(hp: Hyper, max_len: int = 16384):
    from dsflow.graphs.config import ModelConfig
    return ModelConfig(
        vocab_size=VOCAB_ROWS, hidden_size=hp.hidden, intermediate_size=hp.intermediate,
        num_layers=hp.layers, num_heads=hp.heads, num_kv_heads=hp.kv_heads,
        rms_norm_eps=1e-6, rope_theta=100000.0, rope_scaling_factor=4.0,
        max_position_embeddings=max_len, bos_token_id=BOS_ID, eos_token_id=EOT_ID,
        torch_dtype="bfloat16")


class CompactHead(torch.nn.Module):
    """The LM head restricted to the ids that occur (BPE ids and the special tokens) plus
    one shared row standing for every unused id.

    Why: with an 8k BPE in 32256 rows, a full head spends three quarters of its compute
    on rows no text ever uses. Giving all unused rows one vector is exact, not an
    approximation: n identical logits hold the softmax mass of one logit + log(n). At
    export the shared row is copied into every unused row of lm_head.weight.
    """

    def __init__(self, hidden: int, bpe_vocab: int):
        super().__init__()
        self.bpe_vocab = bpe_vocab
        self.n_special = VOCAB_ROWS - FIRST_SPECIAL_ID  # rows 32000.. (real specials + pad rows)
        self.n_special_real = len(RESERVED) + len(SPECIAL)
        self.used = torch.nn.Parameter(torch.empty(bpe_vocab + self.n_special_real, hidden))
        self.unused = torch.nn.Parameter(torch.empty(1, hidden))
        torch.nn.init.normal_(self.used, std=0.02)
        torch.nn.init.normal_(self.unused, std=0.02)
        self.n_unused = VOCAB_ROWS - self.used.shape[0]
        self.register_buffer("log_n_unused", torch.tensor(math.log(self.n_unused)))

    def compact_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.where(ids >= FIRST_SPECIAL_ID, ids - FIRST_SPECIAL_ID + self.bpe_vocab, ids)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        rest = h @ self.unused.t() + self.log_n_unused
        return torch.cat([h @ self.used.t(), rest], dim=-1)

    def full_rows(self) -> torch.Tensor:
        """lm_head.weight [32256, hidden] equivalent to this head."""
        w = self.unused.detach().expand(VOCAB_ROWS, -1).clone()
        w[:self.bpe_vocab] = self.used.detach()[:self.bpe_vocab]
        w[FIRST_SPECIAL_ID:FIRST_SPECIAL_ID + self.n_special_real] = \
            self.used.detach()[self.bpe_vocab:]
        return w


def build(hp: Hyper):
    from transformers import LlamaForCausalLM
    torch.manual_seed(hp.seed)
    model = LlamaForCausalLM(hf_config(hp))
    model.lm_head.weight.requires_grad_(False)  # trained as CompactHead, filled at export
    head = CompactHead(hp.hidden, hp.bpe_vocab)
    return model, head


def optimizer(model, head, hp: Hyper) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in list(model.model.named_parameters()) + list(head.named_parameters()):
        (decay if p.ndim == 2 and "embed" not in name else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=hp.lr, betas=(0.9, 0.95), eps=1e-8)


def lr_at(step: int, hp: Hyper) -> float:
    if step < hp.warmup:
        return hp.lr * (step + 1) / hp.warmup
    t = (step - hp.warmup) / max(1, hp.steps - hp.warmup)
    return hp.lr * (hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def batch_at(stream: np.ndarray, step: int, hp: Hyper) -> torch.Tensor:
    """Random windows of seq+1 tokens, drawn from a generator seeded by (seed, step):
    the same step always sees the same batch, resumed or not."""
    rng = np.random.default_rng([hp.seed, step])
    starts = rng.integers(0, len(stream) - hp.seq - 1, hp.batch)
    return torch.from_numpy(np.stack([stream[s:s + hp.seq + 1] for s in starts]).astype(np.int64))


def loss_of(model, head, tokens: torch.Tensor) -> torch.Tensor:
    h = model.model(input_ids=tokens[:, :-1]).last_hidden_state
    logits = head(h)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), head.compact_ids(tokens[:, 1:]).reshape(-1))


def eval_windows(held: np.ndarray, hp: Hyper) -> torch.Tensor:
    """Fixed, evenly spaced held-out windows (the same for every eval of the run)."""
    n = min(hp.eval_windows, (len(held) - 1) // (hp.seq + 1))
    stride = (len(held) - hp.seq - 1) // n
    return torch.from_numpy(np.stack(
        [held[i * stride:i * stride + hp.seq + 1] for i in range(n)]).astype(np.int64))


@torch.no_grad()
def heldout_loss(model, head, windows: torch.Tensor) -> float:
    model.eval()
    total = sum(loss_of(model, head, windows[i:i + 4]).item() * len(windows[i:i + 4])
                for i in range(0, len(windows), 4))
    model.train()
    return total / len(windows)


# ---------------------------------------------------------------- checkpoints


def save_ckpt(run: Path, model, head, opt, step: int, elapsed: float) -> None:
    tmp = run / "ckpt.pt.tmp"
    torch.save({"model": model.state_dict(), "head": head.state_dict(),
                "opt": opt.state_dict(), "step": step, "elapsed": elapsed}, tmp)
    os.replace(tmp, run / "ckpt.pt")


def load_ckpt(run: Path, model, head, opt) -> tuple[int, float]:
    path = run / "ckpt.pt"
    if not path.is_file():
        return 0, 0.0
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    head.load_state_dict(state["head"])
    if opt is not None:
        opt.load_state_dict(state["opt"])
    return int(state["step"]), float(state["elapsed"])


def check_hyper(run: Path, hp: Hyper) -> None:
    path = run / "run.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != dataclasses.asdict(hp):
            diff = {k: (old.get(k), v) for k, v in dataclasses.asdict(hp).items()
                    if old.get(k) != v}
            sys.exit(f"{path}: this run was started with other settings {diff}; "
                     "use another --run-dir or the same settings")
    else:
        path.write_text(json.dumps(dataclasses.asdict(hp), indent=1) + "\n")


# ---------------------------------------------------------------- train / export


def progress(total: int, initial: int):
    try:
        from tqdm import tqdm
        return tqdm(total=total, initial=initial, unit="step", mininterval=5, file=sys.stderr)
    except ImportError:  # a plain line per step instead
        return None


def train(run: Path, hp: Hyper, trial_seconds: float = 0.0, ckpt_every: int = 50,
          eval_every: int = 50) -> None:
    data = prepare_data(run, hp)
    print(f"train tokens {len(data['train']):,} ({data['n_train_files']} files), held-out "
          f"tokens {len(data['held']):,} ({data['n_held_files']} files, "
          f"{data['held_bytes']:,} bytes)", flush=True)
    model, head = build(hp)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters {n_params:,} (shipped, incl. 2 x {VOCAB_ROWS} x {hp.hidden} "
          f"embedding/head rows)", flush=True)
    opt = optimizer(model, head, hp)
    step, elapsed = (0, 0.0) if trial_seconds else load_ckpt(run, model, head, opt)
    windows = eval_windows(data["held"], hp)
    log = open(run / ("trial.jsonl" if trial_seconds else "log.jsonl"), "a")
    bar = None if trial_seconds else progress(hp.steps, step)
    model.train()
    t_start, cpu_start = time.time(), time.process_time()
    args_threads = torch.get_num_threads()
    t_mark, done_tokens = time.time(), 0
    while step < hp.steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, hp)
        loss = loss_of(model, head, batch_at(data["train"], step, hp))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(
            [p for g in opt.param_groups for p in g["params"]], 1.0).item()
        opt.step()
        step += 1
        now = time.time()
        elapsed += now - t_mark
        done_tokens += hp.batch * hp.seq
        t_mark = now
        row = {"step": step, "loss": round(loss.item(), 4), "lr": lr_at(step - 1, hp),
               "gnorm": round(gnorm, 3), "tokens": step * hp.batch * hp.seq,
               "train_seconds": round(elapsed, 1)}
        if trial_seconds:
            rate = done_tokens / (now - t_start)
            cpu = time.process_time() - cpu_start
            print(f"step {step} loss {loss.item():.3f} {rate:.0f} tokens/s, "
                  f"{done_tokens / cpu * args_threads:.0f} tokens/s per {args_threads} "
                  "uncontended cores (from CPU time)", flush=True)
            if now - t_start > trial_seconds:
                print(f"TRIAL {rate:.0f} tokens/s -> {hp.steps} steps take "
                      f"{hp.steps * hp.batch * hp.seq / rate / 60:.1f} min", flush=True)
                return
            continue
        if step % eval_every == 0 or step == hp.steps:
            t0 = time.time()
            row["heldout_loss"] = round(heldout_loss(model, head, windows), 4)
            t_mark += time.time() - t0  # evaluation is not training time
        log.write(json.dumps(row) + "\n")
        log.flush()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", held=row.get("heldout_loss", ""))
        else:
            print(json.dumps(row), flush=True)
        if step % ckpt_every == 0 or step == hp.steps:
            save_ckpt(run, model, head, opt, step, elapsed)
    if bar is not None:
        bar.close()
    print(f"done: {step} steps, {elapsed / 60:.1f} training minutes", flush=True)


def export(run: Path, hp: Hyper, out: Path, unfinished: bool = False) -> None:
    """The shipped files: bf16 safetensors, config, generation config, tokenizer.
    `unfinished` exports a mid-run checkpoint (for developing against; never to ship):
    training.json then says so."""
    import shutil
    from safetensors.torch import save_file
    model, head = build(hp)
    step, elapsed = load_ckpt(run, model, head, None)
    if step != hp.steps and not unfinished:
        sys.exit(f"{run / 'ckpt.pt'}: training is at step {step} of {hp.steps}; "
                 "finish it (run again without --export) before exporting")
    with torch.no_grad():
        model.lm_head.weight.copy_(head.full_rows())
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = model_config(hp).to_hf_dict()
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": BOS_ID, "eos_token_id": [EOT_ID, EOS_ID], "do_sample": False,
    }, indent=2) + "\n")
    # the tokenizer trained with, saved compactly (24k filler entries make it large)
    from tokenizers import Tokenizer
    Tokenizer.from_file(str(run / "tokenizer" / "tokenizer.json")).save(
        str(out / "tokenizer.json"), pretty=False)
    shutil.copyfile(run / "tokenizer" / "tokenizer_config.json", out / "tokenizer_config.json")
    write_licence_notes(out)
    files = json.loads((run / "files.json").read_text())
    train_files, held = split_files(files["files"], hp.heldout_every)
    (out / "training.json").write_text(json.dumps({
        "steps": step, "finished": step == hp.steps, "train_minutes": round(elapsed / 60, 1),
        "hyper": dataclasses.asdict(hp), "tokens_seen": step * hp.batch * hp.seq,
        "python": files["python"], "train_files": len(train_files),
        # paths relative to the standard library; never seen in training
        "heldout_files": held}, indent=1) + "\n")
    for f in out.iterdir():
        f.chmod(0o644)  # safetensors writes 0600; installed package data must be readable
    print(f"exported step {step} to {out}")


def write_licence_notes(out: Path) -> None:
    """The PSF licence travels with a model derived from the standard library's source
    (its terms ask derivative works to retain the licence and copyright notice)."""
    import shutil
    licence = stdlib_root() / "LICENSE.txt"
    if licence.is_file():
        shutil.copyfile(licence, out / "PSF-LICENSE.txt")
    (out / "NOTICE.md").write_text(
        "# dsflow embedded default model\n\n"
        "A small model of the DeepSeek-Coder architecture trained from scratch by\n"
        "tools/train_default_model.py on the source files of the Python standard library\n"
        f"(Python {sys.version.split()[0]}; tests and site-packages excluded). The training\n"
        "data is Copyright (c) Python Software Foundation and used under the PSF License\n"
        "Agreement, reproduced in PSF-LICENSE.txt. The tokenizer is a byte-level BPE trained\n"
        "on the same files; it is not DeepSeek's tokenizer. No DeepSeek weights or data\n"
        "were used. See docs/DEFAULT_MODEL.md (the model card) for what it is for.\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", type=Path, default=Path("/work/train-run"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trial", type=float, default=0.0,
                    help="measure throughput for this many seconds and stop")
    ap.add_argument("--export", type=Path, default=None,
                    help="write the shipped model files from the finished run to this dir")
    ap.add_argument("--unfinished", action="store_true",
                    help="with --export: allow a mid-run checkpoint (development only)")
    for f in dataclasses.fields(Hyper):
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    hp = Hyper(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Hyper)})
    args.run_dir.mkdir(parents=True, exist_ok=True)
    if args.trial:
        train(args.run_dir, hp, trial_seconds=args.trial)
        return
    check_hyper(args.run_dir, hp)
    if args.export:
        export(args.run_dir, hp, args.export, args.unfinished)
    else:
        train(args.run_dir, hp)


if __name__ == "__main__":
    main()

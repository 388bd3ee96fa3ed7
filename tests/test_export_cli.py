"""`dsexport build`: artifacts, manifest, and one clear line for every bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dsflow.export.cli.main import main as dsexport
from dsflow.artifacts.manifest import read_manifest
from dsflow.common.checksums import sha256_file
from dsflow.export.checkpoint.safetensors import SafetensorsFile, write_safetensors
from dsflow.graphs.signatures import graph_signature


def run(*args) -> tuple[int, str]:
    result = CliRunner().invoke(dsexport, ["build", "-q", *map(str, args)])
    return result.exit_code, result.output


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_weights(ckpt: Path, edit) -> None:
    """Rewrite model.safetensors with edit(name, array) -> array or None (drop)."""
    path = ckpt / "model.safetensors"
    f = SafetensorsFile(path)
    items = []
    for name in f.names():
        arr = edit(name, np.array(f.array(name)))
        if arr is not None:
            items.append((name, arr, "float32"))
    f.close()
    write_safetensors(path, items)


def no_leftovers(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_manifest_describes_and_checksums_everything(export_tiny, tiny_checkpoint):
    art = export_tiny(2)
    m = read_manifest(art)
    assert m.tp == 2 and m.dtype == "float32" and m.target == "cpu"
    assert m.config.num_kv_heads == 4 and m.config.rope_scaling_factor == 4.0
    files = m.data["files"]
    on_disk = {p.relative_to(art).as_posix() for p in art.rglob("*")
               if p.is_file() and p.name != "manifest.json"}
    assert set(files) == on_disk
    for rel, info in files.items():
        assert sha256_file(art / rel) == info["sha256"]
    for rank in range(2):
        for kind in ("prefill", "decode"):
            g = m.graph(rank, kind)
            assert (art / g["file"]).is_file()
            sig = graph_signature(kind, m.config, 2, "float32").to_dict()
            assert g["inputs"] == sig["inputs"] and g["outputs"] == sig["outputs"]
    assert m.data["kv_cache"]["layout"] == ["layers", "slots", "kv_heads_per_rank", "capacity",
                                            "head_dim"]
    assert m.data["kv_cache"]["max_seq_len"] == 512
    assert {e["split"] for e in m.data["tp_plan"]} == {"replicate", "column", "row", "vocab"}
    assert m.data["mindspore_version"] and m.data["dsflow_version"]
    assert (art / "tokenizer" / "tokenizer.json").is_file()
    m.verify()


def test_tp_that_does_not_divide_heads_is_refused(tiny_checkpoint, tmp_path):
    code, out = run("--model", tiny_checkpoint, "--tp", 3, "--out", tmp_path / "a")
    assert code == 1
    assert "--tp 3" in out and "valid values: 1, 2, 4" in out
    assert not (tmp_path / "a").exists() and no_leftovers(tmp_path)


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path):
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path / "ck")
    rewrite_weights(ckpt, lambda n, a: None if n == "model.layers.1.mlp.up_proj.weight" else a)
    code, out = run("--model", ckpt, "--out", tmp_path / "a")
    assert code == 1 and "'model.layers.1.mlp.up_proj.weight' is missing" in out
    assert "Traceback" not in out and not (tmp_path / "a").exists()


def test_wrong_shape_is_named(tiny_checkpoint, tmp_path):
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path / "ck")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (ckpt / "config.json").write_text(json.dumps(cfg))
    code, out = run("--model", ckpt, "--out", tmp_path / "a")
    assert code == 1 and "mlp.gate_proj.weight' has shape [128, 64]" in out
    assert "[96, 64]" in out


def test_unknown_architecture(tiny_checkpoint, tmp_path):
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path / "ck")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    code, out = run("--model", ckpt, "--out", tmp_path / "a")
    assert code == 1 and "architecture 'GPT2LMHeadModel' is not supported" in out


def test_truncated_weights_file(tiny_checkpoint, tmp_path):
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path / "ck")
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, out = run("--model", ckpt, "--out", tmp_path / "a")
    assert code == 1 and "model.safetensors" in out and "truncated" in out


def test_nan_tensor_fails_midway_and_leaves_nothing(tiny_checkpoint, tmp_path):
    """NaNs only in rank 1's half of a row-parallel weight: rank 0 is fully exported
    before the error, and still nothing may remain."""
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path / "ck")
    bad = "model.layers.1.self_attn.o_proj.weight"

    def poison(name, a):
        if name == bad:
            a[:, a.shape[1] // 2:] = np.nan
        return a
    rewrite_weights(ckpt, poison)
    code, out = run("--model", ckpt, "--tp", 2, "--out", tmp_path / "a")
    assert code == 1 and bad in out and "NaN" in out
    assert not (tmp_path / "a").exists() and no_leftovers(tmp_path)


def test_output_not_writable(tiny_checkpoint, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, out = run("--model", tiny_checkpoint, "--out", blocker / "a")
    assert code == 1 and "--out" in out and "cannot write" in out


def test_refuses_to_overwrite_a_foreign_directory(tiny_checkpoint, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "precious.txt").write_text("keep me")
    code, out = run("--model", tiny_checkpoint, "--out", tmp_path / "a")
    assert code == 1 and "refusing to overwrite" in out
    assert (tmp_path / "a" / "precious.txt").read_text() == "keep me"


def test_missing_model_dir(tmp_path):
    code, out = run("--model", tmp_path / "nope", "--out", tmp_path / "a")
    assert code == 1 and "nope" in out and "Traceback" not in out


def test_rebuild_replaces_previous_build(export_tiny, tiny_checkpoint, tmp_path):
    out = tmp_path / "a"
    assert run("--model", tiny_checkpoint, "--out", out, "--max-seq-len", 128)[0] == 0
    assert read_manifest(out).max_seq_len == 128
    assert run("--model", tiny_checkpoint, "--out", out, "--max-seq-len", 256)[0] == 0
    assert read_manifest(out).max_seq_len == 256 and no_leftovers(tmp_path)


def test_help_explains_options():
    result = CliRunner().invoke(dsexport, ["build", "--help"])
    assert result.exit_code == 0
    for option in ("--model", "--tp", "--out", "--max-seq-len"):
        assert option in result.output


def test_ascend_build_writes_lite_configs_and_the_conversion_script(tiny_checkpoint, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no converter_lite
    monkeypatch.delenv("MSLITE_HOME", raising=False)
    out = tmp_path / "asc"
    result = CliRunner().invoke(dsexport, ["build", "--model", str(tiny_checkpoint), "--tp", "2",
                                           "--target", "ascend", "--buckets", "64,128",
                                           "--batch-sizes", "1,2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"{out}/convert_for_ascend.sh" in result.output and ".tmp-" not in result.output
    m = read_manifest(out)
    assert (m.target, m.dtype, m.cache_dtype, m.buckets) == ("ascend", "bfloat16", "float16",
                                                             [64, 128])
    for g in m.data["graphs"]:
        assert g["stage"] == "mindir" and (out / g["config"]).is_file()
    # the KV cache stays on the device: 2 slots (the largest batch gear) x 128 positions
    # (the largest bucket), fixed; one gear per batch size
    assert (m.cache_mode, m.resident_shape) == ("resident", (2, 128))
    ini = (out / "rank1" / "decode.ini").read_text()
    assert "key_cache:2,2,2,128,8;" in ini and "ge.dynamicDims=1,1,1;2,2,2\n" in ini
    assert (out / "rank_table.json").is_file() and (out / "convert_for_ascend.sh").is_file()
    m.verify()


@pytest.mark.parametrize("args, message, status", [
    (["--cache-mode", "paged"], "'paged' is not one of 'window', 'resident'", 2),
    (["--target", "cpu", "--dtype", "bfloat16"], "no CPU kernels for bf16", 1),
    (["--target", "cpu", "--dtype", "bf16"], "no CPU kernels for bf16", 1),
    (["--dtype", "int8"], "--dtype int8: unknown dtype", 2),  # invalid in itself: usage
    (["--target", "ascend", "--dtype", "float32"], "need bfloat16 or float16", 1),
    (["--buckets", "64,x"], "--buckets '64,x'", 2),
    (["--buckets", "1024", "--max-seq-len", "512"], "exceeds --max-seq-len 512", 1),
])
def test_bad_target_options(tiny_checkpoint, tmp_path, args, message, status):
    code, out = run("--model", tiny_checkpoint, "--out", tmp_path / "a", *args)
    assert code == status and message in out and not (tmp_path / "a").exists()

"""Paths read from untrusted files stay inside their directory (issue 18).

A checkpoint index (safetensors and PyTorch), a shards index and an artifacts manifest
name files relative to their directory; a relative escape (`../x`), an absolute path or
a symlink that points out is refused with one line naming the entry, exit 1, and no
output directory left behind. One helper does it: dsflow.common.paths.inside.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from dsflow.common.errors import CheckpointError, DsflowError
from dsflow.common.paths import PathEscapeError, hub_cache_root, inside
from test_cli_errors import one_error_line, run_cmd

ESCAPES = ("relative", "absolute", "symlink")


def _escape(kind: str, directory: Path, outside_file: Path) -> str:
    """The name an untrusted index uses to reach `outside_file` from `directory`."""
    if kind == "relative":
        return os.path.relpath(outside_file, directory)  # ../outside/...
    if kind == "absolute":
        return str(outside_file)
    link = directory / ("innocent" + outside_file.suffix)
    link.symlink_to(outside_file)
    return link.name


# --- the helper ------------------------------------------------------------------

def test_inside_accepts_plain_names_and_subdirectories(tmp_path):
    assert inside(tmp_path, "rank0/prefill.mindir", "x") == tmp_path / "rank0" / "prefill.mindir"
    assert inside(tmp_path, "a/./b", "x") == tmp_path / "a" / "b"
    (tmp_path / "real").write_text("x")
    (tmp_path / "alias").symlink_to(tmp_path / "real")  # a symlink that stays inside
    assert inside(tmp_path, "alias", "x") == tmp_path / "alias"


@pytest.mark.parametrize("name,needle", [
    ("../x", "'..'"), ("a/../../x", "'..'"), ("a\\..\\..\\x", "'..'"),
    ("/etc/passwd", "absolute"), ("C:\\Windows\\x", "absolute"), ("C:x", "absolute"),
    ("", "not a file name"), (7, "not a file name"), (None, "not a file name"),
    ("a\0b", "not a file name"),
])
def test_inside_refuses_escapes(tmp_path, name, needle):
    with pytest.raises(PathEscapeError, match=needle) as e:
        inside(tmp_path, name, "index.json: tensor 'w'")
    assert str(e.value).startswith("index.json: tensor 'w': ")


def test_inside_refuses_symlinks_out_even_through_a_directory(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("x")
    root = tmp_path / "root"
    root.mkdir()
    (root / "sub").symlink_to(outside, target_is_directory=True)
    with pytest.raises(PathEscapeError, match="symlink to .*outside"):
        inside(root, "sub/secret", "m")
    (root / "loop").symlink_to(root / "loop")
    with pytest.raises(PathEscapeError):
        inside(root, "loop", "m")


def test_hub_cache_snapshot_symlinks_into_its_blobs_are_allowed(tmp_path):
    """transformers' own cache: snapshots/<rev>/<file> -> ../../blobs/<sha>."""
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "blobs" / "f00d").write_text("x")
    (snap / "model.safetensors").symlink_to(Path("../../blobs/f00d"))
    assert hub_cache_root(snap) == repo
    assert hub_cache_root(tmp_path) is None
    assert inside(snap, "model.safetensors", "m", symlink_root=repo) == snap / "model.safetensors"
    with pytest.raises(PathEscapeError):
        inside(snap, "model.safetensors", "m")  # without the hub bound: outside


# --- checkpoints -----------------------------------------------------------------

def _sharded_checkpoint(src: Path, dst: Path, kind: str, fmt: str) -> Path:
    """A copy of `src` whose index maps every tensor to a weights file outside it."""
    dst.mkdir()
    outside = dst.parent / f"outside-{kind}"
    outside.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(src / f, dst / f)
    if fmt == "safetensors":
        from dsflow.export.checkpoint.safetensors import SafetensorsFile
        weights, index = "model.safetensors", "model.safetensors.index.json"
        shutil.copyfile(src / weights, outside / weights)
        with SafetensorsFile(outside / weights) as f:
            names = f.names()
    else:  # the same tensors as a torch.save'd state dict
        import torch
        from dsflow.export.checkpoint.safetensors import SafetensorsFile
        weights, index = "pytorch_model-00001-of-00001.bin", "pytorch_model.bin.index.json"
        with SafetensorsFile(src / "model.safetensors") as f:
            sd = {n: torch.from_numpy(f.array(n).copy()) for n in f.names()}
        torch.save(sd, outside / weights)
        names = list(sd)
    target = _escape(kind, dst, outside / weights)
    (dst / index).write_text(json.dumps({"metadata": {},
                                         "weight_map": {n: target for n in names}}))
    return dst


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ESCAPES)
def test_build_refuses_a_safetensors_index_entry_that_leaves_the_checkpoint(
        tiny_checkpoint, tmp_path, kind):
    model = _sharded_checkpoint(tiny_checkpoint, tmp_path / "ckpt", kind, "safetensors")
    out = tmp_path / "out"
    r = run_cmd("dsexport", "build", "--model", model, "--out", out, "--max-seq-len", "64")
    line = one_error_line(r.stderr, "dsexport")
    assert r.returncode == 1, line
    assert "model.safetensors.index.json: tensor " in line, line
    assert {"relative": "'..'", "absolute": "absolute", "symlink": "symlink to"}[kind] in line
    assert not out.exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("kind", ESCAPES)
def test_pytorch_index_entry_that_leaves_the_checkpoint(tiny_checkpoint, tmp_path, kind):
    from dsflow.export.checkpoint.reader import Checkpoint
    model = _sharded_checkpoint(tiny_checkpoint, tmp_path / "ckpt", kind, "pytorch")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin\.index\.json: tensor "):
        Checkpoint(model)


def test_the_same_index_inside_the_checkpoint_is_read(tiny_checkpoint, tmp_path):
    """The control: an index naming a file in the directory opens (the refusals above
    are about where the file is, not about sharded checkpoints)."""
    from dsflow.export.checkpoint.reader import Checkpoint
    model = _sharded_checkpoint(tiny_checkpoint, tmp_path / "ckpt", "relative", "safetensors")
    shutil.move(str(tmp_path / "outside-relative" / "model.safetensors"), model / "w.safetensors")
    index = json.loads((model / "model.safetensors.index.json").read_text())
    index["weight_map"] = {n: "w.safetensors" for n in index["weight_map"]}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with Checkpoint(model) as ckpt:
        ckpt.validate()
        assert ckpt.files == [model / "w.safetensors"]


def test_a_hub_cache_snapshot_with_an_index_is_read(tiny_checkpoint, tmp_path):
    """transformers' cache layout: every file of the snapshot is a symlink into the
    repo's blobs; the index names them by their snapshot names."""
    from dsflow.export.checkpoint.reader import Checkpoint
    from dsflow.export.checkpoint.safetensors import SafetensorsFile
    repo = tmp_path / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(("config.json", "tokenizer.json", "tokenizer_config.json",
                           "model.safetensors")):
        shutil.copyfile(tiny_checkpoint / f, blobs / f"blob{i}")
        target = "model-00001-of-00001.safetensors" if f == "model.safetensors" else f
        (snap / target).symlink_to(Path("../../blobs") / f"blob{i}")
    with SafetensorsFile(tiny_checkpoint / "model.safetensors") as f:
        names = f.names()
    index = {"weight_map": {n: "model-00001-of-00001.safetensors" for n in names}}
    (snap / "model.safetensors.index.json").write_text(json.dumps(index))
    with Checkpoint(snap) as ckpt:
        ckpt.validate()
        assert ckpt.files == [snap / "model-00001-of-00001.safetensors"]


# --- shards index and artifacts manifest ----------------------------------------

@pytest.fixture(scope="module")
def shards_dir(tiny_checkpoint, tmp_path_factory):
    from dsflow.export.checkpoint.reader import Checkpoint
    from dsflow.export.weights.rank_files import write_shards
    out = tmp_path_factory.mktemp("shards") / "sh"
    with Checkpoint(tiny_checkpoint) as ckpt:
        write_shards(ckpt, out, 2, "float32")
    return out


@pytest.mark.parametrize("kind", ESCAPES)
@pytest.mark.parametrize("field", ["ranks", "side_files"])
def test_shards_index_paths_stay_inside(shards_dir, tmp_path, kind, field):
    from dsflow.export.weights.rank_files import ShardsError, read_index
    copy = tmp_path / "sh"
    shutil.copytree(shards_dir, copy, symlinks=True)
    data = json.loads((copy / "shards.json").read_text())
    secret = tmp_path / "secret.safetensors"
    secret.write_text("x")
    name = _escape(kind, copy, secret)
    if field == "ranks":
        data["ranks"][1]["file"] = name
    else:
        data["side_files"] = {name: next(iter(data["side_files"].values()))}
    (copy / "shards.json").write_text(json.dumps(data))
    with pytest.raises(ShardsError, match=r"shards\.json: " + field):
        read_index(copy)


def _manifest_copy(artifacts: Path, tmp_path: Path) -> tuple[Path, dict]:
    """A directory with only the manifest of `artifacts` (enough to read it)."""
    art = tmp_path / "art"
    art.mkdir()
    return art, json.loads((artifacts / "manifest.json").read_text())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ESCAPES)
def test_dsrun_refuses_a_manifest_graph_path_that_leaves_the_artifacts(
        export_tiny, tmp_path, kind):
    art, data = _manifest_copy(export_tiny(1), tmp_path)
    secret = tmp_path / "secret.mindir"
    secret.write_text("x")
    data["graphs"][0]["file"] = _escape(kind, art, secret)
    (art / "manifest.json").write_text(json.dumps(data))
    r = run_cmd("dsrun", "--artifacts", art, "--prompt", "x")
    line = one_error_line(r.stderr, "dsrun")
    assert r.returncode == 1 and "manifest.json: graphs[0].file: path " in line, line


@pytest.mark.parametrize("edit,needle", [
    (lambda d, bad: d["files"].update({bad: {"bytes": 1, "sha256": "0"}}), "files"),
    (lambda d, bad: d["graphs"][1].update(config=bad), "graphs[1].config"),
    (lambda d, bad: d["graphs"][0].update(lite_file=bad, stage="lite"), "graphs[0].lite_file"),
    (lambda d, bad: d["graphs"][0].update(lite_stem=bad), "graphs[0].lite_stem"),
    (lambda d, bad: d.update(lite={"rank_table": bad}), "lite.rank_table"),
])
@pytest.mark.parametrize("kind", ESCAPES)
def test_every_manifest_path_stays_inside(export_tiny, tmp_path, edit, needle, kind):
    from dsflow.artifacts.manifest import ManifestError, read_manifest
    art, data = _manifest_copy(export_tiny(1), tmp_path)
    secret = tmp_path / "secret"
    secret.write_text("x")
    edit(data, _escape(kind, art, secret))
    (art / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError) as e:
        read_manifest(art)
    assert f"manifest.json: {needle}: path " in str(e.value)


def test_tokenizer_directory_symlinked_out_is_refused(export_tiny, tmp_path):
    from dsflow.artifacts.manifest import read_manifest
    art, data = _manifest_copy(export_tiny(1), tmp_path)
    data["files"] = {}
    (art / "manifest.json").write_text(json.dumps(data))
    (art / "tokenizer").symlink_to(export_tiny(1) / "tokenizer", target_is_directory=True)
    with pytest.raises(DsflowError, match="tokenizer directory: path 'tokenizer' is a symlink"):
        read_manifest(art).tokenizer_dir()


def test_lite_model_file_stays_inside(tmp_path):
    from dsflow.artifacts.lite import LiteBuildError, model_file
    assert model_file(tmp_path, {"stage": "lite", "lite_file": "rank0/p.mindir"}) == \
        tmp_path / "rank0" / "p.mindir"
    for entry in ({"stage": "lite", "lite_file": "../p.mindir"},
                  {"lite_stem": "/tmp/p"}, {"file": "../../p.mindir"}):
        with pytest.raises(LiteBuildError, match="graph entry"):
            model_file(tmp_path, entry)

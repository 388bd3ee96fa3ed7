"""One error path for dsexport, dsrun and dsserve: exit status, one line, no traceback.

    0 success, 1 failure, 2 usage error, 130 interrupted (Ctrl-C is tested in
    test_runtime.py and below for dsexport).
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from dsflow.artifacts.manifest import FORMAT_VERSION
from dsflow.export.cli.main import main as dsexport

COMMANDS = {"dsexport": "dsflow.export.cli.main", "dsrun": "dsflow.runtime.cli",
            "dsserve": "dsflow.runtime.server.cli"}


def run_cmd(name: str, *args, stdin: bytes = b"", timeout: float = 120,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """The command as a user runs it: a fresh process, stdin not a terminal."""
    code = f"from {COMMANDS[name]} import main; main(prog_name={name!r})"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], input=stdin,
                          capture_output=True, timeout=timeout, env=env)


def one_error_line(stderr: bytes, prog: str) -> str:
    text = stderr.decode("utf-8", "replace").strip()
    assert "Traceback" not in text, text
    lines = text.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), text
    return lines[0]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_version_on_every_command(name):
    r = run_cmd(name, "--version")
    assert r.returncode == 0 and r.stdout.decode().startswith(f"{name} (dsflow) ")


@pytest.mark.parametrize("name,args", [
    ("dsexport", ["build", "--tp", "x"]),
    ("dsrun", ["--max-new-tokens", "many"]),
    ("dsserve", ["--port", "http"]),
    ("dsexport", ["frobnicate"]),
])
def test_usage_errors_exit_2(name, args):
    r = run_cmd(name, *args)
    assert r.returncode == 2 and b"Traceback" not in r.stderr


def _manifest_dir(tmp_path: Path, content: str | bytes) -> Path:
    art = tmp_path / "art"
    art.mkdir()
    data = content.encode() if isinstance(content, str) else content
    (art / "manifest.json").write_bytes(data)
    return art


GOOD_HEAD = {"format": "dsflow-artifacts", "format_version": FORMAT_VERSION}


@pytest.mark.parametrize("content,needle", [
    ("{not json", "manifest.json"),
    (b"\xff\xfe\x00garbage", "manifest.json"),
    (json.dumps({"format": "something-else"}), "not a dsflow-artifacts document"),
    (json.dumps({**GOOD_HEAD, "target": "cpu"}), "tp is missing"),
    (json.dumps({**GOOD_HEAD, "target": "cpu", "tp": 1, "dtype": "float32", "model": {},
                 "kv_cache": {"dtype": "float32", "max_seq_len": 8}, "graphs": [],
                 "files": {}}), "model section is not a valid config"),
    (json.dumps({**GOOD_HEAD, "format_version": 99}), "newer than this dsflow"),
    (json.dumps({**GOOD_HEAD, "format_version": 1}), "older than this dsflow reads"),
])
def test_bad_manifests_are_one_line(tmp_path, content, needle):
    art = _manifest_dir(tmp_path, content)
    r = run_cmd("dsrun", "--artifacts", art, "--prompt", "x")
    assert r.returncode == 1
    assert needle in one_error_line(r.stderr, "dsrun")


def test_missing_artifacts_for_every_runtime_command(tmp_path):
    for name in ("dsrun", "dsserve"):
        args = ["--artifacts", tmp_path / "none"] + (["--prompt", "x"] if name == "dsrun" else [])
        r = run_cmd(name, *args)
        assert r.returncode == 1
        assert "no such artifacts directory" in one_error_line(r.stderr, name)


def test_invalid_utf8_on_stdin(tmp_path):
    r = run_cmd("dsrun", "--artifacts", tmp_path / "none", stdin=b"def f():\n\xff\xfe oops")
    assert r.returncode == 1
    assert "not valid UTF-8" in one_error_line(r.stderr, "dsrun")


def test_bad_option_value_is_a_usage_error(tmp_path):
    r = run_cmd("dsrun", "--artifacts", tmp_path, "--prompt", "x", "--temperature", "-1")
    assert r.returncode == 2 and "--temperature" in one_error_line(r.stderr, "dsrun")
    r = run_cmd("dsexport", "build", "--buckets", "512,abc", "--out", tmp_path / "o")
    assert r.returncode == 2 and "--buckets" in one_error_line(r.stderr, "dsexport")


def _raise_in_build(monkeypatch, exc: BaseException) -> None:
    from dsflow.export.pipeline import build as build_module

    def fail(*_a, **_k):
        raise exc
    monkeypatch.setattr(build_module, "build", fail)


@pytest.mark.parametrize("exc,needle", [
    (OSError(errno.ENOSPC, "No space left on device", "/out/manifest.json"),
     "/out/manifest.json: No space left on device"),
    (PermissionError(errno.EACCES, "Permission denied", "/out/rank0"),
     "/out/rank0: Permission denied"),
    (RuntimeError("Export failed: unsupported op"), "RuntimeError: Export failed"),
])
def test_environment_failures_are_one_line(monkeypatch, tiny_checkpoint, tmp_path, exc, needle):
    _raise_in_build(monkeypatch, exc)
    result = CliRunner().invoke(dsexport, ["build", "-q", "--model", str(tiny_checkpoint),
                                           "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    out = result.output.strip()
    assert out.startswith("dsexport: error: ") and needle in out and "Traceback" not in out
    assert len(out.splitlines()) == 1


def test_verbose_shows_the_traceback(monkeypatch, tiny_checkpoint, tmp_path):
    _raise_in_build(monkeypatch, RuntimeError("boom"))
    result = CliRunner().invoke(dsexport, ["build", "-v", "--model", str(tiny_checkpoint),
                                           "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "Traceback" in result.output


def test_ctrl_c_in_dsexport_exits_130_and_leaves_nothing(tiny_checkpoint, tmp_path):
    out = tmp_path / "o"
    code = ("from dsflow.export.cli.main import main; "
            "main(prog_name='dsexport')")
    proc = subprocess.Popen([sys.executable, "-c", code, "build", "--model",
                             str(tiny_checkpoint), "--out", str(out), "--tp", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    # wait until the build is under way (its staging directory exists), then interrupt
    while time.monotonic() < deadline and not list(tmp_path.glob(".o.tmp-*")):
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()
    assert b"Traceback" not in err and b"interrupted" in err
    assert not out.exists() and not list(tmp_path.glob(".o.*"))


def test_stale_staging_of_a_killed_build_is_removed(tiny_checkpoint, tmp_path):
    """A build killed with SIGKILL cannot clean up; the next build of that --out does."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".o.tmp-{dead.pid}-abc123"
    (stale / "rank0").mkdir(parents=True)
    live = tmp_path / f".o.tmp-{os.getpid()}-live"  # a running build's: kept
    live.mkdir()
    result = CliRunner().invoke(dsexport, ["build", "-q", "--model", str(tiny_checkpoint),
                                           "--out", str(tmp_path / "o"), "--max-seq-len", "64"])
    assert result.exit_code == 0, result.output
    assert not stale.exists() and live.exists()


def test_json_reports_of_build_shard_merge(tiny_checkpoint, tmp_path):
    from dsflow.common.checksums import sha256_file
    runner = CliRunner()
    reports = {}
    for cmd, args in (("build", ["--model", tiny_checkpoint, "--out", tmp_path / "art",
                                 "--max-seq-len", "64"]),
                      ("shard", ["--model", tiny_checkpoint, "--out", tmp_path / "sh", "--tp", 2]),
                      ("merge", [tmp_path / "sh", "--out", tmp_path / "hf"])):
        result = runner.invoke(dsexport, [cmd, "--json", *map(str, args)])
        assert result.exit_code == 0, result.output
        reports[cmd] = json.loads(result.stdout)
    for cmd, report in reports.items():
        root = Path(report["out"])
        assert report["command"] == cmd and report["seconds"] >= 0
        assert report["files"] and report["bytes"] == sum(f["bytes"] for f in report["files"].values())
        for rel, info in report["files"].items():
            assert sha256_file(root / rel) == info["sha256"]
    assert "manifest.json" in reports["build"]["files"]
    assert "shards.json" in reports["shard"]["files"]
    assert any(n.endswith(".safetensors") for n in reports["merge"]["files"])


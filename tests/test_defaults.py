"""Defaults follow the artifacts (issue 18): after `dsexport build --max-seq-len 256`,
no dsrun default refuses itself — the score window, and the generation length when
the sequence is shorter than the default 128 new tokens."""
from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from dsflow.export.cli.main import main as dsexport
from dsflow.runtime.cli import main as dsrun

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i * i}\n\n" for i in range(40))


@pytest.fixture(scope="module")
def short_artifacts(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("short") / "art"
    r = CliRunner().invoke(dsexport, ["build", "-q", "--model", str(tiny_checkpoint),
                                      "--out", str(out), "--max-seq-len", "256"])
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.timeout(600)
def test_score_default_window_fits_the_artifacts(short_artifacts, tmp_path):
    from dsflow.runtime.engine import Engine
    from dsflow.runtime.scoring import default_window, score_text
    path = tmp_path / "sample.py"
    path.write_text(TEXT, encoding="utf-8")
    r = CliRunner().invoke(dsrun, ["--artifacts", str(short_artifacts), "--score", str(path),
                                   "--json"])
    assert r.exit_code == 0, r.output  # was: --score-window 256: must be between 1 and 255
    row = json.loads(r.output.strip().splitlines()[-1])
    with Engine(short_artifacts) as engine:
        assert default_window(engine) == 255
        assert row["tokens"] > 2 * 255  # several windows, so the window size matters
        explicit = score_text(engine, TEXT, 255)
        assert math.isclose(-row["log_likelihood_nats"], explicit.nats, rel_tol=1e-9)
    # a shorter sequence per engine (dsrun --max-seq-len) shortens it too
    with Engine(short_artifacts, max_seq_len=100) as engine:
        assert default_window(engine) == 99
        assert score_text(engine, TEXT).tokens == row["tokens"]


@pytest.mark.timeout(600)
def test_default_generation_length_fits_the_sequence(short_artifacts):
    """128 new tokens by default; a 100-token sequence holds fewer after the prompt."""
    args = ["--artifacts", str(short_artifacts), "--prompt", "def quick_sort(arr):",
            "--json", "--max-seq-len", "100"]
    r = CliRunner().invoke(dsrun, args)
    assert r.exit_code == 0, r.output  # was: prompt + max new tokens (128) exceeds 100
    row = json.loads(r.output.strip().splitlines()[-1])
    used = len(row["prompt_token_ids"]) + len(row["token_ids"])
    assert used <= 100
    assert row["finish_reason"] == "stop" or used == 100
    # an explicit length that does not fit is still refused, naming the limit
    r = CliRunner().invoke(dsrun, [*args, "--max-new-tokens", "128"])
    assert r.exit_code == 1 and "exceeds the maximum sequence length" in r.output

"""`dsrun --score` / runtime.scoring: the log-likelihood through the exported graphs
equals transformers' on the same weights and the same chunks."""
from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from dsflow.runtime.cli import main as dsrun
from dsflow.runtime.scoring import chunks, score_text

TEXT = ("def add(a, b):\n    return a + b\n\n\nclass Point:\n    def __init__(self, x, y):\n"
        "        self.x, self.y = x, y\n")


def reference_nats(model, ids: list[int], window: int, start_id: int) -> float:
    nats = 0.0
    for piece in chunks(ids, window):
        x = torch.tensor([[start_id] + piece])
        with torch.no_grad():
            logp = torch.log_softmax(model(x).logits[0, :-1].double(), dim=-1)
        nats -= logp.gather(-1, x[0, 1:, None]).sum().item()
    return nats


@pytest.mark.parametrize("window", [7, 64])
def test_score_equals_transformers(window, engine_for, hf_model):
    engine = engine_for(1)
    ids = engine.tokenizer.encode(TEXT, add_bos=False)
    assert len(ids) > 2 * 7  # several chunks, the last one shorter, at window 7
    score = score_text(engine, TEXT, window)
    ref = reference_nats(hf_model, ids, window, engine.manifest.config.bos_token_id)
    assert score.tokens == len(ids) and score.bytes == len(TEXT.encode())
    assert math.isclose(score.nats, ref, rel_tol=1e-5)
    assert math.isclose(score.bits_per_byte, ref / math.log(2) / len(TEXT.encode()),
                        rel_tol=1e-5)


def test_cli_score_json(export_tiny, tmp_path):
    path = tmp_path / "sample.py"
    path.write_text(TEXT, encoding="utf-8")
    result = CliRunner().invoke(dsrun, ["--artifacts", str(export_tiny(1)), "--score",
                                        str(path), "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.output.strip().splitlines()[-1])
    assert row["bytes"] == len(TEXT.encode()) and row["bits_per_byte"] > 0
    assert math.isclose(row["log_likelihood_nats"] / math.log(2) / row["bytes"],
                        -row["bits_per_byte"])


def test_cli_score_refuses_bad_input(export_tiny, tmp_path):
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\xff\xfe\x00abc")
    result = CliRunner().invoke(dsrun, ["--artifacts", str(export_tiny(1)), "--score",
                                        str(binary)])
    assert result.exit_code == 2 and "not UTF-8" in result.output
    assert "Traceback" not in result.output


def test_window_beyond_the_artifacts_is_refused(engine_for):
    from dsflow.common.errors import DsflowError
    engine = engine_for(1)
    with pytest.raises(DsflowError, match="--score-window"):
        score_text(engine, TEXT, engine.manifest.max_seq_len)

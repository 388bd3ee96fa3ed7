"""Numerics: dsflow on MindSpore vs transformers on the same weights, at tp 1, 2 and 4.

Greedy token ids must be identical for 32 new tokens on a batch of prompts of
different lengths, and logits (after the prompt and after every forced next token)
within 1e-4 in fp32.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TOKENIZER_DIR, hf_greedy
from dsflow.runtime.sampling import SamplingParams

PROMPTS = [
    "#write a quick sort algorithm",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "// 二分查找 😀 binary search\nint search(const int *a, int n, int x) {\n",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def prompt_ids():
    from dsflow.runtime.tokenizer import Tokenizer
    tok = Tokenizer(TOKENIZER_DIR)
    ids = [tok.encode(p) for p in PROMPTS]
    assert len({len(i) for i in ids}) == len(ids), "prompts must differ in length"
    return ids


@pytest.fixture(scope="module")
def reference(hf_model, prompt_ids):
    with torch.no_grad():
        return [hf_greedy(hf_model, ids, NEW_TOKENS) for ids in prompt_ids]


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_greedy_tokens_match_transformers(tp, engine_for, prompt_ids, reference):
    engine = engine_for(tp)
    results = engine.generate(prompt_ids, SamplingParams(max_new_tokens=NEW_TOKENS,
                                                         ignore_eos=True))
    assert [r.token_ids for r in results] == reference
    assert all(r.finish_reason == "length" for r in results)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_logits_match_transformers(tp, engine_for, hf_model, prompt_ids, reference):
    engine = engine_for(tp)
    steps = 8
    ours = engine.forced_logits(prompt_ids, [r[:steps] for r in reference])
    for b, ids in enumerate(prompt_ids):
        full = torch.tensor([ids + reference[b][:steps]])
        with torch.no_grad():
            ref = hf_model(full).logits[0, len(ids) - 1:].numpy()
        assert ours[b].shape == ref.shape
        np.testing.assert_allclose(ours[b], ref, atol=1e-4, rtol=0)


def test_single_prompt_equals_its_batched_run(engine_for, prompt_ids, reference):
    """Padding a prompt into a batch must not change its result."""
    alone = engine_for(2).generate([prompt_ids[1]], SamplingParams(max_new_tokens=12,
                                                                   ignore_eos=True))
    assert alone[0].token_ids == reference[1][:12]


def test_vocab_not_divisible_by_tp(tmp_path_factory, prompt_ids):
    """lm_head rows are zero-padded to a multiple of tp; padded logits must vanish."""
    from conftest import make_hf_checkpoint
    from dsflow.export.pipeline.build import BuildOptions, build
    from dsflow.runtime.engine import Engine
    ckpt = tmp_path_factory.mktemp("odd-vocab")
    model = make_hf_checkpoint(ckpt, seed=5, vocab_size=32023, num_hidden_layers=1)
    art = build(BuildOptions(model_dir=ckpt, out=ckpt / "art", tp=2))
    with Engine(art) as engine:
        ours = engine.forced_logits([prompt_ids[0]], [[5, 6, 7]])
        got = engine.generate([prompt_ids[0]], SamplingParams(max_new_tokens=8,
                                                              ignore_eos=True))[0]
    with torch.no_grad():
        ref = model(torch.tensor([prompt_ids[0] + [5, 6, 7]])).logits[0, len(prompt_ids[0]) - 1:]
    assert ours.shape == (1, 4, 32023)
    np.testing.assert_allclose(ours[0], ref.numpy(), atol=1e-4, rtol=0)
    assert got.token_ids == hf_greedy(model, prompt_ids[0], 8)

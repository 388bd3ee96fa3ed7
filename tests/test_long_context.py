"""Long context against transformers (issue 18): a 2-layer tiny model with
DeepSeek-Coder's rotary settings (theta 1e5, linear scaling 4), a prompt of 4,100 tokens
prefilled in many chunks at tp 1 and tp 2: greedy tokens identical to transformers',
logits close; and dsflow's cos/sin equal to transformers' LlamaRotaryEmbedding at every
position up to 16383.

Small on purpose (hidden 64): the positions are what is long, not the model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import REAL_VOCAB, TINY, make_hf_checkpoint

PROMPT_LEN = 4100
NEW = 8
MAX_SEQ = 4160   # built --max-seq-len: the prompt, the new tokens, a little spare
CHUNKS = {1: 256, 2: 320}  # prefill chunk per tp: 17 and 13 chunks for the prompt


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("long-hf")
    model = make_hf_checkpoint(path, seed=11, num_hidden_layers=2,
                               max_position_embeddings=MAX_SEQ)
    return path, model.float().eval()


@pytest.fixture(scope="module")
def long_prompt():
    rng = np.random.default_rng(4100)
    return [TINY["bos_token_id"]] + rng.integers(100, REAL_VOCAB, PROMPT_LEN - 1).tolist()


@pytest.fixture(scope="module")
def long_reference(long_model, long_prompt):
    """transformers' greedy tokens (never a padding row, as dsflow) and the raw logits
    each was chosen from: after the prompt and after each token."""
    _, model = long_model

    def no_padding_rows(_input_ids, scores):
        scores = scores.clone()  # output_logits keeps the tensor it was given
        scores[:, REAL_VOCAB:] = -float("inf")
        return scores
    with torch.no_grad():
        out = model.generate(torch.tensor([long_prompt]), max_new_tokens=NEW, do_sample=False,
                             logits_processor=[no_padding_rows], eos_token_id=None,
                             pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    tokens = out.sequences[0, len(long_prompt):].tolist()
    logits = torch.stack(out.logits, 1)[0].float().numpy()  # before the processor
    assert logits[:, :REAL_VOCAB].argmax(-1).tolist() == tokens  # what generate chose
    return tokens, logits


@pytest.mark.timeout(900)
@pytest.mark.parametrize("tp", [1, 2])
def test_long_prompt_in_many_chunks_matches_transformers(tp, long_model, long_prompt,
                                                          long_reference, tmp_path_factory):
    """The prompt prefilled in 13-17 chunks, then the decode graph fed transformers'
    tokens (teacher forcing): logits close at all 8 steps, and their argmax over the
    real vocabulary, which is dsflow's greedy choice from exactly these logits (the
    same prefill and decode graphs, the same positions), is transformers' greedy
    token at every step. A greedy `generate` would repeat the 4,100-token prefill for
    nothing more."""
    from dsflow.export.pipeline.build import BuildOptions, build
    from dsflow.runtime import Engine
    path, _ = long_model
    tokens, ref_logits = long_reference
    art = build(BuildOptions(model_dir=path, out=tmp_path_factory.mktemp(f"long-tp{tp}") / "a",
                             tp=tp, max_seq_len=MAX_SEQ))
    chunk = CHUNKS[tp]
    with Engine(art, max_batch=1, prefill_chunk=chunk) as engine:
        assert engine.plan.prefill_chunk == chunk and PROMPT_LEN // chunk >= 12
        ours = engine.forced_logits([long_prompt], [tokens[:-1]], prefill_chunk=chunk)[0]
    assert ours.shape == ref_logits.shape == (NEW, TINY["vocab_size"])
    assert ours[:, :REAL_VOCAB].argmax(-1).tolist() == tokens
    np.testing.assert_allclose(ours, ref_logits, atol=2e-4, rtol=0)


@pytest.mark.parametrize("head_dim", [16, 128])
def test_cos_sin_equal_transformers_up_to_16383(head_dim):
    """The portable kernel's cos/sin (what the CPU graphs compute) against
    LlamaRotaryEmbedding with linear scaling 4 and theta 1e5, positions 0..16383: the
    inverse frequencies are bit-identical, so the angles are too, and cos/sin differ
    only by the two libraries' fp32 cos/sin (a few ulp)."""
    import mindspore as ms
    from mindspore import Tensor, nn
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from dsflow.graphs.kernels.portable import Rotary, inv_freq

    class CosSin(nn.Cell):
        def __init__(self):
            super().__init__()
            self.rotary = Rotary(head_dim, 100000.0, 4.0, ms.float32)

        def construct(self, positions):
            return self.rotary.cos_sin(positions)

    n = 16384
    positions = np.arange(n, dtype=np.int32)[None]
    cos, sin = (t.asnumpy()[0, :, 0] for t in CosSin()(Tensor(positions)))
    config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4,
                         rope_theta=100000.0, max_position_embeddings=n,
                         rope_scaling={"type": "linear", "factor": 4.0})
    rope = LlamaRotaryEmbedding(config=config)
    with torch.no_grad():
        ref_cos, ref_sin = (t[0].numpy() for t in rope(
            torch.zeros(1, n, head_dim), torch.from_numpy(positions.astype(np.int64))))
    ours_inv, ref_inv = inv_freq(head_dim, 100000.0, 4.0), rope.inv_freq.numpy()
    assert ours_inv.dtype == np.float32 and np.array_equal(ours_inv, ref_inv)
    assert cos.shape == ref_cos.shape == (n, head_dim)
    np.testing.assert_allclose(cos, ref_cos, atol=1e-6, rtol=0)
    np.testing.assert_allclose(sin, ref_sin, atol=1e-6, rtol=0)

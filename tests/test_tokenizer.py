"""The real DeepSeek-Coder tokenizer: ids, BOS, chat template, streaming detokenization."""
from __future__ import annotations

import json

import pytest

from conftest import TOKENIZER_DIR, require_shared
from dsflow.runtime.tokenizer import IncrementalDecoder, Tokenizer

TEXTS = [
    "def quick_sort(arr):\n    if len(arr) <= 1:\n        return arr\n",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); }",
    "快速排序算法的实现，使用 Python 编写。",
    "emoji 😀🚀👍🏽 and ZWJ 👩‍💻 sequences",
    "  mixed\tindent\r\n中文 and English 123456",
]


@pytest.fixture(scope="module")
def tok():
    require_shared()
    return Tokenizer(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def raw():
    from tokenizers import Tokenizer as HFTokenizer
    return HFTokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))


def test_special_ids(tok):
    assert tok.bos_id == 32013
    assert tok.add_bos
    assert 32021 in tok.eos_ids  # <|EOT|>, the instruct model's end of turn
    assert tok.vocab_size == 32022


@pytest.mark.parametrize("text", TEXTS)
def test_encode_equals_tokenizers_plus_bos(tok, raw, text):
    assert tok.encode(text) == [32013] + raw.encode(text, add_special_tokens=False).ids
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_full_decode_and_never_breaks_utf8(tok, text):
    ids = tok.encode(text, add_bos=False)
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_emoji_split_across_tokens_is_held_back(tok):
    ids = tok.encode("😀", add_bos=False)
    assert len(ids) > 1, "this emoji is several byte-level tokens"
    dec = IncrementalDecoder(tok)
    assert dec.push(ids[0]) == ""
    assert "".join(dec.push(i) for i in ids[1:]) == "😀"


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "write a quick sort algorithm in python."}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
     {"role": "user", "content": "中文 😀"}],
])
def test_chat_template_equals_transformers(tok, messages):
    from transformers import PreTrainedTokenizerFast
    cfg = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text())
    hf = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_DIR / "tokenizer.json"),
                                 bos_token=cfg["bos_token"]["content"],
                                 eos_token=cfg["eos_token"]["content"],
                                 chat_template=cfg["chat_template"])
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(messages) == expected
    assert expected.startswith("<｜begin▁of▁sentence｜>")


def test_encode_chat_has_one_bos(tok):
    ids = tok.encode_chat("hello")
    assert ids[0] == 32013 and ids.count(32013) == 1
    assert tok.decode(ids).rstrip().endswith("### Response:")

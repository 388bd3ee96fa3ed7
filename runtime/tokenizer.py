"""Tokenizer, chat template and incremental detokenization.

`tokenizers.Tokenizer.from_file` is exact for DeepSeek-Coder (transformers'
LlamaTokenizerFast conversion is not: it swaps the byte-level pre-tokenizer).
Neither adds BOS, so it is added here when tokenizer_config.json says
`add_bos_token`. The chat template is rendered the way transformers renders it: a
sandboxed, immutable Jinja environment with trim_blocks and lstrip_blocks, so a
template shipped with a model cannot reach Python.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional, Sequence

from dsflow.common.errors import DsflowError


class TokenizerError(DsflowError):
    pass


def _token_text(value) -> Optional[str]:
    """tokenizer_config token entries are strings or AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, directory: str | Path, extra_eos_ids: Iterable[int] = ()):
        from tokenizers import Tokenizer as HFTokenizer
        d = Path(directory)
        self.config_path = d / "tokenizer_config.json"
        try:
            self._tok = HFTokenizer.from_file(str(d / "tokenizer.json"))
            self.config = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
        except Exception as e:  # tokenizers raises plain Exception on bad files
            raise TokenizerError(f"{d}: cannot load tokenizer ({e})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.bos_id = self._id(self.bos_token)
        self.add_bos = bool(self.config.get("add_bos_token", False)) and self.bos_id is not None
        eos = {self._id(self.eos_token), *extra_eos_ids}
        self.eos_ids = frozenset(i for i in eos if i is not None)
        pad = self._id(_token_text(self.config.get("pad_token")))
        self.pad_id = pad if pad is not None else min(self.eos_ids, default=0)
        self._template = None

    def _id(self, token: Optional[str]) -> Optional[int]:
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str, add_bos: Optional[bool] = None) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.config.get("chat_template"))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render the chat template to text (it contains the BOS text itself)."""
        if self._template is None:
            if not self.has_chat_template:
                raise TokenizerError("this tokenizer has no chat template (--chat needs one)")
            from jinja2.sandbox import ImmutableSandboxedEnvironment
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            self._template = env.from_string(self.config["chat_template"])
        from jinja2.sandbox import SecurityError
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except (SecurityError, OverflowError) as e:
            # the sandbox refused: a template reaching for Python internals (__class__,
            # __globals__, ...), mutating its inputs, or a range too big to build
            raise TokenizerError(f"{self.config_path}: the chat template was refused by "
                                 f"the sandbox ({e}); it is not a plain chat template"
                                 ) from None

    def encode_fim(self, prefix: str, suffix: str) -> list[int]:
        """DeepSeek-Coder's fill-in-the-middle prompt: BOS (as usual), then
        <｜fim▁begin｜>prefix<｜fim▁hole｜>suffix<｜fim▁end｜>; the model writes the middle.
        Same ids as tokenizing that text (added tokens split the text the same way)."""
        begin, hole, end = _fim_ids(self)
        ids = [begin, *self.encode(prefix, add_bos=False), hole,
               *self.encode(suffix, add_bos=False), end]
        return ([self.bos_id] if self.add_bos else []) + ids

    def encode_messages(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation in the chat template, ready for the reply (the one
        place chats are encoded: dsrun --chat, Engine.chat, dsserve's chat route); the
        template already starts with BOS."""
        return self.encode(self.apply_chat_template(messages), add_bos=False)

    def encode_chat(self, user_text: str) -> list[int]:
        """Token ids of a one-turn chat."""
        return self.encode_messages([{"role": "user", "content": user_text}])


FIM_TOKENS = ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>")  # DeepSeek-Coder


def _fim_ids(tok: "Tokenizer") -> list[int]:
    ids = [tok._id(t) for t in FIM_TOKENS]
    if None in ids:
        raise TokenizerError(f"this tokenizer has no fill-in-the-middle tokens "
                             f"({', '.join(FIM_TOKENS)}); --suffix needs a DeepSeek-Coder "
                             "tokenizer")
    return ids


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas without splitting a UTF-8
    character: a byte-level token can end in the middle of one, which decodes as
    U+FFFD until the next token completes it (the approach of vLLM and HF streamers,
    decoding only a short window rather than the whole sequence each step)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start: tokens before it are already emitted text
        self.read = 0    # tokens whose text has been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]

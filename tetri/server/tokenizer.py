"""The front end's tokenizer: chat templates, encoding, fast decoding and token strings.

`Tokenizer` wraps a Hugging Face tokenizer once per model directory. Decoding goes straight to
the Rust `tokenizers.Tokenizer` where one exists (4x cheaper per call than the Python
wrapper), which matters because the incremental detokenizer decodes on every output token.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from typing import Any

_DEFAULT_VOCAB = 1 << 31


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-unicode -> byte map (inverse of `bytes_to_unicode`)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class Tokenizer:
    """Encode prompts, render chat templates, decode ids and describe single tokens."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int | None = None) -> None:
        self.hf = hf_tokenizer
        self.vocab_size = vocab_size or len(hf_tokenizer) or _DEFAULT_VOCAB
        self.eos_token_id: int | None = hf_tokenizer.eos_token_id
        self._backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        self._byte_level = self._backend is not None and type(self._backend.decoder).__name__ == "ByteLevel"
        self._byte_map = _byte_decoder() if self._byte_level else {}
        self._token_cache: dict[int, tuple[str, list[int]]] = {}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if self._backend is not None:
            return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            continue_final_message: bool = False, tools: list[dict] | None = None) -> list[int]:
        """Render the chat template to text, then encode it without adding specials twice.

        Raises ValueError (the caller answers 400) when the model has no template or the
        template rejects the conversation.
        """
        if not getattr(self.hf, "chat_template", None):
            raise ValueError("this model has no chat template; use /v1/completions")
        try:
            text = self.hf.apply_chat_template(messages, tools=tools, tokenize=False,
                                               add_generation_prompt=add_generation_prompt,
                                               continue_final_message=continue_final_message)
        except Exception as exc:  # jinja2 TemplateError and friends: the conversation is at fault
            raise ValueError(f"chat template failed: {exc}") from exc
        return self.encode(text, add_special_tokens=False)

    def token_info(self, token_id: int) -> tuple[str, list[int]]:
        """(printable text, raw UTF-8 bytes) of one token, for OpenAI logprobs."""
        hit = self._token_cache.get(token_id)
        if hit is not None:
            return hit
        raw: bytes | None = None
        if self._byte_level:
            piece = self._backend.id_to_token(token_id)
            if piece is not None and all(ch in self._byte_map for ch in piece):
                raw = bytes(self._byte_map[ch] for ch in piece)
        text = self.decode([token_id], skip_special_tokens=False)
        if raw is None:
            raw = text.encode("utf-8")
        info = (text, list(raw))
        if len(self._token_cache) < 1_000_000:
            self._token_cache[token_id] = info
        return info


def _config_vocab_size(model_dir: str) -> int | None:
    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    size = cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size")
    return int(size) if isinstance(size, int) and size > 0 else None


@functools.lru_cache(maxsize=8)
def load_tokenizer(model_dir: str) -> Tokenizer:
    """Load (once per directory per process) the model's tokenizer.

    A directory with a `tokenizer.json` loads through `PreTrainedTokenizerFast` (the Rust
    tokenizer, its special tokens and chat template), which keeps torch out of the front
    process: `AutoTokenizer` imports transformers' configuration code, and with it torch.
    Only a directory without one (a SentencePiece model alone) takes that path."""
    if os.path.exists(os.path.join(model_dir, "tokenizer.json")):
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast.from_pretrained(model_dir)
    else:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(model_dir)
    return Tokenizer(hf, vocab_size=_config_vocab_size(model_dir))

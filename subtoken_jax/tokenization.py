"""Tokenizers: Hugging Face `tokenizer.json` (via the `tokenizers` library) and a byte-level one.

Both expose encode(text) -> list[int], decode(ids) -> str, vocab_size, bos_id, eos_id, pad_id.
"""

from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence

from subtoken_jax.errors import CheckpointError


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus BOS, EOS and PAD; for models trained from scratch here."""

    eos_id = 256
    bos_id = 257
    pad_id = 258
    vocab_size = 259

    def encode(self, text: str, add_bos: bool = False) -> List[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_id] + ids if add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face fast tokenizer read from a local tokenizer.json."""

    def __init__(self, tokenizer, bos_id: Optional[int] = None, eos_id: Optional[int] = None,
                 pad_id: Optional[int] = None):
        self._tok = tokenizer
        self.bos_id, self.eos_id = bos_id, eos_id
        self.pad_id = pad_id if pad_id is not None else eos_id

    @classmethod
    def from_folder(cls, path: str) -> "HFTokenizer":
        from tokenizers import Tokenizer

        file = os.path.join(path, "tokenizer.json")
        if not os.path.exists(file):
            raise CheckpointError(f"{path} has no tokenizer.json (pass with_tokenizer=False to load weights only)")
        tokenizer = Tokenizer.from_file(file)
        special = {}
        for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
            meta = os.path.join(path, name)
            if os.path.exists(meta):
                with open(meta) as fh:
                    special.update(json.load(fh))

        def token_id(key):
            value = special.get(f"{key}_token_id")
            if isinstance(value, list):
                value = value[0] if value else None
            if value is None and isinstance(special.get(f"{key}_token"), str):
                value = tokenizer.token_to_id(special[f"{key}_token"])
            return value

        return cls(tokenizer, token_id("bos"), token_id("eos"), token_id("pad"))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False) -> List[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if add_bos and self.bos_id is not None else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, folder: str) -> None:
        self._tok.save(os.path.join(folder, "tokenizer.json"))

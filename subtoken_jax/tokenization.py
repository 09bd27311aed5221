"""Tokenizers: Hugging Face `tokenizer.json` (via the `tokenizers` library) and a byte-level one.

Both expose encode(text) -> list[int], decode(ids) -> str, vocab_size, bos_id, eos_id, pad_id;
`Tokenizer` is the part of that the data pipelines and task generators rely on.
"""

from __future__ import annotations

import json
import os
from typing import List, Mapping, Optional, Protocol, Sequence

from subtoken_jax.errors import CheckpointError, InputError


class Tokenizer(Protocol):
    """What the pipelines and task generators need from a tokenizer (ByteTokenizer and HFTokenizer both fit)."""

    eos_id: Optional[int]
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...


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
    """A Hugging Face fast tokenizer (`tokenizers`), from a folder's tokenizer.json or a GGUF's vocabulary.

    `chat(messages)` renders the model's own chat template (from tokenizer_config.json, chat_template.jinja
    or the GGUF's tokenizer.chat_template) with jinja2, as transformers' apply_chat_template does.
    """

    def __init__(self, tokenizer, bos_id: Optional[int] = None, eos_id: Optional[int] = None,
                 pad_id: Optional[int] = None, *, chat_template: Optional[str] = None, unk_id: Optional[int] = None):
        self._tok = tokenizer
        self.bos_id, self.eos_id, self.unk_id = bos_id, eos_id, unk_id
        self.pad_id = pad_id if pad_id is not None else eos_id
        self.chat_template = chat_template

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
            token = special.get(f"{key}_token")
            if isinstance(token, dict):  # tokenizer_config.json may store an AddedToken as a dict
                token = token.get("content")
            if value is None and isinstance(token, str):
                value = tokenizer.token_to_id(token)
            return value

        return cls(tokenizer, token_id("bos"), token_id("eos"), token_id("pad"),
                   chat_template=_folder_chat_template(path, special.get("chat_template")), unk_id=token_id("unk"))

    @classmethod
    def from_gguf_metadata(cls, metadata, where: str = "GGUF file") -> "HFTokenizer":
        from subtoken_jax.gguf_tokenizer import tokenizer_from_gguf

        tokenizer, ids = tokenizer_from_gguf(metadata, where)
        return cls(tokenizer, ids["bos"], ids["eos"], ids["pad"], chat_template=metadata.get("tokenizer.chat_template"),
                   unk_id=ids["unk"])

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False) -> List[int]:
        """Ids of text; special tokens written in it (e.g. "<|im_start|>") are matched whole."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if add_bos and self.bos_id is not None else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def token(self, token_id: Optional[int]) -> Optional[str]:
        return None if token_id is None else self._tok.id_to_token(int(token_id))

    def chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True, **variables) -> str:
        """The chat template rendered over messages ([{"role": "user", "content": ...}, ...]) as text.

        Encode the result with `encode` (the template writes BOS itself where the model wants one).
        """
        if not self.chat_template:
            raise InputError("this tokenizer has no chat template (its tokenizer_config.json / GGUF carries none); "
                             "format the prompt yourself")
        return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=self.token(self.bos_id) or "", eos_token=self.token(self.eos_id) or "",
                                    **variables)

    def save(self, folder: str) -> None:
        """tokenizer.json plus a tokenizer_config.json (special tokens, chat template) that transformers reads."""
        self._tok.save(os.path.join(folder, "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        for name in ("bos", "eos", "pad", "unk"):
            token = self.token(getattr(self, f"{name}_id"))
            if token is not None:
                config[f"{name}_token"] = token
        if self.chat_template:
            config["chat_template"] = self.chat_template
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as fh:
            json.dump(config, fh, indent=2, ensure_ascii=False)


def _folder_chat_template(path: str, from_config) -> Optional[str]:
    """A folder's chat template: chat_template.jinja, or tokenizer_config.json's (a string, or named templates)."""
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.exists(jinja):
        with open(jinja, encoding="utf-8") as fh:
            return fh.read()
    if isinstance(from_config, list):  # [{"name": "default", "template": ...}, ...]
        named = {entry.get("name"): entry.get("template") for entry in from_config}
        return named.get("default") or next(iter(named.values()), None)
    return from_config


def render_chat_template(template: str, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True,
                         **variables) -> str:
    """Renders a Hugging Face / GGUF chat template with jinja2 in a sandbox, with transformers' conventions
    (trim_blocks, lstrip_blocks, a raise_exception() helper and a non-escaping tojson)."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise InputError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    try:
        return env.from_string(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                                **variables)
    except TemplateError as error:
        raise InputError(f"chat template failed to render: {error}") from None

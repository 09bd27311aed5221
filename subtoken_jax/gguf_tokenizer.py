"""A `tokenizers` tokenizer rebuilt from a GGUF file's own vocabulary (no tokenizer.json in a GGUF).

llama.cpp stores the vocabulary, merges, token types and the name of the pre-tokenizer (the regex
that splits text before BPE) as metadata. Byte-level BPE files (`tokenizer.ggml.model = "gpt2"`:
SmolLM2, Qwen2, Llama 3, GPT-2-style models) are rebuilt here with the split rules llama.cpp
applies for each named pre-tokenizer; a pre-tokenizer not listed is refused rather than guessed,
because a wrong split gives valid-looking but different ids. SentencePiece-style files
(`"llama"`: Llama 2, Mistral 7B) are refused with a one-line error: load such a model's weights
with `with_tokenizer=False` and its tokenizer from the original tokenizer.json.
"""

from __future__ import annotations

from typing import Any, Dict, List

from subtoken_jax.errors import CheckpointError

# llama.cpp's token types (llama_token_type): 3 = control (special), 4 = user-defined (added, not special)
_CONTROL, _USER_DEFINED = 3, 4

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2 splits digits one by one where Llama 3 keeps runs of up to three
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")

# pre-tokenizer name -> how text is split: "gpt2" (the GPT-2 byte-level regex), "digits+gpt2" (each digit
# apart first, then GPT-2), or a regex applied before the byte-level mapping
PRE_TOKENIZERS: Dict[str, str] = {
    "default": "gpt2", "gpt-2": "gpt2",
    "smollm": "digits+gpt2", "starcoder": "digits+gpt2", "refact": "digits+gpt2",
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}


def _pre_tokenizer(name: str, where: str):
    from tokenizers import Regex, pre_tokenizers

    rule = PRE_TOKENIZERS.get(name or "default")
    if rule is None:
        raise CheckpointError(f"{where}: GGUF pre-tokenizer {name!r} is not supported; supported: "
                              f"{', '.join(sorted(PRE_TOKENIZERS))}")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=rule in ("gpt2", "digits+gpt2"))
    if rule == "gpt2":
        return byte_level
    if rule == "digits+gpt2":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(rule), behavior="isolated"), byte_level])


def _byte_level_vocab(tokens: List[str]) -> Dict[str, int]:
    """Tokens as the byte-level alphabet spells them (llama.cpp keeps a few added tokens in plain UTF-8)."""
    from tokenizers import pre_tokenizers

    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    spell = _byte_spelling()
    return {token if set(token) <= alphabet else "".join(spell[b] for b in token.encode("utf-8")): index
            for index, token in enumerate(tokens)}


def _byte_spelling() -> Dict[int, str]:
    """GPT-2's reversible byte -> printable character map (printable bytes map to themselves)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    spelling, shift = {}, 0
    for byte in range(256):
        if byte in keep:
            spelling[byte] = chr(byte)
        else:
            spelling[byte] = chr(256 + shift)
            shift += 1
    return spelling


def tokenizer_from_gguf(metadata: Dict[str, Any], where: str = "GGUF file"):
    """(tokenizers.Tokenizer, special ids {bos, eos, pad, unk}) for a GGUF header's vocabulary; a file whose
    add_bos_token is set gets a post-processor adding BOS, so a saved tokenizer.json behaves the same."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        hint = (" (SentencePiece, e.g. Llama 2 / Mistral 7B): load the weights with with_tokenizer=False and the "
                "model's tokenizer.json separately") if kind == "llama" else ""
        raise CheckpointError(f"{where}: GGUF tokenizer model {kind!r} is not supported, only byte-level BPE "
                              f"('gpt2'){hint}")
    tokens = list(metadata.get("tokenizer.ggml.tokens") or [])
    merges = metadata.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise CheckpointError(f"{where}: GGUF metadata lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
    vocab = _byte_level_vocab(tokens)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                                     fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(metadata.get("tokenizer.ggml.pre", "default"), where)
    tokenizer.decoder = decoders.ByteLevel()
    types = list(metadata.get("tokenizer.ggml.token_type") or [])
    # added tokens are matched whole in the text before BPE, as llama.cpp does; only ones spelled in the
    # vocabulary's own alphabet can be (a re-spelled one would get a new id beyond the model's vocabulary)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind_ in zip(tokens, types) if kind_ == _CONTROL and t in vocab])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, kind_ in zip(tokens, types) if kind_ == _USER_DEFINED and t in vocab])
    ids = {name: metadata.get(f"tokenizer.ggml.{key}") for name, key in
           (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id"),
            ("unk", "unknown_token_id"))}
    if metadata.get("tokenizer.ggml.add_bos_token", False) and ids["bos"] is not None:
        bos = tokens[ids["bos"]]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, ids["bos"])])
    return tokenizer, ids

"""A GGUF file's tokenizer as a tokenizer folder: `tokenizer.json` plus `tokenizer_config.json`.

GGUF stores the vocabulary, merges, token types, special token ids and the chat template as
metadata. The byte-level BPE kind (`tokenizer.ggml.model == "gpt2"`: SmolLM2, Qwen2, Llama 3) is
rebuilt here with `tokenizers`, the way `transformers` maps it:
- the vocabulary is spelled in the byte alphabet (a token outside it is re-spelled from its UTF-8
  bytes), the merges are the file's;
- the pre-tokenizer splits text with the regexes llama.cpp uses for `tokenizer.ggml.pre`
  (`_SPLITS`); a pre-tokenizer this table does not know is refused rather than guessed;
- control tokens become special added tokens, user-defined ones plain added tokens;
- bos/eos/unk/pad, add_bos_token/add_eos_token and the chat template go to tokenizer_config.json.
The chat template is tenant data: it passes the same sandboxed check as an uploaded one.
SentencePiece vocabularies (`tokenizer.ggml.model == "llama"`) are refused by name for now.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from tokenizers.pre_tokenizers import PreTokenizer

from zoo.chat_template import ChatTemplateError, validate_template
from zoo.gguf_file import GGUFError

CONTROL, USER_DEFINED = 3, 4
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp's pre-tokenizer names → the regexes it splits with, in order. None is GPT-2's own
# regex, which `ByteLevel(use_regex=True)` applies; a digit regex first splits numbers into digits.
_SPLITS: dict[str, tuple[str | None, ...]] = {
    **{name: (None,) for name in ("default", "gpt2", "mpt", "olmo", "jais")},
    **{name: (r"\p{N}", None) for name in ("smollm", "starcoder", "refact", "command-r", "codeshell")},
    **{name: (_LLAMA3,) for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx")},
    **{name: (_QWEN2,) for name in ("qwen2", "deepseek-r1-qwen", "megrez")},
}


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of every byte value."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    spelling = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in spelling:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling


def _pre_tokenizer(pre: str) -> PreTokenizer:
    splits = _SPLITS.get(pre)
    if splits is None:
        raise GGUFError(f"GGUF tokenizer.ggml.pre {pre[:64]!r} is not a supported pre-tokenizer")
    steps: list[PreTokenizer] = [
        pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits if s is not None
    ]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=None in splits))
    return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)


def _str_list(metadata: dict[str, Any], key: str) -> list[str]:
    value = metadata.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise GGUFError(f"GGUF metadata {key} is missing or not a list of strings")
    return value


def _token(tokens: list[str], metadata: dict[str, Any], name: str) -> str | None:
    value = metadata.get(f"tokenizer.ggml.{name}_token_id")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(tokens):
        raise GGUFError(f"GGUF tokenizer.ggml.{name}_token_id = {value!r} is outside the vocabulary")
    return tokens[value]


def build_byte_level(metadata: dict[str, Any]) -> Tokenizer:
    """The `tokenizers` tokenizer of a byte-level BPE GGUF vocabulary."""
    tokens = _str_list(metadata, "tokenizer.ggml.tokens")
    merges = _str_list(metadata, "tokenizer.ggml.merges")
    types = metadata.get("tokenizer.ggml.token_type") or []
    if not isinstance(types, list) or (types and len(types) != len(tokens)):
        raise GGUFError("GGUF tokenizer.ggml.token_type does not have one entry per token")
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(tokens)
    }
    pairs: list[tuple[str, str]] = []
    for merge in merges:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise GGUFError(f"GGUF merge {merge[:40]!r} is not two tokens separated by one space")
        pairs.append((parts[0], parts[1]))
    try:
        model = models.BPE(
            vocab=vocab,
            merges=pairs,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    except Exception as exc:  # tokenizers raises its own exception type for bad merges
        raise GGUFError(f"GGUF vocabulary and merges do not form a BPE model: {exc}") from exc
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = _pre_tokenizer(str(metadata.get("tokenizer.ggml.pre", "default")))
    tokenizer.decoder = decoders.ByteLevel()
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, kind in zip(tokens, types, strict=False)
        if kind == CONTROL and set(t) <= alphabet
    ]
    tokenizer.add_special_tokens(control)
    user = [
        AddedToken(t, normalized=False, special=False)
        for t, kind in zip(tokens, types, strict=False)
        if kind == USER_DEFINED and t in vocab
    ]
    tokenizer.add_tokens(user)
    return tokenizer


def chat_template(metadata: dict[str, Any]) -> str | None:
    """The file's chat template, refused if it breaks the sandbox's limits on probe conversations."""
    template = metadata.get("tokenizer.chat_template")
    if template is None:
        return None
    if not isinstance(template, str):
        raise GGUFError("GGUF tokenizer.chat_template is not a string")
    try:
        validate_template(template)
    except ChatTemplateError as exc:
        raise GGUFError(f"GGUF chat template: {exc.message}") from None
    return template


def _add_bos_eos(tokenizer: Tokenizer, config: dict[str, Any]) -> None:
    """Put BOS/EOS around every encoding when the file asks for it, in tokenizer.json itself (a
    loaded tokenizer.json keeps its own post-processor whatever tokenizer_config.json says)."""
    bos = config["bos_token"] if config.get("add_bos_token") else None
    eos = config["eos_token"] if config.get("add_eos_token") else None
    if bos is None and eos is None:
        return
    first = f"{bos} " if bos is not None else ""
    last = f" {eos}" if eos is not None else ""
    specials = []
    for token in dict.fromkeys(t for t in (bos, eos) if t is not None):
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise GGUFError(f"GGUF special token {token[:40]!r} is not in the vocabulary")
        specials.append((token, token_id))
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{first}$A{last}",
        pair=f"{first}$A{last} {first}$B:1{last}",
        special_tokens=specials,
    )


def write_tokenizer(metadata: dict[str, Any], folder: Path) -> None:
    """Write the tokenizer folder (tokenizer.json, tokenizer_config.json) for the file's metadata."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(
            f"GGUF tokenizer model {str(kind)[:32]!r} is not supported (only byte-level BPE, 'gpt2')"
        )
    tokenizer = build_byte_level(metadata)
    tokens = _str_list(metadata, "tokenizer.ggml.tokens")
    config: dict[str, Any] = {"tokenizer_class": "TokenizersBackend", "backend": "tokenizers"}
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        config[f"{name}_token"] = _token(tokens, metadata, key)
    for flag in ("add_bos_token", "add_eos_token"):
        value = metadata.get(f"tokenizer.ggml.{flag}")
        if value is not None:
            config[flag] = bool(value)
    _add_bos_eos(tokenizer, config)
    template = chat_template(metadata)
    if template is not None:
        config["chat_template"] = template
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False))

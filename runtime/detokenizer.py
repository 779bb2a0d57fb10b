"""Streaming detokenization: turn one new token at a time into stable text deltas."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

# Prompt tokens kept as left context, so the first output token decodes as it would mid-text
# (SentencePiece drops a leading space at the start of a decode; merges can span tokens).
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Decodes a request's output token by token, emitting only text that can no longer change.

    It keeps a short window of token ids and two offsets into it (the technique of TGI and
    vLLM): ``prefix`` marks where the window starts and ``read`` the end of the tokens whose
    text was fully emitted. Each step decodes ``window[prefix:]`` and emits what it adds to the
    decode of ``window[prefix:read]`` (cached). A trailing U+FFFD means the last token(s) split
    a UTF-8 character: the text before it is emitted and the character waits for its last byte.
    Once the window decodes cleanly both offsets move to its end and the window is cut, so each
    step decodes a few tokens rather than the whole output.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._window: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._read_offset = len(self._window)
        self._prefix_text = self._decode(self._window)
        # Characters already emitted beyond the prefix text while the window ended mid-character.
        self._emitted_past_prefix = 0
        self.output_token_ids: list[int] = []
        self.text = ""

    def add_token(self, token_id: int) -> str:
        """Append one output token; return the text it makes stable (often "", never a torn char)."""
        self.output_token_ids.append(token_id)
        self._window.append(token_id)
        full_text = self._decode(self._window)
        if full_text.endswith(_REPLACEMENT_CHAR):
            return self._emit(full_text, len(full_text) - 1)
        if len(full_text) <= len(self._prefix_text):
            return ""  # e.g. a skipped special token: nothing new yet
        delta = self._emit(full_text, len(full_text))
        self._advance()
        return delta

    def finalize(self) -> str:
        """Flush text held back at the end (an incomplete character decodes as U+FFFD)."""
        if self._read_offset == len(self._window):
            return ""
        full_text = self._decode(self._window)
        delta = self._emit(full_text, len(full_text))
        self._advance()
        return delta

    def _emit(self, full_text: str, end: int) -> str:
        start = len(self._prefix_text) + self._emitted_past_prefix
        delta = full_text[start:end]
        self._emitted_past_prefix += len(delta)
        self.text += delta
        return delta

    def _advance(self) -> None:
        """The window decoded cleanly: its tokens become the next step's prefix context."""
        del self._window[: self._read_offset]
        self._read_offset = len(self._window)
        self._prefix_text = self._decode(self._window)
        self._emitted_past_prefix = 0

    def _decode(self, token_ids: list[int]) -> str:
        if not token_ids:
            return ""
        text = self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)
        if not isinstance(text, str):
            raise TypeError(f"tokenizer.decode returned {type(text).__name__}, expected str")
        return text

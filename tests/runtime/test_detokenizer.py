"""IncrementalDetokenizer against a real byte-level BPE tokenizer whose tokens split UTF-8 characters."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from runtime.detokenizer import IncrementalDetokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog while the unbelievable band plays.",
    "Café, naïve résumé, déjà vu, façade, Übermensch, smörgåsbord, piñata.",
    "日本語のテキストを少し書きます。中文文本也在这里。한국어 문장도 있습니다.",
    "Emoji time 😀🎉👍🏽 party 🙂 family 👨‍👩‍👧 flags 🇫🇷 done.",
]
SAMPLES = [
    "Hello, unbelievable world!",
    "naïve café résumé; smörgåsbord",
    "日本語のテキスト, 中文文本",
    "party 😀🎉 then 👍🏽 and 👨‍👩‍👧!",
    "mixed: añb 中文 🙂 tail",
]
REPLACEMENT = "\ufffd"


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,  # 256 bytes + a few merges: most non-ASCII characters stay split
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<eos>"],
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")


def decode(tokenizer: PreTrainedTokenizerFast, ids: list[int], skip_special_tokens: bool = False) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert isinstance(text, str)
    return text


def stream(tokenizer: PreTrainedTokenizerFast, prompt: list[int], output: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.add_token(token) for token in output]
    deltas.append(detok.finalize())
    assert "".join(deltas) == detok.text
    return deltas


def char_boundary_splits(tokenizer: PreTrainedTokenizerFast, ids: list[int]) -> list[int]:
    """Token positions where prompt and output decode to whole characters."""
    text = decode(tokenizer, ids)
    return [k for k in range(1, len(ids)) if decode(tokenizer, ids[:k]) + decode(tokenizer, ids[k:]) == text]


def test_tokenizer_splits_multibyte_characters(tokenizer: PreTrainedTokenizerFast) -> None:
    for sample in SAMPLES[1:4]:
        ids = tokenizer.encode(sample)
        assert any(REPLACEMENT in decode(tokenizer, [token]) for token in ids), sample


@pytest.mark.parametrize("sample", SAMPLES)
def test_deltas_concatenate_to_the_full_decode(tokenizer: PreTrainedTokenizerFast, sample: str) -> None:
    ids = tokenizer.encode(sample)
    splits = char_boundary_splits(tokenizer, ids)
    mid_word = 0
    for k in splits:
        prompt_text = decode(tokenizer, ids[:k])
        output_text = decode(tokenizer, ids[k:])
        mid_word += prompt_text[-1:].isalpha() and output_text[:1].isalpha()
        deltas = stream(tokenizer, ids[:k], ids[k:])
        assert "".join(deltas) == output_text
        assert not any(REPLACEMENT in delta for delta in deltas)
    assert splits and mid_word > 0


@pytest.mark.parametrize("sample", SAMPLES)
def test_text_appears_exactly_when_a_character_completes(
    tokenizer: PreTrainedTokenizerFast, sample: str
) -> None:
    ids = tokenizer.encode(sample)
    for k in char_boundary_splits(tokenizer, ids):
        detok = IncrementalDetokenizer(tokenizer, ids[:k])
        output = ids[k:]
        for i, token in enumerate(output):
            delta = detok.add_token(token)
            assert REPLACEMENT not in delta
            # Everything decodable so far, minus a character still missing bytes.
            assert detok.text == decode(tokenizer, output[: i + 1]).removesuffix(REPLACEMENT)


@pytest.mark.parametrize("sample", SAMPLES)
def test_prompt_ending_mid_character_never_leaks_replacement_chars(
    tokenizer: PreTrainedTokenizerFast, sample: str
) -> None:
    ids = tokenizer.encode(sample)
    for k in range(1, len(ids)):
        deltas = stream(tokenizer, ids[:k], ids[k:])
        assert not any(REPLACEMENT in delta for delta in deltas)
        assert sample.endswith("".join(deltas))


def test_finalize_flushes_a_torn_character(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer.encode("ok 😀")
    prompt, output = ids[:1], ids[1:-1]  # drop the emoji's last byte
    detok = IncrementalDetokenizer(tokenizer, prompt)
    streamed = "".join(detok.add_token(token) for token in output)
    assert REPLACEMENT not in streamed
    tail = detok.finalize()
    assert tail.endswith(REPLACEMENT)
    assert streamed + tail == decode(tokenizer, output)
    assert detok.finalize() == ""


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tokenizer: PreTrainedTokenizerFast, skip: bool) -> None:
    eos = tokenizer.eos_token_id
    output = [*tokenizer.encode(" 中文"), eos, *tokenizer.encode(" more")]
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("say"), skip_special_tokens=skip)
    text = "".join(detok.add_token(token) for token in output) + detok.finalize()
    assert text == decode(tokenizer, output, skip_special_tokens=skip)
    assert ("<eos>" in text) is not skip


def test_each_step_decodes_a_short_window(
    tokenizer: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tokenizer.encode(" ".join(SAMPLES * 8))
    decoded_lengths: list[int] = []
    real_decode = tokenizer.decode

    def spy(token_ids: list[int], **kwargs: bool) -> str | list[str]:
        decoded_lengths.append(len(token_ids))
        return real_decode(token_ids, **kwargs)

    monkeypatch.setattr(tokenizer, "decode", spy)
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("prompt " * 50))
    for token in output:
        detok.add_token(token)
    assert len(output) > 300
    assert max(decoded_lengths) <= 12
    monkeypatch.undo()
    assert detok.text == decode(tokenizer, output)

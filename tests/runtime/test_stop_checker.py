"""check_stop: EOS, stop tokens, stop strings (also across tokens), length, and streaming hold-back."""

from __future__ import annotations

from typing import NamedTuple

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from runtime.detokenizer import IncrementalDetokenizer
from runtime.request import Request, RequestStatus
from runtime.sampling_params import SamplingParams
from runtime.stop_checker import StopDecision, StopStringMatcher, check_stop

PIECES = ["<eos>", "<unk>", "Hel", "lo", " wor", "ld", "ST", "OP", "!", "x", "STOP", "lo w", "O", "STO"]
ID = {piece: i for i, piece in enumerate(PIECES)}
EOS = ID["<eos>"]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """Whole-piece tokens that decode by plain concatenation, so token boundaries are exact."""
    model = Tokenizer(models.WordLevel(ID, unk_token="<unk>"))
    model.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=model, eos_token="<eos>", unk_token="<unk>")


class Run(NamedTuple):
    decisions: list[StopDecision]
    streamed: str
    detok: IncrementalDetokenizer


def run(tokenizer: PreTrainedTokenizerFast, params: SamplingParams, tokens: list[str | int]) -> Run:
    """Feed tokens the way the engine does, stopping at the first finished decision."""
    request = Request("r", [ID["x"]], params, eos_token_ids=frozenset({EOS}))
    request.status = RequestStatus.RUNNING
    detok = IncrementalDetokenizer(tokenizer, request.prompt_token_ids)
    decisions: list[StopDecision] = []
    for token in tokens:
        token_id = ID[token] if isinstance(token, str) else token
        request.append_output_token(token_id)
        decision = check_stop(request, detok, detok.add_token(token_id))
        decisions.append(decision)
        if decision.finished:
            break
    return Run(decisions, "".join(d.emit_text for d in decisions), detok)


def test_eos_stops_and_its_text_is_dropped(tokenizer: PreTrainedTokenizerFast) -> None:
    out = run(tokenizer, SamplingParams(max_tokens=10), ["Hel", "lo", "<eos>", "x"])
    last = out.decisions[-1]
    assert len(out.decisions) == 3
    assert (last.finished, last.status, last.stop_reason) == (True, RequestStatus.FINISHED_STOPPED, None)
    assert out.streamed == "Hello"
    assert not out.decisions[0].finished and out.decisions[0].status == RequestStatus.RUNNING


def test_ignore_eos_keeps_going_until_length(tokenizer: PreTrainedTokenizerFast) -> None:
    out = run(tokenizer, SamplingParams(max_tokens=4, ignore_eos=True), ["Hel", "<eos>", "lo", "x", "x"])
    assert len(out.decisions) == 4
    assert out.decisions[-1].status == RequestStatus.FINISHED_LENGTH
    assert out.decisions[-1].stop_reason is None
    assert out.streamed == "Hellox"


def test_eos_before_min_tokens_does_not_stop(tokenizer: PreTrainedTokenizerFast) -> None:
    out = run(tokenizer, SamplingParams(max_tokens=10, min_tokens=3), ["Hel", "<eos>", "lo", "<eos>"])
    assert [d.finished for d in out.decisions] == [False, False, False, True]


def test_stop_token_ids(tokenizer: PreTrainedTokenizerFast) -> None:
    params = SamplingParams(stop_token_ids=(ID["!"],))
    out = run(tokenizer, params, ["Hel", "lo", "!", "x"])
    assert out.decisions[-1] == StopDecision(True, RequestStatus.FINISHED_STOPPED, ID["!"], "")
    assert out.streamed == "Hello"
    kept = run(
        tokenizer, SamplingParams(stop_token_ids=(ID["!"],), include_stop_str_in_output=True), ["lo", "!"]
    )
    assert kept.streamed == "lo!"


def test_stop_string_inside_one_token(tokenizer: PreTrainedTokenizerFast) -> None:
    out = run(tokenizer, SamplingParams(stop=("lo",)), ["Hel", "lo", " wor"])
    assert len(out.decisions) == 2
    assert out.decisions[-1].stop_reason == "lo"
    assert out.streamed == "Hel"


def test_stop_string_split_across_two_tokens_is_never_streamed(tokenizer: PreTrainedTokenizerFast) -> None:
    out = run(tokenizer, SamplingParams(stop=("STOP",)), ["Hel", " wor", "ST", "OP", "!"])
    assert [d.emit_text for d in out.decisions] == ["Hel", " wor", "", ""]
    assert out.decisions[-1].status == RequestStatus.FINISHED_STOPPED
    assert out.decisions[-1].stop_reason == "STOP"
    kept = run(
        tokenizer, SamplingParams(stop=("STOP",), include_stop_str_in_output=True), ["Hel", "ST", "OP"]
    )
    assert [d.emit_text for d in kept.decisions] == ["Hel", "", "STOP"]


def test_text_after_a_stop_string_in_the_same_token_is_cut(tokenizer: PreTrainedTokenizerFast) -> None:
    out = run(tokenizer, SamplingParams(stop=("low",)), ["Hel", "lo", " wor", "ld"])
    assert out.decisions[-1].stop_reason is None and out.streamed == "Hello world"
    out = run(tokenizer, SamplingParams(stop=("o w",)), ["Hel", "lo w", "ld"])
    assert out.decisions[-1].stop_reason == "o w" and out.streamed == "Hell"
    out = run(
        tokenizer, SamplingParams(stop=("o w",), include_stop_str_in_output=True), ["Hel", "lo", " wor"]
    )
    assert out.decisions[-1].stop_reason == "o w" and out.streamed == "Hello w"


def test_held_back_prefix_is_released_when_it_stops_matching(tokenizer: PreTrainedTokenizerFast) -> None:
    out = run(tokenizer, SamplingParams(stop=("STOP",)), ["Hel", "ST", "x", "lo"])
    assert [d.emit_text for d in out.decisions] == ["Hel", "", "STx", "lo"]
    assert not out.decisions[-1].finished


def test_held_back_prefix_is_released_at_length(tokenizer: PreTrainedTokenizerFast) -> None:
    out = run(tokenizer, SamplingParams(max_tokens=2, stop=("STOP",)), ["Hel", "ST", "OP"])
    assert [d.emit_text for d in out.decisions] == ["Hel", "ST"]
    assert out.decisions[-1].status == RequestStatus.FINISHED_LENGTH


def test_stop_string_on_the_last_allowed_token_wins_over_length(tokenizer: PreTrainedTokenizerFast) -> None:
    out = run(tokenizer, SamplingParams(max_tokens=3, stop=("STOP",)), ["Hel", "ST", "OP"])
    assert out.decisions[-1].status == RequestStatus.FINISHED_STOPPED
    assert out.streamed == "Hel"


def test_stop_strings_are_ignored_before_min_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    out = run(tokenizer, SamplingParams(min_tokens=3, stop=("lo",)), ["Hel", "lo", "x", "ST", "lo", "x"])
    assert len(out.decisions) == 5
    assert out.decisions[-1].stop_reason == "lo"
    assert out.streamed == "HelloxST"


def test_earliest_stop_string_wins(tokenizer: PreTrainedTokenizerFast) -> None:
    out = run(tokenizer, SamplingParams(stop=("OP", "ST")), ["Hel", "STOP"])
    assert out.decisions[-1].stop_reason == "ST"
    assert out.streamed == "Hel"


def test_streamed_text_equals_the_output_when_nothing_stops(tokenizer: PreTrainedTokenizerFast) -> None:
    tokens: list[str | int] = ["Hel", "ST", "lo", "ST", "O", "x", "STO"]
    out = run(tokenizer, SamplingParams(max_tokens=len(tokens), stop=("STOP", "lo!")), tokens)
    assert out.decisions[-1].status == RequestStatus.FINISHED_LENGTH
    assert out.streamed == out.detok.text


def test_length_finish_flushes_a_torn_character() -> None:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        ["ok ok"],
        trainers.BpeTrainer(
            vocab_size=260, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe)
    ids = tokenizer.encode("ok 😀")
    output = ids[1:-1]  # the emoji without its last byte
    request = Request("r", ids[:1], SamplingParams(max_tokens=len(output)))
    detok = IncrementalDetokenizer(tokenizer, request.prompt_token_ids)
    streamed = ""
    for token in output:
        request.append_output_token(token)
        streamed += check_stop(request, detok, detok.add_token(token)).emit_text
    assert streamed == tokenizer.decode(output)
    assert streamed.endswith("\ufffd")


def test_matcher_hold_back_and_search() -> None:
    matcher = StopStringMatcher(["STOP", "end."])
    assert matcher.held_back("xxSTO", 5) == 3
    assert matcher.held_back("xxSTOP", 6) == 0  # a whole match is not a prefix still forming
    assert matcher.held_back("the en", 6) == 2
    assert matcher.held_back("the enXX", 6) == 2
    assert matcher.find("aSTOP end.", new_start=4) == (1, "STOP")
    assert matcher.find("aSTOP end.", new_start=6) == (6, "end.")
    with pytest.raises(ValueError):
        StopStringMatcher([""])


def test_check_stop_rejects_inconsistent_calls(tokenizer: PreTrainedTokenizerFast) -> None:
    request = Request("r", [ID["x"]], SamplingParams())
    detok = IncrementalDetokenizer(tokenizer, request.prompt_token_ids)
    with pytest.raises(ValueError, match="appended"):
        check_stop(request, detok, "")
    request.append_output_token(ID["Hel"])
    detok.add_token(ID["Hel"])
    with pytest.raises(ValueError, match="delta"):
        check_stop(request, detok, "nope")

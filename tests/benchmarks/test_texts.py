"""The held-out text split: calibration and evaluation never share a page, and the split is stable."""

from __future__ import annotations

import subprocess
import sys

import pytest

from benchmarks.texts import (
    Document,
    _goes_to_calibration,
    calibration_passages,
    evaluation_windows,
    pydoc_documents,
    pydoc_split,
    split_documents,
)


def test_the_pydoc_split_is_disjoint_and_covers_every_page() -> None:
    documents = pydoc_documents()
    split = pydoc_split()
    cal_keys = {d.key for d in split.calibration}
    eval_keys = {d.key for d in split.evaluation}
    assert not cal_keys & eval_keys
    assert cal_keys | eval_keys <= {d.key for d in documents}
    evaluation = "\n\n".join(d.text for d in split.evaluation)
    for d in split.calibration:  # not even one paragraph of calibration text is evaluated on
        assert all(p.strip() not in evaluation for p in d.text.split("\n\n"))
    assert len({d.text for d in documents}) == len(documents)  # deduplicated by text
    # about a quarter calibrates; both halves are real amounts of text
    assert 0.1 < len(split.calibration) / len(documents) < 0.45
    assert sum(len(d.text) for d in split.calibration) > 20_000
    assert sum(len(d.text) for d in split.evaluation) > 100_000


def test_the_split_is_the_same_in_another_process() -> None:
    code = "from benchmarks.texts import pydoc_split; print([d.key for d in pydoc_split().calibration])"
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "7"}
    )
    assert other.stdout.strip() == str([d.key for d in pydoc_split().calibration])


def test_a_page_goes_by_its_text_not_its_name() -> None:
    docs = [Document(f"topic-{i}", f"page number {i} " * 20) for i in range(40)]
    split = split_documents(docs)
    renamed = split_documents([Document(f"other-{d.key}", d.text) for d in docs])
    assert [d.text for d in split.calibration] == [d.text for d in renamed.calibration]
    assert split.calibration and split.evaluation


def test_paragraphs_quoted_by_an_evaluation_page_leave_calibration() -> None:
    docs = [Document(f"topic-{i}", f"page number {i} " * 20) for i in range(40)]
    split = split_documents(docs)
    quoted = split.calibration[0].text
    # a page quoting it, with an outro chosen so that the page itself goes to evaluation
    quoting = next(
        text for k in range(100) if not _goes_to_calibration(text := f"intro\n\n{quoted}\n\noutro {k}")
    )
    again = split_documents([*docs, Document("zz-quoting", quoting)])
    assert quoted not in {d.text for d in again.calibration}
    assert len(again.calibration) == len(split.calibration) - 1


def test_a_split_with_an_empty_side_is_refused() -> None:
    with pytest.raises(ValueError, match="both sides"):
        split_documents([Document("one", "a single page")])


def test_calibration_passages_come_from_calibration_pages_only() -> None:
    split = pydoc_split()
    passages = calibration_passages(split.calibration, 40, max_chars=600)
    assert len(passages) == 40
    assert passages == calibration_passages(split.calibration, 40, max_chars=600)
    for p in passages:
        for paragraph in p.split("\n\n"):
            assert any(paragraph in d.text for d in split.calibration)
            assert not any(paragraph in d.text for d in split.evaluation)
    # round-robin: the first passages open different pages
    assert len({p[:40] for p in passages[: len(split.calibration)]}) == len(split.calibration)


def test_passages_join_paragraphs_up_to_the_limit() -> None:
    page = Document("p", "aaaa\n\nbbbb\n\ncccc\n\n" + "d" * 30)
    assert calibration_passages([page], 10, max_chars=10) == ["aaaa\n\nbbbb", "cccc", "d" * 30]
    with pytest.raises(ValueError):
        calibration_passages([page], 0)


def test_evaluation_windows_are_even_non_overlapping_slices_of_the_stream() -> None:
    docs = [Document("a", "x" * 50), Document("b", "y" * 48)]
    encode = lambda text: [ord(c) for c in text]  # noqa: E731
    stream = encode("x" * 50 + "\n\n" + "y" * 48)  # 100 tokens: ten windows of 10
    windows = evaluation_windows(docs, encode, window=10, count=3)
    assert windows == [stream[0:10], stream[30:40], stream[60:70]]
    assert len(evaluation_windows(docs, encode, window=10, count=50)) == 10
    with pytest.raises(ValueError, match="fewer than one window"):
        evaluation_windows(docs, encode, window=200, count=1)

"""Held-out English text for quality figures: Python's reference documentation, split in two.

Python ships its language reference's topic pages as `pydoc_data.topics.topics` (a dict of topic
name to plain text). It is English prose with some code, written by people, and no model of ours
generated it. The pages are deduplicated by text (two topic names may share one page), then each
page goes to calibration or evaluation by the sha256 of its text: the first byte below 64 (about a
quarter) calibrates, the rest evaluates. The split depends only on the text, so it is the same on
every run and machine for a given Python, and a page can never sit on both sides. Pages also
quote each other (the "compound" page holds the whole "for" page), so every paragraph of a
calibration page that also occurs in an evaluation page is dropped from calibration: no calibration
text reaches the evaluation.

Calibration passages are paragraphs of the calibration pages, joined up to a length; evaluation is
the evaluation pages joined into one token stream and cut into fixed windows, chosen evenly over the
stream so every part of the documentation is sampled.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import NamedTuple

# First sha256 byte below this sends a page to calibration (64/256: about a quarter of the pages).
CALIBRATION_BYTE_BELOW = 64
Encode = Callable[[str], list[int]]


class Document(NamedTuple):
    """One documentation page: its (first, in sorted order) topic name and its text."""

    key: str
    text: str


class TextSplit(NamedTuple):
    """Calibration and evaluation pages; they share no page (checked when made)."""

    calibration: tuple[Document, ...]
    evaluation: tuple[Document, ...]


def pydoc_documents() -> list[Document]:
    """Python's reference topic pages, one per distinct text, in topic-name order."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    out: list[Document] = []
    for key in sorted(topics):
        text = str(topics[key]).strip()
        if text and text not in seen:
            seen.add(text)
            out.append(Document(key, text))
    return out


def _goes_to_calibration(text: str) -> bool:
    return hashlib.sha256(text.encode("utf-8")).digest()[0] < CALIBRATION_BYTE_BELOW


def split_documents(documents: Sequence[Document]) -> TextSplit:
    """Each page to calibration or evaluation by the hash of its text (see the module docstring)."""
    evaluation = tuple(d for d in documents if not _goes_to_calibration(d.text))
    joined = "\n\n".join(d.text for d in evaluation)
    calibration: list[Document] = []
    for d in documents:
        if _goes_to_calibration(d.text):
            own = [p for p in _paragraphs(d.text) if p not in joined]
            if own:
                calibration.append(Document(d.key, "\n\n".join(own)))
    if not calibration or not evaluation:
        raise ValueError(f"a split needs pages on both sides: {len(calibration)} / {len(evaluation)}")
    shared_keys = {d.key for d in calibration} & {d.key for d in evaluation}
    leaked = [p for d in calibration for p in _paragraphs(d.text) if p in joined]
    if shared_keys or leaked:
        raise ValueError(f"calibration and evaluation share text: {sorted(shared_keys)[:5]} {leaked[:2]}")
    return TextSplit(tuple(calibration), evaluation)


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def pydoc_split() -> TextSplit:
    """The split of Python's reference pages that every quality benchmark uses."""
    return split_documents(pydoc_documents())


def calibration_passages(documents: Sequence[Document], count: int, max_chars: int = 600) -> list[str]:
    """Up to `count` passages of at most about `max_chars`: each page's paragraphs joined in order.

    A passage never spans two pages. Pages are visited round-robin (first passage of every page,
    then the second, ...) so a few long pages cannot fill the set.
    """
    if count < 1 or max_chars < 1:
        raise ValueError(f"count and max_chars must be positive, got {count} and {max_chars}")
    per_page = [_passages(d.text, max_chars) for d in documents]
    out: list[str] = []
    depth = 0
    while len(out) < count and any(depth < len(p) for p in per_page):
        out += [p[depth] for p in per_page if depth < len(p)]
        depth += 1
    return out[:count]


def _passages(text: str, max_chars: int) -> list[str]:
    out: list[str] = []
    current = ""
    for p in _paragraphs(text):
        if current and len(current) + 1 + len(p) > max_chars:
            out.append(current)
            current = ""
        current = f"{current}\n\n{p}" if current else p
    if current:
        out.append(current)
    return out


def evaluation_windows(
    documents: Sequence[Document], encode: Encode, window: int, count: int
) -> list[list[int]]:
    """`count` windows of `window` tokens, evenly spaced over the pages joined into one token stream.

    Windows do not overlap. Fewer come back only if the stream holds fewer than `count` windows.
    """
    if window < 2 or count < 1:
        raise ValueError(f"window must be at least 2 and count at least 1, got {window} and {count}")
    stream = encode("\n\n".join(d.text for d in documents))
    available = len(stream) // window
    if available == 0:
        raise ValueError(f"the evaluation text has {len(stream)} tokens, fewer than one window of {window}")
    taken = min(count, available)
    return [stream[j * window : (j + 1) * window] for j in ((i * available) // taken for i in range(taken))]

"""Calibration prompts for comparing blocks: a small built-in text set, or a file of the user's own.

Equivalence checks run a few prompts through both models; the built-in set mixes prose, dialogue,
code, numbers, lists and a little non-English text so that no single kind of input decides the result.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from transformers import PreTrainedTokenizerBase

CALIBRATION_TEXTS: tuple[str, ...] = (
    "The history of the city begins with a small fishing village on the river. Over three centuries it grew "
    "into a trading port, and its harbour became one of the busiest on the coast.",
    "User: Can you explain what a hash table is?\nAssistant: A hash table stores key-value pairs. It uses a "
    "hash function to turn each key into an index, so lookups take constant time on average.",
    "def fibonacci(n: int) -> list[int]:\n    seq = [0, 1]\n    while len(seq) < n:\n"
    "        seq.append(seq[-1] + seq[-2])\n    return seq[:n]\n",
    "Preheat the oven to 180 degrees. Mix 200 g of flour, 100 g of sugar and two eggs, then bake the batter "
    "for 25 minutes until golden brown.",
    "Photosynthesis converts light energy into chemical energy. Plants take in carbon dioxide and water and "
    "release oxygen, storing the energy as glucose.",
    "Q: What is 17 multiplied by 23?\nA: 17 times 20 is 340 and 17 times 3 is 51, so the answer is 391.",
    "Dear team, the quarterly report is attached. Revenue rose 12% compared with last year, while costs stayed "
    "flat. Please send your comments by Friday.",
    "Shopping list:\n- apples\n- bread\n- 2 litres of milk\n- coffee beans\n- batteries (AA)",
    "The old lighthouse keeper climbed the stairs every evening. From the top he could see the storm rolling "
    "in over the grey water, and he lit the lamp just before dark.",
    'SELECT name, COUNT(*) AS orders FROM customers JOIN orders USING (customer_id) GROUP BY name;\n{"status": '
    '"ok", "rows": 42}',
    "Le petit prince regardait les étoiles. Der Zug fährt um acht Uhr ab. El cielo está despejado hoy.",
    "In 1969 the Apollo 11 mission landed on the Moon. Neil Armstrong and Buzz Aldrin spent about two and a "
    "half hours outside the lunar module.",
)


class CalibrationError(ValueError):
    """Calibration prompts cannot be read or are unusable (missing file, bad JSON, no prompts)."""


def calibration_token_ids(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str] | None = None, max_len: int = 64
) -> list[list[int]]:
    """Each text tokenized as the model would see it (special tokens included), cut to `max_len` tokens.

    `texts` defaults to CALIBRATION_TEXTS.
    """
    if max_len < 1:
        raise CalibrationError(f"max_len must be at least 1, got {max_len}")
    chosen = CALIBRATION_TEXTS if texts is None else tuple(texts)
    if not chosen:
        raise CalibrationError("no calibration texts given")
    out: list[list[int]] = []
    for i, text in enumerate(chosen):
        if not isinstance(text, str) or not text.strip():
            raise CalibrationError(f"calibration text {i} is empty or not a string")
        ids = [int(t) for t in tokenizer.encode(text)]
        if not ids:
            raise CalibrationError(f"calibration text {i} tokenizes to no tokens")
        out.append(ids[:max_len])
    return out


def load_calibration_file(path: Path) -> list[str]:
    """Prompts from `path`: a JSON list of strings, or else one prompt per non-empty line.

    The format is told by content, not by name: a file whose text starts with `[` and parses as JSON
    must be a list of non-empty strings; anything else is read line by line.
    """
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"{path}: calibration file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"{path}: not UTF-8 text ({exc})") from exc
    except OSError as exc:
        raise CalibrationError(f"{path}: cannot read calibration file ({exc})") from exc
    prompts = _json_prompts(path, text)
    if prompts is None:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise CalibrationError(f"{path}: holds no calibration prompts")
    return prompts


def _json_prompts(path: Path, text: str) -> list[str] | None:
    if not text.lstrip().startswith("["):
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None  # a text prompt that happens to start with "["
    if not isinstance(data, list):
        raise CalibrationError(f"{path}: JSON calibration data must be a list of strings")
    for i, item in enumerate(data):
        if not isinstance(item, str) or not item.strip():
            raise CalibrationError(f"{path}: JSON item {i} is not a non-empty string: {item!r}")
    return list(data)

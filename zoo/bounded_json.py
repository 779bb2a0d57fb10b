"""JSON from tenant files, parsed with bounds: nesting depth, number length, finite numbers, file size.

Python's `json` recurses once per nesting level (a deep enough document raises RecursionError) and
refuses integers past 4300 digits with a bare ValueError; both used to surface as 500s. Here the depth
is measured first, by a linear scan over the brackets outside strings, and every number goes through a
hook that checks its length before converting it. Every refusal is a `JsonLimitError` (a 4xx) naming
the file, never its server path.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any

from runtime.errors import CorruptCheckpointError

MAX_DEPTH = 64
MAX_NUMBER_CHARS = 64
MAX_JSON_FILE_BYTES = 64 << 20
MAX_SAFETENSORS_HEADER_BYTES = 100 << 20
# A string, escapes included (the "unrolled loop" form: linear, no backtracking).
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_BRACKET = re.compile(r"[\[\]{}]")


class JsonLimitError(CorruptCheckpointError):
    """A tenant's JSON file is malformed or breaks a bound (depth, number size, file size)."""


def _depth_ok(text: str, what: str, max_depth: int) -> None:
    depth = 0
    for match in _BRACKET.finditer(_STRING.sub('""', text)):
        depth += 1 if match.group() in "[{" else -1
        if depth > max_depth:
            raise JsonLimitError(f"{what}: JSON nested deeper than {max_depth} levels")


def loads_bounded(data: bytes | str, what: str, max_depth: int = MAX_DEPTH) -> Any:
    """Parse `data` (the contents of the file `what`), or raise `JsonLimitError` saying what is wrong."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JsonLimitError(f"{what} is not valid UTF-8") from exc
    _depth_ok(data, what, max_depth)

    def number(text: str) -> str:
        if len(text) > MAX_NUMBER_CHARS:
            raise JsonLimitError(f"{what}: a number with more than {MAX_NUMBER_CHARS} characters")
        return text

    def as_float(text: str) -> float:
        value = float(number(text))
        if not math.isfinite(value):
            raise JsonLimitError(f"{what}: the number {text[:20]} is out of range")
        return value

    def constant(text: str) -> Any:
        raise JsonLimitError(f"{what}: {text} is not allowed; numbers must be finite")

    try:
        return json.loads(
            data, parse_int=lambda t: int(number(t)), parse_float=as_float, parse_constant=constant
        )
    except json.JSONDecodeError as exc:
        raise JsonLimitError(f"{what} is not valid JSON: {exc.msg} (line {exc.lineno})") from exc


def read_json_object(path: Path, max_bytes: int = MAX_JSON_FILE_BYTES) -> dict[str, Any]:
    """The JSON object in the file `path`, bounded; errors name the file only."""
    try:
        with path.open("rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise JsonLimitError(f"{path.name} cannot be read ({exc.strerror})") from exc
    if len(data) > max_bytes:
        raise JsonLimitError(f"{path.name} is larger than {max_bytes} bytes")
    value = loads_bounded(data, path.name)
    if not isinstance(value, dict):
        raise JsonLimitError(f"{path.name} must hold a JSON object")
    return value


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int, int]:
    """(header, header length, file size) of the safetensors file `path`, the header parsed bounded."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if length < 2 or length > MAX_SAFETENSORS_HEADER_BYTES or 8 + length > size:
                raise JsonLimitError(
                    f"{path.name} is not a complete safetensors file (truncated or corrupt header)"
                )
            raw = handle.read(length)
    except OSError as exc:
        raise JsonLimitError(f"{path.name} cannot be read ({exc.strerror})") from exc
    header = loads_bounded(raw, f"{path.name} (safetensors header)")
    if not isinstance(header, dict):
        raise JsonLimitError(f"{path.name}: the safetensors header is not a JSON object")
    return header, length, size


def check_model_json(folder: Path) -> None:
    """Parse, bounded, every JSON file and safetensors header of a model folder that the zoo reads
    with plain `json` later; the first that breaks a bound raises `JsonLimitError`."""
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        if path.name.endswith(".json"):
            read_json_object(path)
        elif path.name.endswith(".safetensors"):
            read_safetensors_header(path)

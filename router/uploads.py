"""A model folder uploaded as `multipart/form-data`, streamed to disk under size limits.

The body is parsed as it arrives (python-multipart's push parser), so a file is never held in memory
whole: file data is buffered up to `FLUSH_BYTES` and appended to its file in a worker thread. Limits
are checked on every chunk, so an oversized upload stops at the first byte past its limit, and any
rejection removes what was written so far.
"""

from __future__ import annotations

import itertools
import math
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from router.errors import APIError
from router.template_checks import check_folder_templates
from runtime.errors import BlockZooError
from zoo.bounded_json import JsonLimitError, read_json_object, read_safetensors_header
from zoo.chat_template import ChatTemplateError, validate_template
from zoo.gguf_config import gguf_raw_config
from zoo.gguf_file import read_gguf
from zoo.peft_adapter import AdapterConfigError, check_lora_numbers

ALLOWED_EXTENSIONS = (".json", ".safetensors", ".model", ".txt", ".jinja", ".gguf")
FILE_FIELDS = ("files", "files[]")
MAX_FIELD_BYTES = 64 * 1024
FLUSH_BYTES = 1 << 20
MAX_NAME_BYTES = 255
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")


class UploadLimits(NamedTuple):
    """`max_upload_bytes` bounds the whole request body; `max_file_bytes` each file's content."""

    max_file_bytes: int
    max_upload_bytes: int
    max_files: int = 64


class ReceivedUpload(NamedTuple):
    """The form fields and the names of the files written into the destination folder."""

    fields: dict[str, str]
    files: list[str]
    body_bytes: int


def bad_upload(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code="invalid_upload")


def too_large(message: str) -> APIError:
    return APIError(413, message, code="upload_too_large")


def check_file_name(name: str) -> str:
    """`name` if it is a plain file name with an allowed extension; a 400 saying what is allowed otherwise."""
    if "/" in name or "\\" in name or ".." in name or name.startswith("."):
        raise bad_upload(
            f"file name {name!r} is not allowed: send plain file names, without folders, '..' or a leading '.'",
            "files",
        )
    if not _SAFE_NAME.fullmatch(name):
        raise bad_upload(
            f"file name {name!r} is not allowed: use letters, digits, '.', '_', '+' and '-'", "files"
        )
    if not name.lower().endswith(ALLOWED_EXTENSIONS):
        raise bad_upload(
            f"file {name!r} has a type that is not accepted; allowed: {', '.join(ALLOWED_EXTENSIONS)}",
            "files",
        )
    return name


class _Receiver:
    """python-multipart callbacks: file data is queued here and written by `flush` off the event loop."""

    def __init__(self, dest: Path, limits: UploadLimits) -> None:
        self.dest = dest
        self.limits = limits
        self.fields: dict[str, str] = {}
        self.files: list[str] = []
        self.pending: list[tuple[Path, bytes]] = []
        self.pending_bytes = 0
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._file: Path | None = None
        self._file_name = ""
        self._file_bytes = 0
        self._field: str | None = None
        self._field_data = bytearray()

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
        }

    def on_part_begin(self) -> None:
        self._disposition = b""
        self._file = None
        self._field = None
        self._file_bytes = 0
        self._field_data = bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = b""
        self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        field = _decode(options.get(b"name", b""), "field name")
        if not field:
            raise bad_upload("every multipart part needs a Content-Disposition name")
        if b"filename" not in options:
            if field in self.fields:
                raise bad_upload(f"form field {field!r} was sent twice", field)
            self._field = field
            return
        if field not in FILE_FIELDS:
            raise bad_upload(f"files go in the form field 'files', not {field!r}", field)
        name = check_file_name(_decode(options[b"filename"], "file name"))
        if name in self.files:
            raise bad_upload(f"file {name!r} was sent twice", "files")
        if len(self.files) >= self.limits.max_files:
            raise bad_upload(f"too many files: at most {self.limits.max_files} per upload", "files")
        self.files.append(name)
        self._file = self.dest / name
        self._file_name = name
        self._queue(b"")  # creates the file even when it is empty

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._file is not None:
            self._file_bytes += len(chunk)
            if self._file_bytes > self.limits.max_file_bytes:
                raise too_large(
                    f"file {self._file_name!r} is larger than the limit of {self.limits.max_file_bytes} bytes"
                )
            self._queue(chunk)
        elif self._field is not None:
            if len(self._field_data) + len(chunk) > MAX_FIELD_BYTES:
                raise bad_upload(f"form field {self._field!r} is longer than {MAX_FIELD_BYTES} bytes")
            self._field_data.extend(chunk)

    def on_part_end(self) -> None:
        if self._field is not None:
            self.fields[self._field] = _decode(bytes(self._field_data), f"form field {self._field!r}")

    def _queue(self, chunk: bytes) -> None:
        if self._file is None:
            return
        self.pending.append((self._file, chunk))
        self.pending_bytes += len(chunk)

    def flush(self) -> None:
        """Append the queued data to its files (blocking: run it in a worker thread)."""
        pending, self.pending, self.pending_bytes = self.pending, [], 0
        for path, group in itertools.groupby(pending, key=lambda item: item[0]):
            with path.open("ab") as handle:
                for _, chunk in group:
                    handle.write(chunk)


def _decode(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_upload(f"{what} is not valid UTF-8") from exc


def _boundary(request: Request) -> bytes:
    content_type = request.headers.get("content-type", "")
    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        raise APIError(
            415,
            "send the model as multipart/form-data: a 'name' field and the folder's files in 'files'",
            code="unsupported_media_type",
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise bad_upload("multipart/form-data without a boundary")
    return boundary


def check_declared_size(request: Request, limits: UploadLimits) -> None:
    """Refuse at once a body whose Content-Length already exceeds the upload limit."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_upload_bytes:
        raise too_large(
            f"upload of {declared} bytes is larger than the limit of {limits.max_upload_bytes} bytes"
        )


async def receive_upload(request: Request, dest: Path, limits: UploadLimits) -> ReceivedUpload:
    """Stream the multipart body of `request` into the new folder `dest`; on any error `dest` is removed."""
    check_declared_size(request, limits)
    boundary = _boundary(request)
    dest.mkdir(parents=True, exist_ok=False)
    receiver = _Receiver(dest, limits)
    total = 0
    try:
        parser = MultipartParser(boundary, receiver.callbacks())  # type: ignore[arg-type]
        async for chunk in request.stream():
            total += len(chunk)
            if total > limits.max_upload_bytes:
                raise too_large(f"upload is larger than the limit of {limits.max_upload_bytes} bytes")
            parser.write(chunk)
            if receiver.pending_bytes >= FLUSH_BYTES:
                await run_in_threadpool(receiver.flush)
        parser.finalize()
        await run_in_threadpool(receiver.flush)
        if not receiver.files:
            raise bad_upload("no files uploaded: send the model folder's files in the form field 'files'")
    except FormParserError as exc:
        await run_in_threadpool(shutil.rmtree, dest, True)
        raise bad_upload(f"malformed multipart body: {exc}") from exc
    except BaseException:
        await run_in_threadpool(shutil.rmtree, dest, True)
        raise
    return ReceivedUpload(receiver.fields, receiver.files, total)


# -- checks of a model folder, cheap enough to answer 400 before a job starts -------------------------

_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip


def _json_object(path: Path) -> dict[str, object]:
    try:
        return read_json_object(path)
    except JsonLimitError as exc:
        raise bad_upload(str(exc)) from exc


def gguf_in(folder: Path) -> Path | None:
    """The one GGUF file of a folder `check_model_folder` called 'gguf' (None for other kinds)."""
    ggufs = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(".gguf"))
    return ggufs[0] if len(ggufs) == 1 else None


def check_gguf_file(path: Path) -> None:
    """Parse the header (every size bounded and checked against the file), check the chat template in
    the sandbox and map the architecture: what a 400 can say before a job starts. The tensors are read
    in the job."""
    try:
        contents = read_gguf(path)
    except BlockZooError as exc:
        raise bad_upload(f"{path.name}: {exc}") from exc
    template = contents.metadata.get("tokenizer.chat_template")
    if isinstance(template, str):
        try:
            validate_template(template)
        except ChatTemplateError as exc:
            raise APIError(
                400, f"{path.name}: chat template: {exc.message}", param="files", code="invalid_chat_template"
            ) from None
    try:
        gguf_raw_config(contents)
    except BlockZooError as exc:
        raise bad_upload(f"{path.name}: {exc}") from exc


def check_safetensors(path: Path) -> None:
    """Parse the header of `path` and check that its tensors exactly fill the file (a 400 otherwise)."""
    try:
        header, length, size = read_safetensors_header(path)
    except JsonLimitError as exc:
        raise bad_upload(str(exc)) from exc
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
            or not isinstance(shape, list)
            or not all(isinstance(d, int) and d >= 0 for d in shape)
        ):
            raise bad_upload(f"{path.name}: tensor {name!r} has a malformed header entry")
        itemsize = _DTYPE_BYTES.get(str(info.get("dtype")))
        if itemsize is not None and offsets[1] - offsets[0] != itemsize * math.prod(shape):
            raise bad_upload(f"{path.name}: tensor {name!r} has a size that does not match its shape")
        end = max(end, offsets[1])
    if end != size - 8 - length:
        raise bad_upload(
            f"{path.name}: the header describes {end} bytes of tensor data but the file holds "
            f"{size - 8 - length} (truncated or corrupt)"
        )


def check_model_folder(folder: Path) -> str:
    """'lora', 'full' or 'gguf' when `folder` looks like a PEFT adapter, a checkpoint or one GGUF file; a 400
    saying what is wrong else.

    Blocking file reads: call it in a worker thread.
    """
    names = {p.name for p in folder.iterdir() if p.is_file()}
    weights = sorted(n for n in names if n.endswith(".safetensors"))
    ggufs = sorted(n for n in names if n.lower().endswith(".gguf"))
    if ggufs:
        if len(names) != 1:
            raise bad_upload(
                "a GGUF fine-tune is one .gguf file sent alone (it carries its config and tokenizer)"
            )
        check_gguf_file(folder / ggufs[0])
        return "gguf"
    if "adapter_config.json" in names:
        kind = "lora"
        try:
            check_lora_numbers(_json_object(folder / "adapter_config.json"))
        except AdapterConfigError as exc:
            raise bad_upload(str(exc), exc.field) from exc
        if "adapter_model.safetensors" not in names:
            raise bad_upload("an adapter needs adapter_model.safetensors next to adapter_config.json")
    elif "config.json" in names:
        kind = "full"
        _json_object(folder / "config.json")
        if not weights:
            raise bad_upload("a checkpoint needs its *.safetensors weights next to config.json")
    else:
        raise bad_upload(
            "not a model folder: send adapter_config.json + adapter_model.safetensors (a LoRA adapter) "
            "or config.json + *.safetensors (a full checkpoint)"
        )
    for name in sorted(names):
        if name.endswith(".json"):
            _json_object(folder / name)
    for name in weights:
        check_safetensors(folder / name)
    check_folder_templates(folder)
    return kind


def resolve_allowed_dir(path: str, roots: Sequence[Path]) -> Path:
    """The folder `path` with symlinks resolved, if it and every file in it lie under one of `roots`."""
    if not roots:
        raise bad_upload(
            "registration from server paths is disabled: no allowed roots are configured", "path"
        )
    # What the OS would refuse with an exception (a 500) is refused here first.
    if "\x00" in path:
        raise bad_upload("path must not contain NUL bytes", "path")
    if any(len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES for part in path.split("/")):
        raise bad_upload(f"path has a component longer than {MAX_NAME_BYTES} bytes", "path")
    raw = Path(path)
    if not raw.is_absolute():
        raise bad_upload("path must be absolute", "path")
    resolved_roots = [root.resolve() for root in roots]

    def allowed(p: Path) -> bool:
        return any(p.is_relative_to(root) for root in resolved_roots)

    # Containment is checked before existence so that the answer reveals nothing outside the roots.
    # Messages never echo the path: they would show server paths back.
    try:
        folder = raw.resolve()
        if not allowed(folder):
            raise bad_upload("path is outside the allowed roots", "path")
        if not folder.is_dir():
            raise bad_upload("path is not a folder", "path")
        for entry in folder.iterdir():
            if not allowed(entry.resolve()):
                raise bad_upload(f"{entry.name} links outside the allowed roots", "path")
    except (OSError, RuntimeError, UnicodeError) as exc:  # RuntimeError: a symlink loop
        raise bad_upload("path is not a readable folder", "path") from exc
    return folder

"""What a registration reads: a Hugging Face checkpoint folder or a GGUF file, split into blocks.

Both kinds end as the same `SplitCheckpoint` plus a folder holding the tokenizer files, so the
registry records them the same way. A GGUF file is recognised by its magic bytes, never by its name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from runtime.errors import MissingFileError
from zoo.bounded_json import check_model_json
from zoo.errors import RegistrationError
from zoo.gguf_file import is_gguf
from zoo.gguf_import import import_gguf
from zoo.splitter import SplitCheckpoint, split_checkpoint

Progress = Callable[[str, float], None]


@contextmanager
def checkpoint_source(
    path: Path, progress: Progress | None, dequantize: bool
) -> Iterator[tuple[SplitCheckpoint, Path]]:
    """The checkpoint at `path` split into blocks, and the folder its tokenizer files are in.

    A GGUF file's tokenizer folder is a temporary one, gone when the registration is over.
    `dequantize` (GGUF only) stores every tensor dense in fp32 instead of 4-bit blocks.
    """
    if is_gguf(path):
        with import_gguf(path, dequantize, progress=_hashing(progress)) as imported:
            yield imported.split, imported.tokenizer_dir
        return
    if dequantize:
        raise RegistrationError("dequantize applies to GGUF files only")
    check_folder(path)
    yield split_checkpoint(path, progress=_hashing(progress)), path


def _hashing(progress: Progress | None) -> Callable[[int, int], None]:
    def tick(done: int, total: int) -> None:
        if progress is not None:
            progress("hashing blocks", done / max(total, 1))

    return tick


def has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()


def check_folder(folder: Path) -> None:
    """A readable, non-empty checkpoint folder whose JSON files are within bounds."""
    if not folder.is_dir():
        raise MissingFileError("the model folder is not a directory")
    if not any(folder.iterdir()):
        raise MissingFileError("the model folder is empty")
    # Later stages read these files with plain `json`: bound them first (depth, number size).
    check_model_json(folder)

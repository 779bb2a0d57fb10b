"""A server folder copied into staging at request time, so a registration job reads only what was checked.

Checking a folder when the request arrives and reading it later, in the job, leaves a window in which
a file can be swapped for a symlink to anything the server can read. So the folder is opened once
(its real location checked on the open descriptor), each file is opened relative to it with
O_NOFOLLOW, anything that is not a regular file is refused, and the bytes are copied, within the
upload limits, into a fresh staging folder that the job then owns.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Sequence
from pathlib import Path

from router.errors import APIError
from router.uploads import UploadLimits, bad_upload, check_file_name, too_large

COPY_CHUNK = 1 << 20
# The one sub-folder a model folder may carry (transformers' extra named chat templates).
EXTRA_TEMPLATES = "additional_chat_templates"


def _within(real: str, roots: Sequence[Path]) -> bool:
    return any(Path(real).is_relative_to(root.resolve()) for root in roots)


def _open_folder(folder: Path, roots: Sequence[Path]) -> int:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        raise bad_upload("path is not a readable folder", "path") from exc
    # Whatever was opened, it must be inside the roots now: its descriptor says where it really is.
    if not _within(os.readlink(f"/proc/self/fd/{fd}"), roots):
        os.close(fd)
        raise bad_upload("path is outside the allowed roots", "path")
    return fd


def _copy_one(dir_fd: int, name: str, dest: Path, limits: UploadLimits, budget: int) -> int:
    """Copy the regular file `name` (not following links) to `dest`; returns its size."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError as exc:
        # ELOOP: the name is a symbolic link.
        raise bad_upload(
            f"{name} is not a regular file: send plain files, not links, devices or pipes", "path"
        ) from exc
    with os.fdopen(fd, "rb") as src:
        info = os.fstat(src.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise bad_upload(
                f"{name} is not a regular file: send plain files, not links, devices or pipes", "path"
            )
        if info.st_nlink > 1:
            raise bad_upload(f"{name} has other hard links; send a plain copy", "path")
        if info.st_size > limits.max_file_bytes:
            raise too_large(f"file {name!r} is larger than the limit of {limits.max_file_bytes} bytes")
        if info.st_size > budget:
            raise too_large(f"the folder is larger than the limit of {limits.max_upload_bytes} bytes")
        copied = 0
        with dest.open("xb") as out:
            while chunk := src.read(COPY_CHUNK):
                copied += len(chunk)
                if copied > min(limits.max_file_bytes, budget):  # it grew while being copied
                    raise too_large(f"file {name!r} grew past the size limit while being read")
                out.write(chunk)
    return copied


def _copy_files(
    dir_fd: int, dest: Path, limits: UploadLimits, budget: int, copied: list[str], prefix: str = ""
) -> int:
    """Copy the model files directly in the open folder `dir_fd` into `dest`; returns the budget left.

    Names an upload would refuse (README.md, .gitattributes, ...) are skipped, and so are sub-folders
    other than the one for extra chat templates, which transformers reads and the zoo keeps.
    """
    for name in sorted(os.listdir(dir_fd)):
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISDIR(info.st_mode):
            if not prefix and name == EXTRA_TEMPLATES:
                sub_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
                try:
                    (dest / name).mkdir()
                    budget = _copy_files(sub_fd, dest / name, limits, budget, copied, f"{name}/")
                finally:
                    os.close(sub_fd)
            continue
        try:
            check_file_name(name)
        except APIError:
            continue
        if prefix and not name.endswith(".jinja"):
            continue
        if len(copied) >= limits.max_files:
            raise bad_upload(f"too many files: at most {limits.max_files} per model folder", "path")
        budget -= _copy_one(dir_fd, name, dest / name, limits, budget)
        copied.append(prefix + name)
    return budget


def copy_into_staging(folder: Path, roots: Sequence[Path], dest: Path, limits: UploadLimits) -> list[str]:
    """Copy the model files of `folder` into the new folder `dest` (removed again on any error); returns
    their names, relative to `folder`."""
    dir_fd = _open_folder(folder, roots)
    dest.mkdir(parents=True, exist_ok=False)
    copied: list[str] = []
    try:
        try:
            _copy_files(dir_fd, dest, limits, limits.max_upload_bytes, copied)
        except OSError as exc:  # an entry vanished or changed kind while being copied
            raise bad_upload(
                "the folder changed or could not be read while it was being copied", "path"
            ) from exc
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    finally:
        os.close(dir_fd)
    if not copied:
        shutil.rmtree(dest, ignore_errors=True)
        raise bad_upload("the folder holds no model files", "path")
    return copied

"""The zoo's content-addressed file store for blocks, deltas and tokenizers.

Layout under `root`:

    blocks/<id[:2]>/<id>.safetensors     one BlockData each (metadata: kind, fields JSON, block_id)
    deltas/<id[:2]>/<id>.safetensors     one DeltaData each (metadata: kind, fields JSON, delta_id)
    tokenizers/<id>/                     one tokenizer's files

Blocks and deltas are the same kind of record (kind, tensors, fields) with domain-separated ids, so
one code path stores both; a `namespace` argument ("blocks" / "deltas") says which folder a call means.
Every write goes to a temp name next to its target, is fsynced, renamed into place, and the folder
fsynced: a reader sees a whole file or none. A crash leaves at most a temp entry, which `gc` removes
once it is older than `temp_grace_s`, so gc never races a write still in progress.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Literal, NamedTuple, TypeVar

from safetensors.torch import save_file

from runtime.errors import CorruptCheckpointError, MissingFileError
from runtime.safetensors_mmap import SafetensorsFile
from zoo.blocks import BlockData, ContentData, DeltaData, InvalidContentError, check_content_id, is_content_id

Namespace = Literal["blocks", "deltas"]
NAMESPACES: tuple[Namespace, ...] = ("blocks", "deltas")
SUFFIX = ".safetensors"
DEFAULT_TEMP_GRACE_S = 3600.0
# What AutoTokenizer may read; weights and model config stay out so fine-tunes share one tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
)
_EXTRA_TEMPLATES = "additional_chat_templates"

C = TypeVar("C", bound=ContentData)


class CorruptBlockError(CorruptCheckpointError):
    """A stored block or delta file is truncated, malformed, or its content no longer matches its id."""


class MissingBlockError(MissingFileError):
    """No block, delta or tokenizer with that id is in the store."""


class PutResult(NamedTuple):
    """`created` is False when the id was already stored intact and nothing was written."""

    block_id: str
    nbytes: int
    created: bool


class GcReport(NamedTuple):
    """What one `gc` removed; `freed_bytes` counts every removed file, temp files included."""

    removed_blocks: int
    removed_temp_files: int
    freed_bytes: int
    removed_deltas: int = 0
    removed_tokenizers: int = 0


class BlockStore:
    """Blocks and deltas as safetensors files named by their ids, plus tokenizer folders; see module doc."""

    def __init__(self, root: Path, temp_grace_s: float = DEFAULT_TEMP_GRACE_S) -> None:
        self.root = Path(root)
        self.temp_grace_s = temp_grace_s

    def path(self, content_id: str, namespace: Namespace = "blocks") -> Path:
        if namespace not in NAMESPACES:
            raise ValueError(f"namespace must be one of {NAMESPACES}, got {namespace!r}")
        check_content_id(content_id)
        return self.root / namespace / content_id[:2] / f"{content_id}{SUFFIX}"

    # ---- blocks and deltas -------------------------------------------------------------------

    def put(self, record: BlockData | DeltaData) -> PutResult:
        """Store a block (or delta) under its id; an id already stored intact is not written again."""
        content_id = record.content_id
        final = self.path(content_id, "deltas" if isinstance(record, DeltaData) else "blocks")
        if final.is_file() and _readable(final):
            return PutResult(content_id, final.stat().st_size, False)
        _make_dir(final.parent)
        tmp = final.parent / _temp_name(content_id)
        metadata = {"kind": record.kind, "fields": json.dumps(record.fields, sort_keys=True)}
        metadata[record.ID_KEY] = content_id
        try:
            save_file({k: t.contiguous() for k, t in record.tensors.items()}, str(tmp), metadata=metadata)
            with tmp.open("rb+") as fh:
                os.fsync(fh.fileno())
            # The runtime's reader knows fewer dtypes than safetensors writes: refuse before publishing.
            if not _readable(tmp):
                raise InvalidContentError(f"{content_id}: written file cannot be read back by the runtime")
            os.rename(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(final.parent)
        return PutResult(content_id, final.stat().st_size, True)

    def load(self, block_id: str, verify: bool = False) -> BlockData:
        """The block with tensors memory-mapped; `verify` rehashes it and raises CorruptBlockError on mismatch."""
        return self._load(BlockData, block_id, "blocks", verify)

    def load_delta(self, delta_id: str, verify: bool = False) -> DeltaData:
        return self._load(DeltaData, delta_id, "deltas", verify)

    def _load(self, cls: type[C], content_id: str, namespace: Namespace, verify: bool) -> C:
        path = self.path(content_id, namespace)
        if not path.is_file():
            raise MissingBlockError(f"{cls.DOMAIN} {content_id} is not in the store at {self.root}")
        try:
            st = SafetensorsFile(path)
        except CorruptCheckpointError as exc:
            raise CorruptBlockError(f"{cls.DOMAIN} {content_id}: {exc}") from exc
        meta = st.metadata
        if meta.get(cls.ID_KEY) != content_id:
            raise CorruptBlockError(f"{path}: metadata names {cls.ID_KEY} {meta.get(cls.ID_KEY)!r}")
        try:
            record = cls(kind=meta["kind"], tensors=st.tensors(), fields=json.loads(meta["fields"]))
        except (KeyError, json.JSONDecodeError, InvalidContentError) as exc:
            raise CorruptBlockError(f"{path}: bad {cls.DOMAIN} metadata: {exc}") from exc
        if verify and record.content_id != content_id:
            raise CorruptBlockError(
                f"{path}: content hashes to {record.content_id}, not to its id {content_id}: the file is corrupt"
            )
        return record

    def has(self, content_id: str, namespace: Namespace = "blocks") -> bool:
        return self.path(content_id, namespace).is_file()

    def nbytes(self, content_id: str, namespace: Namespace = "blocks") -> int:
        """Bytes the stored file takes on disk."""
        try:
            return self.path(content_id, namespace).stat().st_size
        except FileNotFoundError:
            raise MissingBlockError(f"{content_id} is not in the store's {namespace}") from None

    def list_ids(self, namespace: Namespace = "blocks") -> set[str]:
        return {p.name.removesuffix(SUFFIX) for p in self._stored_files(namespace)}

    def delete(self, content_id: str, namespace: Namespace = "blocks") -> bool:
        """Remove one stored file; False when it was not there."""
        path = self.path(content_id, namespace)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        _fsync_dir(path.parent)
        return True

    def stored_bytes(self, namespace: Namespace | Literal["tokenizers"] | None = None) -> int:
        """Bytes on disk of one namespace, or of everything (blocks, deltas, tokenizers) when None."""
        if namespace is None:
            return sum(self.stored_bytes(ns) for ns in NAMESPACES) + self.stored_bytes("tokenizers")
        if namespace == "tokenizers":
            return sum(_tree_size(self.tokenizer_path(t)) for t in self.list_tokenizer_ids())
        return sum(_file_size(p) for p in self._stored_files(namespace))

    def _stored_files(self, namespace: Namespace) -> list[Path]:
        files = (self.root / namespace).glob(f"??/*{SUFFIX}")
        return [
            p for p in files if is_content_id(p.name.removesuffix(SUFFIX)) and p.name[:2] == p.parent.name
        ]

    # ---- tokenizers --------------------------------------------------------------------------

    def put_tokenizer(self, folder: Path) -> str:
        """Store a model folder's tokenizer files under their content id (dedup: same files, same id)."""
        files = _tokenizer_files(Path(folder))
        h = hashlib.sha256(b"blockzoo-tokenizer-v1")
        for name in sorted(files):
            for piece in (name.encode(), files[name]):
                h.update(len(piece).to_bytes(8, "little"))
                h.update(piece)
        tokenizer_id = h.hexdigest()
        final = self.tokenizer_path(tokenizer_id)
        if final.is_dir():
            return tokenizer_id
        _make_dir(final.parent)
        tmp = final.parent / _temp_name(tokenizer_id)
        try:
            for name, data in files.items():
                target = tmp / name
                target.parent.mkdir(parents=True, exist_ok=True)
                with target.open("wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
            for d in {(tmp / name).parent for name in files}:
                _fsync_dir(d)
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.is_dir():
                    raise  # otherwise a concurrent put published the same content first
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _fsync_dir(final.parent)
        return tokenizer_id

    def tokenizer_path(self, tokenizer_id: str) -> Path:
        """The folder to hand to `runtime.checkpoint_loader.load_tokenizer` (it may not exist)."""
        return self.root / "tokenizers" / check_content_id(tokenizer_id)

    def has_tokenizer(self, tokenizer_id: str) -> bool:
        return self.tokenizer_path(tokenizer_id).is_dir()

    def list_tokenizer_ids(self) -> set[str]:
        root = self.root / "tokenizers"
        return {p.name for p in root.iterdir() if is_content_id(p.name)} if root.is_dir() else set()

    # ---- garbage collection ------------------------------------------------------------------

    def gc(
        self,
        referenced: set[str],
        *,
        referenced_deltas: set[str] | None = None,
        referenced_tokenizers: set[str] | None = None,
    ) -> GcReport:
        """Remove blocks not in `referenced`, and temp entries of crashed writes older than the grace period.

        Deltas and tokenizers are collected only when their referenced sets are given, so a caller
        that thinks only of blocks cannot wipe the other namespaces by passing nothing for them.
        Call it with every id the catalog references, including those of imports in progress.
        """
        cutoff = time.time() - self.temp_grace_s
        freed = 0
        removed = {"blocks": 0, "deltas": 0, "tokenizers": 0}
        plan: tuple[tuple[Namespace, set[str] | None], ...] = (
            ("blocks", referenced),
            ("deltas", referenced_deltas),
        )
        for namespace, keep in plan:
            if keep is None:
                continue
            for path in self._stored_files(namespace):
                if path.name.removesuffix(SUFFIX) not in keep:
                    size = _file_size(path)
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                        removed[namespace] += 1
                        freed += size
        tok_root = self.root / "tokenizers"
        if referenced_tokenizers is not None:
            for tid in self.list_tokenizer_ids() - referenced_tokenizers:
                # Renamed to a temp name first, so a crash mid-delete never leaves half a tokenizer.
                doomed = tok_root / _temp_name(tid)
                with contextlib.suppress(FileNotFoundError):
                    os.rename(tok_root / tid, doomed)
                    freed += _tree_size(doomed)
                    shutil.rmtree(doomed, ignore_errors=True)
                    removed["tokenizers"] += 1
        temps = 0
        candidates = [*self.root.glob("blocks/??/.*"), *self.root.glob("deltas/??/.*"), *tok_root.glob(".*")]
        for path in candidates:
            if not _is_temp_name(path.name):
                continue
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime > cutoff:
                    continue
                size = _tree_size(path)
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink()
                temps += 1
                freed += size
        return GcReport(removed["blocks"], temps, freed, removed["deltas"], removed["tokenizers"])


def _tokenizer_files(folder: Path) -> dict[str, bytes]:
    if not any((folder / name).is_file() for name in TOKENIZER_FILES[:2]):
        raise MissingFileError(f"{folder}: no tokenizer (expected one of {', '.join(TOKENIZER_FILES[:2])})")
    files = {name: (folder / name).read_bytes() for name in TOKENIZER_FILES if (folder / name).is_file()}
    for path in sorted((folder / _EXTRA_TEMPLATES).glob("*.jinja")):
        files[f"{_EXTRA_TEMPLATES}/{path.name}"] = path.read_bytes()
    # AutoTokenizer falls back on config.json's model_type to pick a tokenizer class; keep only that,
    # so fine-tunes of one family still share the tokenizer.
    config = folder / "config.json"
    if config.is_file():
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (json.JSONDecodeError, AttributeError) as exc:
            raise CorruptCheckpointError(f"{config}: not a valid JSON object") from exc
        if isinstance(model_type, str):
            files["config.json"] = json.dumps({"model_type": model_type}).encode()
    return files


def _temp_name(content_id: str) -> str:
    return f".{content_id}.{uuid.uuid4().hex}.tmp"


def _is_temp_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def _readable(path: Path) -> bool:
    try:
        SafetensorsFile(path)
    except CorruptCheckpointError:
        return False
    return True


def _make_dir(folder: Path) -> None:
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        _fsync_dir(folder.parent)


def _fsync_dir(folder: Path) -> None:
    # A rename is durable only once the folder holding the new name is flushed.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _tree_size(path: Path) -> int:
    if path.is_file():
        return _file_size(path)
    return sum(_file_size(p) for p in path.rglob("*") if p.is_file())

"""Writing one model: its new content files first, then its catalog rows in one transaction.

Files are written atomically and deduplicated by the block store; the catalog row comes last, so
the catalog never names a missing file. If anything fails, the files this call created are removed
again (unless another writer's committed model names them meanwhile); a crash leaves at most
unreferenced files, which `Zoo.gc` removes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from zoo.block_store import BlockStore
from zoo.blocks import BlockData, DeltaData
from zoo.catalog.models import Block, Delta, Model
from zoo.chain_loader import ChainEntry
from zoo.errors import DuplicateNameError
from zoo.reports import RegistrationReport

Namespace = Literal["blocks", "deltas"]
Progress = Callable[[str, float], None]


def write_model(
    sessions: sessionmaker[Session],
    store: BlockStore,
    report: RegistrationReport,
    blocks: list[BlockData],
    deltas: list[DeltaData],
    tokenizer_folder: Path | None,
    record: Callable[[Session, str], Model],
    progress: Progress | None,
    entries: list[ChainEntry] | None = None,
) -> None:
    """Store `blocks`, `deltas` and the tokenizer, then run `record` in a transaction; fill `report`."""
    created: list[tuple[str, Namespace]] = []
    try:
        tokenizer_id = store.put_tokenizer(tokenizer_folder) if tokenizer_folder is not None else ""
        items: list[BlockData | DeltaData] = [*blocks, *deltas]
        for i, item in enumerate(items):
            result = store.put(item)
            if result.created:
                created.append((result.block_id, "blocks" if isinstance(item, BlockData) else "deltas"))
                report.bytes_new += item.tensor_bytes()
                if isinstance(item, BlockData):
                    report.blocks_new += 1
                else:
                    report.deltas_new += 1
            if progress is not None:
                progress("writing blocks", (i + 1) / max(len(items), 1))
        with sessions() as session, session.begin():
            model = record(session, tokenizer_id)
            report.naive_bytes = model.naive_bytes
            model.stored_bytes_new = report.bytes_new
        chain = entries if entries is not None else [ChainEntry(b.block_id) for b in blocks]
        new_ids = {bid for bid, _ in created}
        report.blocks_total = len(chain)
        report.blocks_shared = sum(1 for e in chain if e.block_id not in new_ids)
        report.bytes_shared = report.naive_bytes - report.bytes_new
    except IntegrityError as exc:
        _discard(sessions, store, created)
        raise DuplicateNameError(f"a model named {report.model!r} was registered concurrently") from exc
    except BaseException:
        _discard(sessions, store, created)
        raise


def _discard(
    sessions: sessionmaker[Session], store: BlockStore, created: list[tuple[str, Namespace]]
) -> None:
    """Remove files this registration created, unless the catalog names them (another writer)."""
    with sessions() as session:
        for content_id, namespace in created:
            table = Block if namespace == "blocks" else Delta
            if session.get(table, content_id) is None:
                store.delete(content_id, namespace=namespace)

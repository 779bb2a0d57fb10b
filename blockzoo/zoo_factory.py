"""Open the zoo (catalog + block store) that the settings describe."""

from __future__ import annotations

from blockzoo.settings import Settings
from zoo.block_store import BlockStore
from zoo.catalog.database import open_catalog
from zoo.registry import Zoo


def open_zoo(settings: Settings) -> Zoo:
    """The embedded SQLite catalog is created and migrated on open; other databases must be at head."""
    data_dir = settings.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    sessions = open_catalog(settings.resolved_database_url(), auto_migrate=True)
    return Zoo(sessions, BlockStore(data_dir / "store"))

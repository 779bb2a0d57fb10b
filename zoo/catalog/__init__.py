"""The zoo's catalog: SQL tables (SQLAlchemy 2.0), their Alembic migrations, tenants and API keys."""

from zoo.catalog.database import CatalogSchemaError, make_engine, open_catalog, session_factory
from zoo.catalog.migrate import current_revision, downgrade, head_revision, upgrade

__all__ = [
    "CatalogSchemaError",
    "current_revision",
    "downgrade",
    "head_revision",
    "make_engine",
    "open_catalog",
    "session_factory",
    "upgrade",
]

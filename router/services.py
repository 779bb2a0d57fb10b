"""The objects every route needs, created once by the app factory and found through `app.state`."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from blockzoo.settings import Settings
from router.catalog_cache import CatalogCache
from router.catalog_fallback import LastKnown
from router.principal import Principal
from zoo.catalog.change_events import on_catalog_change
from zoo.registry import ModelRef, Zoo


@dataclass
class Services:
    """Settings, the zoo, and the admin key's digest. Subsystems (inference, quotas, metrics, jobs) hang off
    `app.state` under their own names so each stays independent of the others."""

    settings: Settings
    zoo: Zoo
    admin_key_sha256: bytes
    # Built from the settings, and emptied by every catalog change this process commits.
    catalog_cache: CatalogCache[Principal, ModelRef] = field(init=False)
    # The last answers of those lookups, served only while the catalog database is unreachable.
    last_principals: LastKnown[Principal] = field(init=False)
    last_models: LastKnown[ModelRef] = field(init=False)

    def __post_init__(self) -> None:
        self.catalog_cache = CatalogCache(self.settings.catalog_cache_ttl_s)
        on_catalog_change(self.zoo.sessions, self.catalog_cache.invalidate)
        self.last_principals = LastKnown("API key")
        self.last_models = LastKnown("model")
        on_catalog_change(self.zoo.sessions, self.last_principals.clear)
        on_catalog_change(self.zoo.sessions, self.last_models.clear)


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services

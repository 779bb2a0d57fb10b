"""The objects every route needs, created once by the app factory and found through `app.state`."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from blockzoo.settings import Settings
from zoo.registry import Zoo


@dataclass
class Services:
    """Settings, the zoo, and the admin key's digest. Subsystems (inference, quotas, metrics, jobs) hang off
    `app.state` under their own names so each stays independent of the others."""

    settings: Settings
    zoo: Zoo
    admin_key_sha256: bytes


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services

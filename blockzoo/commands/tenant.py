"""`blockzoo tenant create|list|delete|add-key|keys|revoke-key`: tenants and their API keys.

The catalog comes from the settings (or `--url`); an embedded SQLite catalog is migrated on open.
With `--json`, stdout carries exactly one JSON document and nothing else.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from blockzoo.commands.db import add_url_argument, catalog_url
from zoo.catalog import tenants
from zoo.catalog.database import CatalogSchemaError, factory_engine, open_catalog
from zoo.catalog.models import ApiKey, Tenant

_QUOTA_FLAGS = {
    "requests_per_minute": "requests per minute",
    "tokens_per_minute": "prompt plus completion tokens per minute",
    "max_concurrent": "requests in flight at once",
    "max_models": "registered models",
    "max_storage_bytes": "bytes of newly stored blocks",
}


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("tenant", help="Create, list and delete tenants and keys.")
    actions = p.add_subparsers(dest="tenant_command", required=True)

    create = actions.add_parser("create", help="Create a tenant and print its first API key.")
    create.add_argument("name")
    create.add_argument("--key-name", default="default", help="label of the first key")
    for field, what in _QUOTA_FLAGS.items():
        create.add_argument(f"--{field.replace('_', '-')}", type=int, default=None, help=f"most {what}")

    listing = actions.add_parser("list", help="List tenants.")
    delete = actions.add_parser("delete", help="Delete a tenant that owns no models, with its keys.")
    delete.add_argument("name")
    add_key = actions.add_parser("add-key", help="Create another API key for a tenant.")
    add_key.add_argument("name")
    add_key.add_argument("--key-name", default=None)
    key_list = actions.add_parser("keys", help="List a tenant's active keys (prefixes only).")
    key_list.add_argument("name")
    revoke = actions.add_parser("revoke-key", help="Revoke a tenant's key by its prefix.")
    revoke.add_argument("name")
    revoke.add_argument("prefix")

    for action in (create, listing, delete, add_key, key_list, revoke):
        action.add_argument("--json", action="store_true", help="print one JSON document")
        add_url_argument(action)
    p.set_defaults(handler=run)


def _tenant_row(session: Session, tenant: Tenant) -> dict[str, Any]:
    quotas = tenants.TenantQuotas.of(tenant)
    return {
        "tenant": tenant.name,
        "created_at": tenant.created_at.isoformat(),
        "disabled": tenant.disabled,
        "active_keys": len(tenants.list_keys(session, tenant.name)),
        "quotas": {field: getattr(quotas, field) for field in _QUOTA_FLAGS},
    }


def _key_row(key: ApiKey) -> dict[str, Any]:
    return {
        "prefix": key.key_prefix,
        "name": key.name,
        "created_at": key.created_at.isoformat(),
        "last_used_at": key.last_used_at.isoformat() if key.last_used_at else None,
    }


def _create(session: Session, args: argparse.Namespace) -> tuple[Any, str]:
    quotas = tenants.TenantQuotas(**{field: getattr(args, field, None) for field in _QUOTA_FLAGS})
    tenant, key = tenants.create_tenant(session, args.name, quotas, key_name=args.key_name, actor="cli")
    text = f"created tenant {tenant.name}\napi key (shown only now): {key}"
    return {"tenant": tenant.name, "api_key": key}, text


def _list(session: Session, args: argparse.Namespace) -> tuple[Any, str]:
    rows = [_tenant_row(session, t) for t in tenants.list_tenants(session)]
    lines = [
        f"{r['tenant']}\t{'disabled' if r['disabled'] else 'enabled'}\tkeys={r['active_keys']}" for r in rows
    ]
    return rows, "\n".join(lines) if lines else "no tenants"


def _delete(session: Session, args: argparse.Namespace) -> tuple[Any, str]:
    tenants.delete_tenant(session, args.name, actor="cli")
    return {"deleted": args.name}, f"deleted tenant {args.name}"


def _add_key(session: Session, args: argparse.Namespace) -> tuple[Any, str]:
    _row, key = tenants.create_key(session, args.name, args.key_name, actor="cli")
    return {"tenant": args.name, "api_key": key}, f"api key for {args.name} (shown only now): {key}"


def _keys(session: Session, args: argparse.Namespace) -> tuple[Any, str]:
    rows = [_key_row(k) for k in tenants.list_keys(session, args.name)]
    return rows, "\n".join(f"{r['prefix']}...\t{r['name'] or ''}" for r in rows) or "no active keys"


def _revoke(session: Session, args: argparse.Namespace) -> tuple[Any, str]:
    rows = tenants.revoke_key(session, args.name, args.prefix, actor="cli")
    return {"tenant": args.name, "revoked": len(rows)}, f"revoked {len(rows)} key(s) of {args.name}"


_ACTIONS: dict[str, Callable[[Session, argparse.Namespace], tuple[Any, str]]] = {
    "create": _create,
    "list": _list,
    "delete": _delete,
    "add-key": _add_key,
    "keys": _keys,
    "revoke-key": _revoke,
}


def run(args: argparse.Namespace) -> int:
    action = _ACTIONS.get(args.tenant_command)
    if action is None:
        print(f"error: unknown tenant command {args.tenant_command!r}", file=sys.stderr)
        return 2
    try:
        factory = open_catalog(catalog_url(args), auto_migrate=True)
    except (CatalogSchemaError, SQLAlchemyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        with factory() as session:
            document, text = action(session, args)
            session.commit()
    except (tenants.TenantError, SQLAlchemyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        factory_engine(factory).dispose()
    print(json.dumps(document) if getattr(args, "json", False) else text)
    return 0

"""`blockzoo db upgrade|downgrade|current`: manage the catalog's schema revision."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from alembic.util import CommandError
from sqlalchemy import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from blockzoo.settings import Settings
from zoo.catalog import migrate


def add_url_argument(parser: argparse.ArgumentParser) -> None:
    """The `--url` option shared by the catalog commands."""
    parser.add_argument(
        "--url",
        default=None,
        help="SQLAlchemy URL of the catalog (default: BLOCKZOO_DATABASE_URL, or SQLite under BLOCKZOO_DATA_DIR)",
    )


def catalog_url(args: argparse.Namespace) -> str:
    """The URL from `--url`, else from the settings."""
    url: str | None = getattr(args, "url", None)
    return url or Settings().resolved_database_url()


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("db", help="Manage the catalog database schema.")
    actions = p.add_subparsers(dest="db_command", required=True)
    up = actions.add_parser("upgrade", help="Apply migrations up to REVISION (default: head).")
    up.add_argument("revision", nargs="?", default="head")
    add_url_argument(up)
    down = actions.add_parser("downgrade", help="Revert migrations down to REVISION ('base': drop all).")
    down.add_argument("revision")
    add_url_argument(down)
    current = actions.add_parser("current", help="Print the catalog's revision ('none' if never migrated).")
    add_url_argument(current)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    url = catalog_url(args)
    try:
        shown = make_url(url).render_as_string(hide_password=True)
        if args.db_command == "upgrade":
            migrate.upgrade(url, args.revision)
            print(f"catalog {shown} at revision {migrate.current_revision(url) or 'none'}")
        elif args.db_command == "downgrade":
            migrate.downgrade(url, args.revision)
            print(f"catalog {shown} at revision {migrate.current_revision(url) or 'none'}")
        elif args.db_command == "current":
            print(migrate.current_revision(url) or "none")
        else:
            raise ValueError(f"unknown db command {args.db_command!r}")
    except (CommandError, SQLAlchemyError, ArgumentError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0

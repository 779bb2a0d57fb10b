"""The `blockzoo` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from blockzoo.commands import db, demo, generate, serve, tenant, zoo
from blockzoo.logging_setup import configure_logging
from blockzoo.settings import Settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blockzoo", description="BlockZoo: serve many fine-tunes from one zoo."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    generate.register(sub)
    demo.register(sub)
    db.register(sub)
    tenant.register(sub)
    zoo.register(sub)
    serve.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = Settings()
    configure_logging(settings.log_level, settings.log_json)
    result: int = args.handler(args)
    return result


if __name__ == "__main__":
    sys.exit(main())

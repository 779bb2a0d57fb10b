"""Subcommands of the `blockzoo` CLI, one module each."""

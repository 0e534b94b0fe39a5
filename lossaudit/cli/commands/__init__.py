"""Subcommands of ``python -m lossaudit``, one module each (see ``lossaudit.cli.app``)."""

COMMANDS = ("check", "compare", "explain", "sweep", "upgrade", "history")

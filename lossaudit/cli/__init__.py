"""The command line: argument parsing and exit statuses (app.py), one module per command
(commands/).

``main`` is re-exported here: every installed `lossaudit` console script imports
``lossaudit.cli:main``."""

from .app import main

__all__ = ["main"]

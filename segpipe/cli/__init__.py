"""Command-line interface: argument parsing and dispatch only.

Every command is a thin wrapper over a function of :mod:`segpipe.api`. Positional arguments
that contain ``=`` are Hydra overrides (``key=value``); ``--json`` prints a machine-readable
result on stdout, while logs and progress go to stderr. Errors print one or two lines and
exit with the code of their :class:`~segpipe.errors.SegpipeError` (README, "Exit codes");
``--debug`` shows the traceback.

``parser`` holds the grammar (commands, usage, settings given), ``commands`` one handler per
command, ``text`` the plain-text tables, and ``main`` the entry point with its error handling.
"""

from __future__ import annotations

from .main import main

__all__ = ["main"]

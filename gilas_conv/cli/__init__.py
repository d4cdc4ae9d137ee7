"""The ``gilas-conv`` command line: chat, resume, inspect and move stored conversations.

Thin by design: each command parses its options, calls the library (ConversationStore,
Sender, build_context, ...) and prints. The package is laid out by concern:

* :mod:`._app`: the command group ``main``, its settings (global options accepted before
  and after the command) and the error funnel (one line per error; ``--debug`` for the
  traceback);
* :mod:`._turns`: ``send`` and ``retry``, and how a streamed reply is printed and stopped
  (Ctrl-C, SIGTERM and SIGHUP store what arrived);
* :mod:`._manage`: ``list``, ``show``, ``export``, ``import``, ``fork``, ``rm``, ``pin``,
  ``rename``, ``tokens``, ``db upgrade``;
* :mod:`._quota`: ``usage``, ``quota set/show/rm``, ``prune`` (``rm --owner X --all`` is
  in :mod:`._manage`); a call refused by a quota exits with status 3 (``EXIT_QUOTA``);
* :mod:`._search`: ``search``;
* :mod:`._chat`: the interactive ``chat`` REPL;
* ``serve`` and ``keys``: the gateway's commands, in :mod:`gilas_conv.server._cli`;
* :mod:`._render`: what is printed: rich on a terminal (control characters made visible),
  the exact stored text when piped.

The dialect, the same in every command: ``-c/--continue`` is the most recent conversation,
``--cid/--conversation ID`` names one, ``-m`` sets the conversation's model from now on,
``--owner NAME`` scopes every lookup, ``-o KEY VALUE`` adds an API parameter.
"""

from __future__ import annotations

# The gateway's commands live with the gateway; they import its ASGI stack only when run.
from ..server._cli import keys as _keys_command
from ..server._cli import serve as _serve_command
from . import _chat, _manage, _quota, _turns  # noqa: F401  (they register their commands on main)
from ._app import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_QUOTA,
    EXIT_USAGE,
    TITLE_LENGTH,
    error_message,
    fold_line,
    main,
)
from ._chat import read_message
from ._manage import parse_import, token_report
from ._search import search

main.add_command(search)

main.add_command(_serve_command)
main.add_command(_keys_command)

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_QUOTA",
    "EXIT_USAGE",
    "TITLE_LENGTH",
    "error_message",
    "fold_line",
    "main",
    "parse_import",
    "read_message",
    "token_report",
]

"""How every entry script and tool ends: a user's mistake is one line on stderr, not a traceback.

A config key with a value that cannot work (:class:`config.ConfigError`), a manifest that cannot
be read (:class:`data.manifest.ManifestError`) and a bad input file (:class:`data.io.BadInputError`)
carry messages that name the key, row or file and the reason: :func:`run_cli` prints that message
alone, as ``<program>: error: <message>``, and returns exit status 2 (argparse's status for a bad
command line). Any other exception is a bug and keeps its traceback.

Set ``HEADCT_DEBUG=1`` in the environment to get the full traceback of a user error too::

    HEADCT_DEBUG=1 python main_pretrain_mae.py --cfg ... --opts ...

Each script's ``main(argv)`` raises (tests call it directly); its ``cli()``, the console script and
``if __name__ == "__main__": sys.exit(cli())``, goes through :func:`run_cli`.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable, Optional, Sequence

from config import ConfigError
from data.io import BadInputError
from data.manifest import ManifestError

DEBUG_ENV = "HEADCT_DEBUG"
USER_ERRORS = (ConfigError, ManifestError, BadInputError)
USER_ERROR_STATUS = 2


def debug_enabled() -> bool:
    """True when ``HEADCT_DEBUG`` is set to anything but empty, ``0``, ``false`` or ``no``."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def run_cli(main: Callable[[Optional[Sequence[str]]], Any], argv: Optional[Sequence[str]] = None,
            prog: str = "") -> int:
    """Call ``main(argv)`` and return the exit status for ``sys.exit``.

    Args:
        main: the script's ``main(argv)``.
        argv: its arguments (None: the command line).
        prog: the name in the error line (default: the program's file name, ``sys.argv[0]``).

    Returns:
        ``main``'s return value when it is an int (a tool's own status), else 0; 2 after a user
        error, whose message goes to stderr (re-raised instead under ``HEADCT_DEBUG=1``).
    """
    try:
        result = main(argv)
    except USER_ERRORS as e:
        if debug_enabled():
            raise
        name = prog or os.path.basename(sys.argv[0]) or "headct"
        print(f"{name}: error: {e}", file=sys.stderr, flush=True)
        return USER_ERROR_STATUS
    return result if isinstance(result, int) and not isinstance(result, bool) else 0

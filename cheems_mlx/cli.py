"""The scaffolding every command line (``python -m cheems_mlx.<tool>``) shares.

``run_cli(body, expected)`` runs a tool: its ``expected`` errors, a ``DistributedError``
and -- under ``mlx.launch`` -- a collective that failed because another rank stopped become
one ``error: ...`` line on stderr and exit status 1 (argparse's usage errors exit 2).
``add_dist_timeout(parser)`` adds the ``--dist-timeout`` flag of the tools that run as
several ranks (the watchdog itself is ``cheems_mlx.distributed``).
"""

import sys

from .distributed import DistributedError, comm_error_message, launched

DIST_TIMEOUT_HELP = ("under mlx.launch: stop with an error when the other ranks make no progress for "
                     "this many seconds (default $CHEEMS_DIST_TIMEOUT or 120; 0 waits forever)")


def add_dist_timeout(parser):
    """``--dist-timeout SECONDS`` (default None: $CHEEMS_DIST_TIMEOUT, else 120)."""
    parser.add_argument("--dist-timeout", type=float, default=None, help=DIST_TIMEOUT_HELP)


def run_cli(body, expected: tuple) -> int:
    """Run a CLI's ``body()``: its ``expected`` errors and a DistributedError become one
    ``error:`` line and exit 1, and so does a collective that failed because another rank
    stopped (only when launched; otherwise a RuntimeError is a bug and propagates)."""
    try:
        code = body()
        return 0 if code is None else code
    except expected + (DistributedError,) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if not launched():
            raise
        print(f"error: {comm_error_message(e)}", file=sys.stderr)
        return 1

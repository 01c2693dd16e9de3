"""How the command line words a failure: one line on stderr, and an exit status.

``xfer <command>: <message>``, the message on one line whatever it held, and the status
says what kind of failure it was: :data:`EXIT_BAD_INPUT` (2) for input to fix (a name, a
value, a path, a missing framework), :data:`EXIT_FAILED` (1) for a run that failed,
:data:`EXIT_INTERRUPTED` (130, as a shell reports Ctrl-C). Which exceptions are which is
decided in :func:`xfer.cli.main`.
"""

from __future__ import annotations

import sys

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130


def one_line(error: BaseException | str) -> str:
    """``error``'s message with every run of whitespace (newlines too) as one space.

    Example:
        >>> one_line(ValueError("bad\\n  value"))
        'bad value'
    """
    return " ".join(str(error).split())


def fail(command: str, message: str, status: int = EXIT_FAILED) -> int:
    """Print ``xfer <command>: <message>`` on stderr and return ``status``, for a command
    to return as its exit status.

    Example:
        >>> import contextlib, io
        >>> with contextlib.redirect_stderr(io.StringIO()) as err:
        ...     status = fail("run", "no such file", EXIT_BAD_INPUT)
        >>> status, err.getvalue()
        (2, 'xfer run: no such file\\n')
    """
    print(f"xfer {command}: {message}", file=sys.stderr)
    return status

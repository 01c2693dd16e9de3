"""The one way xfer runs Python in another process: Keras's other engine, the CLI itself.

Keras reads ``KERAS_BACKEND`` once per process, so whatever runs Keras on its other engine
(``xfer compare``, ``xfer semantics``) runs in a fresh interpreter. Every such child:

- starts in a temporary directory: ``python -c`` and ``python -m`` put the working
  directory first on ``sys.path``, and a source checkout there would shadow the installed
  xfer (whose ``xfer.backends`` lives elsewhere in a checkout);
- answers with one JSON line on stdout, marked with :data:`MARKER` so that whatever else
  the frameworks print cannot be mistaken for it;
- fails as one :class:`ChildFailed` that carries the end of its stderr.

Nothing here imports a framework.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

MARKER = "XFER-RESULT "


class ChildFailed(RuntimeError):
    """A child process exited non-zero, timed out, or printed no result."""


def answer(result: Any) -> None:
    """Print ``result`` as the child's answer (call it once, last, in the child).

    Example:
        >>> from xfer.subprocesses import answer
        >>> answer({"loss": 1.5})
        XFER-RESULT {"loss": 1.5}
    """
    print(MARKER + json.dumps(result), flush=True)


def run_python(
    code: str,
    args: Sequence[str] = (),
    *,
    env: Mapping[str, str] | None = None,
    timeout: float | None = 1800,
    what: str = "the subprocess",
) -> Any:
    """Run ``code`` (which calls :func:`answer`) with ``args`` in a fresh interpreter and
    return its answer. ``env`` is added to this process's environment.

    Raises:
        ChildFailed: it exited non-zero, timed out or gave no answer; the message names
            ``what`` and ends with the last lines of its stderr.

    Example:
        >>> from xfer.subprocesses import run_python
        >>> run_python("import sys; from xfer.subprocesses import answer; answer(sys.argv[1:])",
        ...            ["a", "b"])
        ['a', 'b']
    """
    with tempfile.TemporaryDirectory(prefix="xfer-child-") as directory:
        try:
            done = subprocess.run(
                [sys.executable, "-c", code, *args],
                env={**os.environ, **(env or {})},
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=directory,
                check=False,
            )
        except subprocess.TimeoutExpired as error:
            raise ChildFailed(f"{what} did not finish within {timeout:.0f} s") from error
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(MARKER) and done.returncode == 0:
            return json.loads(line[len(MARKER) :])
    tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:]) or "no output"
    raise ChildFailed(f"{what} failed (exit {done.returncode}): {tail[-800:]}")

"""Ctrl-C as a request to stop at the next step boundary, not an exception mid-step.

Python raises ``KeyboardInterrupt`` wherever the main thread happens to be when SIGINT
arrives. On the JAX engines that is often inside a jitted dispatch, and unwinding from
there (then tearing JAX down) crashes the process with a segmentation fault about one
time in three (measured on jax 0.10 with a plain NNX loop too, no xfer code in it). So,
while the pipeline trains, the first SIGINT only sets a flag; the stage loop looks at it
between steps and stops there, cleanly, with everything finished saved (on the JAX
engines, a head stage on cached features, between its compiled chunks of steps). A second Ctrl-C
raises at once, as usual, for a user who does not want to wait for the step.

Under a launcher (``StopRequest(terminate=True)``), SIGTERM is such a request too: torchrun
sends it to the other processes when one fails, and the run then stops at a step boundary
with what it saved, instead of vanishing without a word.

Nothing changes where xfer cannot own a signal: outside the main thread, or when the
program installed its own handler.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType


class StopRequest:
    """Within ``with StopRequest() as stop:``, SIGINT sets ``stop.requested``;
    :meth:`check` raises ``KeyboardInterrupt`` at a point of the caller's choosing.

    Example:
        >>> from xfer.pipeline.interrupt import StopRequest
        >>> with StopRequest() as stop:
        ...     for step in range(3):
        ...         stop.check()          # raises KeyboardInterrupt after a Ctrl-C
    """

    def __init__(self, *, terminate: bool = False) -> None:
        self.requested = False
        self._signals = (signal.SIGINT, signal.SIGTERM) if terminate else (signal.SIGINT,)
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:  # the second Ctrl-C: the user does not want to wait
            raise KeyboardInterrupt
        self.requested = True

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` if a stop was requested."""
        if self.requested:
            raise KeyboardInterrupt("stopped at a step boundary after Ctrl-C (or SIGTERM)")

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is not threading.main_thread():
            return self
        defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
        for number in self._signals:
            if signal.getsignal(number) == defaults[number]:  # int 0 for SIG_DFL, at times
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous = {}

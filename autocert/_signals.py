"""Stop signals from the first instruction on.

``serve`` stops gracefully on SIGTERM or SIGINT at any moment of its life. Its event loop
handles them once it runs; before that (imports, binding, reading options) a signal is only
recorded here and honoured as soon as the loop can, instead of killing the process halfway
or raising ``KeyboardInterrupt`` in the middle of whatever it was doing.
"""

from __future__ import annotations

import signal

#: The signals that stop ``serve`` gracefully.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_requested = False


def _record(_signum: int, _frame: object) -> None:
    global _requested
    _requested = True


def expect_stop_signals() -> None:
    """Record stop signals from now on instead of acting on them."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _record)


def release_stop_signals() -> bool:
    """Back to the usual: a signal stops the process at once. Returns whether one came while
    they were only recorded (the caller then stops)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return _requested


def stop_requested() -> bool:
    """Whether a stop signal was recorded."""
    return _requested

"""SIGTERM and SIGINT always end a tunebal process.

The first SIGTERM is treated like Ctrl+C (the SIGINT handler in place runs: inside
``Tuner.fit`` that is Tune's graceful stop, which saves the experiment for ``--resume``;
elsewhere a ``KeyboardInterrupt``), and a watchdog ends the process
``GRACE_S`` seconds later if it is still alive. A second SIGTERM or SIGINT ends it at once.
``ray.init`` replaces the SIGTERM handler with its own, so the search installs this one
again after connecting.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

GRACE_S = 30.0
EXIT_CODE = 143  # 128 + SIGTERM
_state = {"signalled": False}


def _hard_exit(code: int) -> None:
    try:
        sys.stderr.write("tunebal: terminated\n")
        sys.stderr.flush()
    finally:
        os._exit(code)


def _arm_watchdog() -> None:
    timer = threading.Timer(GRACE_S, _hard_exit, args=(EXIT_CODE,))
    timer.daemon = True
    timer.start()


def _on_signal(signum: int, frame) -> None:
    if _state["signalled"]:
        _hard_exit(128 + signum)
    _state["signalled"] = True
    _arm_watchdog()
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler) and handler is not _on_signal_int:
        handler(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt


def _on_signal_int(signum: int, frame) -> None:
    if _state["signalled"]:
        _hard_exit(128 + signum)
    _state["signalled"] = True
    _arm_watchdog()
    raise KeyboardInterrupt


def interrupted() -> bool:
    """Whether a SIGTERM/SIGINT reached one of these handlers in this process."""
    return _state["signalled"]


def install() -> None:
    """Install the SIGTERM handler (and the SIGINT one when SIGINT still has Python's default)."""
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, _on_signal)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_signal_int)

"""Crash points for the outbox's crash tests (test-only; costs nothing when unset).

``MQKIT_TEST_CRASH_AT=relay.confirmed:2`` makes the process SIGKILL itself the 2nd time the
relay reaches ``relay.confirmed`` (``:N`` may be left out: the first time). The points, in
the order a message passes them:

=====================  =======================================================================
``relay.claimed``      rows claimed in the relay's transaction, nothing published
``relay.publishing``   killed a moment after the publish started (the confirm may or may not
                       have come back)
``relay.confirmed``    every publish of the pass confirmed, nothing marked sent
``relay.marked``       rows marked sent, the relay's transaction not committed
``inbox.recorded``     the message id recorded in the handler's transaction, handler not run
``inbox.handled``      the handler returned, its transaction not committed
``inbox.committed``    the transaction committed, the message not acked
=====================  =======================================================================

The environment is read once, when this module is first imported.
"""

from __future__ import annotations

import os
import signal
import threading

__all__ = ["ENV", "arm", "reached"]

ENV = "MQKIT_TEST_CRASH_AT"
_DELAY = 0.002  # seconds between starting a publish and the kill, for relay.publishing


def _parse(spec: str) -> tuple[str, int] | None:
    spec = spec.strip()
    if not spec:
        return None
    point, _, count = spec.partition(":")
    return point, int(count) if count else 1


_crash = _parse(os.environ.get(ENV, ""))
_seen = 0
_lock = threading.Lock()


def _due(point: str) -> bool:
    global _seen
    if _crash is None or _crash[0] != point:
        return False
    with _lock:
        _seen += 1
        return _seen == _crash[1]


def _kill() -> None:
    os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def reached(point: str) -> None:
    """Die here if this is the point (and the time) ``MQKIT_TEST_CRASH_AT`` names."""
    if _due(point):
        _kill()


def arm(point: str) -> None:
    """Die a moment from now, on another thread, if this is the point: for a kill while
    something (a publish) is in flight."""
    if _due(point):
        timer = threading.Timer(_DELAY, _kill)
        timer.daemon = True
        timer.start()

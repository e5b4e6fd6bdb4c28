"""The IO thread: a pika ``IOLoop`` on a daemon thread of its own, and handing work to it.

pika is not thread-safe, so each client keeps every pika object on one thread. Other
threads never touch them: they :meth:`IOThread.submit` a function (pika's
``add_callback_threadsafe``, the one thread-safe entry point) and wait on a
``concurrent.futures.Future`` that the function, or a pika callback it registered, settles
with :func:`settle`. A function that raises is logged, never allowed to kill the thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from pika.adapters.select_connection import IOLoop

from mqkit.errors import ConnectionFailed

__all__ = ["IOThread", "settle"]

log = logging.getLogger("mqkit.connection")


def settle(future: Future[Any], result: Any = None, exc: BaseException | None = None) -> None:
    """Resolve ``future`` unless it already is (IO-thread callbacks may race with close)."""
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


class IOThread:
    """One ``IOLoop`` running on a daemon thread until :meth:`stop`."""

    def __init__(self, name: str = "mqkit-io") -> None:
        self.loop = IOLoop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._stopped = False

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def submit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the IO thread soon; its exceptions are logged there."""
        if self._stopped:
            raise ConnectionFailed("the mqkit client is closed; open a new one")
        self.loop.add_callback_threadsafe(lambda: _guarded(fn))

    def stop(self, timeout: float) -> None:
        """Stop the loop (after the callbacks already submitted) and wait for the thread."""
        if self._stopped:
            return
        self._stopped = True
        self.loop.add_callback_threadsafe(self.loop.stop)
        if self._thread is not threading.current_thread() and self._thread.is_alive():
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()

    def _run(self) -> None:
        while True:
            try:
                self.loop.start()
                return
            except Exception:  # a bug in a callback must not kill the connection's thread
                log.exception("error in the IO thread (continuing)")
                if self._stopped:
                    return


def _guarded(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception:
        log.exception("error in an IO-thread callback")

"""The behaviour suite's runtime fixture: one test body, both runtimes.

``rt`` is parametrised over ``sync`` and ``async``. ``rt.client(**overrides)`` yields a client
with the blocking API: for ``async`` it is an :class:`mqkit.AsyncClient` driven through
:class:`Blocking`, which runs every coroutine on a background event loop and turns the test's
plain handler functions into ``async def`` ones. So a test written once against the blocking
API exercises ``AsyncClient`` for real, the way Watermill's universal pub/sub suite runs
against every implementation.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

import mqkit
from mqkit.testing.pytest_plugin import Recorder

# A memory pass (MQKIT_TEST_URL=memory://NAME, see tests/conftest.py): clients get that URL.
_TEST_URL = os.environ.get("MQKIT_TEST_URL", "").strip()
MEMORY_URL = _TEST_URL if _TEST_URL.lower().startswith("memory://") else None


class Loop:
    """An asyncio event loop on a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, awaitable: Any, timeout: float = 60.0) -> Any:
        async def _wrap() -> Any:
            return await awaitable

        return asyncio.run_coroutine_threadsafe(_wrap(), self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()  # an unclosed loop is a ResourceWarning, an error under -W error


def _asyncify(value: Any) -> Any:
    """Turn a plain function into ``async def``; leave classes and coroutines alone."""
    if (
        not callable(value)
        or inspect.isclass(value)
        or inspect.iscoroutinefunction(value)
        or inspect.iscoroutinefunction(getattr(value, "__call__", None))  # noqa: B004
        or type(value).__module__.startswith("mqkit")
    ):
        return value

    async def handler(*args: Any, **kwargs: Any) -> Any:
        return value(*args, **kwargs)

    return handler


class Blocking:
    """The blocking face of an async mqkit object."""

    def __init__(self, target: Any, loop: Loop) -> None:
        self._target = target
        self._loop = loop

    @property
    def target(self) -> Any:
        return self._target

    def _wrap(self, value: Any) -> Any:
        if inspect.isawaitable(value):
            value = self._loop.run(value)
        if type(value).__module__.startswith("mqkit._async") or (
            callable(value) and not inspect.isclass(value) and inspect.isfunction(value)
        ):
            return Blocking(value, self._loop)
        return value

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if callable(value):
            return Blocking(value, self._loop)
        return self._wrap(value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args = tuple(_asyncify(a) for a in args)
        kwargs = {k: _asyncify(v) for k, v in kwargs.items()}
        return self._wrap(self._target(*args, **kwargs))

    def __enter__(self) -> Blocking:
        self._loop.run(self._target.__aenter__())
        return self

    def __exit__(self, *exc: Any) -> None:
        self._loop.run(self._target.__aexit__(*exc))

    def __repr__(self) -> str:
        return f"Blocking({self._target!r})"


class Runtime:
    """What a behaviour test needs from a runtime."""

    def __init__(self, name: str, url: str, loop: Loop | None, broker_url: str = "") -> None:
        self.name = name
        self.url = url  # what clients are given (memory://NAME on a memory pass)
        self.broker_url = broker_url or url  # an AMQP URL, for raw pika
        self.loop = loop

    @property
    def is_async(self) -> bool:
        return self.loop is not None

    def make_client(self, **overrides: Any) -> Any:
        overrides.setdefault("url", self.url)
        overrides.setdefault("connect_timeout", 10)
        if self.loop is None:
            return mqkit.Client(**overrides)

        # AsyncClient must be built on its loop: aio-pika binds to the running loop.
        async def build() -> Any:
            return mqkit.AsyncClient(**overrides)

        return Blocking(self.loop.run(build()), self.loop)

    @contextmanager
    def client(self, **overrides: Any) -> Iterator[Any]:
        with self.make_client(**overrides) as client:
            yield client

    def __repr__(self) -> str:
        return self.name


@pytest.fixture(scope="session")
def _loop() -> Iterator[Loop]:
    loop = Loop()
    yield loop
    loop.close()


@pytest.fixture(params=["sync", "async"])
def rt(request: pytest.FixtureRequest, broker_url: str, _loop: Loop) -> Runtime:
    """The runtime under test: ``sync`` (Client, pika) or ``async`` (AsyncClient, aio-pika)."""
    url = MEMORY_URL or broker_url  # a memory pass: clients get memory://NAME
    return Runtime(request.param, url, _loop if request.param == "async" else None, broker_url)


class Collector(Recorder):
    """The plugin's :class:`~mqkit.testing.pytest_plugin.Recorder` (a thread-safe handler that
    records what it handled; ``wait`` blocks for more), with :meth:`settle`."""

    def settle(self, seconds: float = 0.5) -> int:
        """Wait ``seconds`` more and return the count (to check that nothing else arrives)."""
        time.sleep(seconds)
        return len(self.messages)


@pytest.fixture
def collector() -> Callable[..., Collector]:
    """``collector(behaviour=None)`` makes a recording handler usable on both runtimes."""
    return Collector


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll ``predicate`` until true; fail the test with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.02)

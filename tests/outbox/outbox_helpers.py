"""What the outbox tests share: an event loop thread, a database per test, and the two
runtimes behind one blocking API (:class:`Side`). The fixtures are in ``conftest.py``."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest
from pydantic import BaseModel
from sqlalchemy import Connection, Engine, create_engine, inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import Session

import mqkit
from mqkit.outbox import AsyncOutboxRelay, Inbox, Outbox, OutboxRelay


class Loop:
    """An asyncio event loop on a daemon thread; :meth:`run` runs a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, awaitable: Any, timeout: float = 60.0) -> Any:
        async def wrap() -> Any:
            return await awaitable

        return asyncio.run_coroutine_threadsafe(wrap(), self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()


class Database:
    """One database for one test: its URLs, engines made on demand, and a table prefix of
    the test's own; :meth:`close` disposes the engines and drops every table it named."""

    def __init__(self, kind: str, sync_url: str, async_url: str, loop: Loop) -> None:
        self.kind = kind
        self.sync_url = sync_url
        self.async_url = async_url
        self.prefix = f"t{uuid.uuid4().hex[:8]}_"
        self._loop = loop
        self._engines: list[Engine] = []
        self._async_engines: list[AsyncEngine] = []

    def __repr__(self) -> str:
        return self.kind

    def engine(self) -> Engine:
        """A new blocking engine (disposed at the end)."""
        args: dict[str, Any] = {"timeout": 30} if self.kind == "sqlite" else {}
        engine = create_engine(self.sync_url, connect_args=args)
        self._engines.append(engine)
        return engine

    def async_engine(self) -> AsyncEngine:
        """A new AsyncEngine, made on the test loop (disposed there at the end)."""
        args: dict[str, Any] = {"timeout": 30} if self.kind == "sqlite" else {}

        async def make() -> AsyncEngine:
            return create_async_engine(self.async_url, connect_args=args)

        engine: AsyncEngine = self._loop.run(make())
        self._async_engines.append(engine)
        return engine

    def table(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def sql(self, statement: str, **params: Any) -> list[Any]:
        """Run one statement on a short-lived connection; its rows (if any)."""
        engine = create_engine(self.sync_url)
        try:
            with engine.begin() as conn:
                result = conn.execute(text(statement), params)
                return list(result) if result.returns_rows else []
        finally:
            engine.dispose()

    def close(self) -> None:
        for engine in self._async_engines:
            self._loop.run(engine.dispose())
        for engine in self._engines:
            engine.dispose()
        engine = create_engine(self.sync_url)
        try:
            with engine.begin() as conn:
                for name in inspect(conn).get_table_names():
                    if name.startswith(self.prefix):
                        conn.execute(text(f'DROP TABLE IF EXISTS "{name}"'))
            with engine.connect() as conn:
                left = [n for n in inspect(conn).get_table_names() if n.startswith(self.prefix)]
        finally:
            engine.dispose()
        assert not left, f"tables left behind: {left}"


Effect = Callable[[Connection], object]


class Relay:
    """A relay of either runtime, driven blocking."""

    def __init__(self, relay: OutboxRelay | AsyncOutboxRelay, loop: Loop | None) -> None:
        self.relay = relay
        self._loop = loop

    def _do(self, result: Any) -> Any:
        return self._loop.run(result) if self._loop is not None else result

    def start(self) -> None:
        self._do(self.relay.start())

    def stop(self) -> None:
        self._do(self.relay.stop())

    def publish_pending(self) -> int:
        return int(self._do(self.relay.publish_pending()))

    @property
    def sent(self) -> int:
        return self.relay.sent

    def __enter__(self) -> Relay:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Side:
    """One runtime: its client, engine, outbox, inbox, relay and consumers, driven blocking.

    ``write`` runs a transaction of the test (``publish`` calls, plus ``effect(conn)`` on a
    blocking connection); ``consume`` starts a consumer whose handler calls ``fn(message,
    ctx)``, which may return an effect to run in the inbox's transaction.
    """

    def __init__(self, name: str, db: Database, broker_url: str, names: Any, loop: Loop) -> None:
        self.name = name
        self.db = db
        self.broker_url = broker_url
        self.names = names
        self.loop = loop if name == "async" else None
        self.events_exchange = names.exchange()
        self.client: Any = None
        self._engine: Engine | AsyncEngine | None = None

    def __repr__(self) -> str:
        return self.name

    @property
    def is_async(self) -> bool:
        return self.loop is not None

    def _do(self, result: Any) -> Any:
        return self.loop.run(result) if self.loop is not None else result

    @property
    def engine(self) -> Engine | AsyncEngine:
        if self._engine is None:
            self._engine = self.db.async_engine() if self.is_async else self.db.engine()
        return self._engine

    @contextmanager
    def connected(self, **overrides: Any) -> Iterator[Side]:
        """The client of this runtime, connected, until the block ends."""
        overrides.setdefault("url", self.broker_url)
        overrides.setdefault("service", self.names.service())
        overrides.setdefault("events_exchange", self.events_exchange)
        overrides.setdefault("connect_timeout", 10)
        if self.loop is None:
            with mqkit.Client(**overrides) as client:
                self.client = client
                yield self
            return

        async def make() -> mqkit.AsyncClient:
            client = mqkit.AsyncClient(**overrides)
            await client.connect()
            return client

        self.client = self.loop.run(make())
        try:
            yield self
        finally:
            self.loop.run(self.client.close())

    def outbox(self, **kw: Any) -> Outbox:
        kw.setdefault("table_prefix", self.db.prefix)
        return Outbox(self.engine, **kw)

    def inbox(self, **kw: Any) -> Inbox[Any]:
        kw.setdefault("table_prefix", self.db.prefix)
        return Inbox(self.engine, **kw)  # type: ignore[call-overload]

    def relay(self, outbox: Outbox) -> Relay:
        """The client's relay for ``outbox`` (``client.outbox_relay``), started by hand."""
        return Relay(self.client.outbox_relay(outbox), self.loop)

    def write(
        self,
        outbox: Outbox,
        items: Sequence[tuple[BaseModel, dict[str, Any]]],
        *,
        rollback: bool = False,
        effect: Effect | None = None,
        orm: bool = False,
    ) -> list[str]:
        """One transaction: ``outbox.publish`` each item, run ``effect``; commit unless
        ``rollback``. ``orm``: through a (Async)Session instead of a Connection."""
        if self.loop is not None:
            return list(self.loop.run(self._write_async(outbox, items, rollback, effect, orm)))
        engine = self.engine
        assert isinstance(engine, Engine)
        if orm:
            with Session(engine) as session:
                ids = [outbox.publish(session, m, **kw) for m, kw in items]
                if effect is not None:
                    effect(session.connection())
                session.rollback() if rollback else session.commit()
            return ids
        with engine.connect() as conn:
            tx = conn.begin()
            ids = [outbox.publish(conn, m, **kw) for m, kw in items]
            if effect is not None:
                effect(conn)
            tx.rollback() if rollback else tx.commit()
        return ids

    async def _write_async(
        self,
        outbox: Outbox,
        items: Sequence[tuple[BaseModel, dict[str, Any]]],
        rollback: bool,
        effect: Effect | None,
        orm: bool,
    ) -> list[str]:
        from sqlalchemy.ext.asyncio import AsyncSession

        engine = self.engine
        assert isinstance(engine, AsyncEngine)
        if orm:
            async with AsyncSession(engine) as session:
                ids = [await outbox.publish(session, m, **kw) for m, kw in items]
                if effect is not None:
                    await (await session.connection()).run_sync(effect)
                await (session.rollback() if rollback else session.commit())
            return ids
        async with engine.connect() as conn:
            tx = await conn.begin()
            ids = [await outbox.publish(conn, m, **kw) for m, kw in items]
            if effect is not None:
                await conn.run_sync(effect)
            await (tx.rollback() if rollback else tx.commit())
        return ids

    def run(self, fn: Callable[[Connection], Any]) -> Any:
        """``fn(conn)`` in a transaction of this side's engine (committed); its result."""
        engine = self.engine
        if isinstance(engine, AsyncEngine):

            async def go() -> Any:
                async with engine.begin() as conn:
                    return await conn.run_sync(fn)

            return self._do(go())
        with engine.begin() as conn:
            return fn(conn)

    def consume(
        self,
        queue: str,
        message_type: type[BaseModel],
        fn: Callable[[Any, mqkit.Context], Effect | None],
        *,
        inbox: Inbox[Any] | None = None,
        consumer: str | None = None,
        retry: mqkit.RetryPolicy | None = None,
    ) -> None:
        """Start a consumer of ``queue``; ``fn`` runs per message (through ``inbox``, if
        given, whose transaction then runs the effect ``fn`` returns)."""
        client = self.client
        if self.loop is None:

            def plain(message: Any, ctx: mqkit.Context) -> None:
                effect = fn(message, ctx)
                if effect is not None:
                    assert inbox is not None
                    effect(inbox.connection())

            handler: Any = inbox.handler(plain, consumer=consumer) if inbox else plain
            client.consumer(queue, message_type, handler, retry=retry).start()
            return

        async def coroutine(message: Any, ctx: mqkit.Context) -> None:
            effect = fn(message, ctx)
            if effect is not None:
                assert inbox is not None
                await inbox.connection().run_sync(effect)

        handler = inbox.handler(coroutine, consumer=consumer) if inbox else coroutine
        consumer_ = client.consumer(queue, message_type, handler, retry=retry)
        self.loop.run(consumer_.start())

    def producer_publish(self, queue: str, message: BaseModel, **kw: Any) -> str:
        """Publish straight to ``queue`` (no outbox) with this side's client."""
        if self.loop is None:
            return str(self.client.producer(type(message), queue=queue).publish(message, **kw))

        async def go() -> str:
            producer = await self.client.producer(type(message), queue=queue)
            return str(await producer.publish(message, **kw))

        return str(self.loop.run(go()))


def wait_for(check: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll ``check()`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what} (last: {value!r})")
        time.sleep(0.02)


class Received:
    """A thread-safe record of what a handler got: (message, ctx) pairs."""

    def __init__(self) -> None:
        self.items: list[tuple[Any, mqkit.Context]] = []
        self._lock = threading.Lock()

    def add(self, message: Any, ctx: mqkit.Context) -> None:
        with self._lock:
            self.items.append((message, ctx))

    def __len__(self) -> int:
        with self._lock:
            return len(self.items)

    @property
    def messages(self) -> list[Any]:
        with self._lock:
            return [m for m, _ in self.items]

    @property
    def contexts(self) -> list[mqkit.Context]:
        with self._lock:
            return [c for _, c in self.items]

    def wait(self, count: int, timeout: float = 15.0) -> list[Any]:
        wait_for(lambda: len(self) >= count, timeout, f"{count} message(s), got {len(self)}")
        return self.messages

"""The outbox and inbox on the asyncio runtime: :class:`AsyncOutboxRelay` (a task publishing
with a :class:`mqkit.AsyncClient`) and the inbox's handler wrapper, on a SQLAlchemy
``AsyncEngine``.

Only I/O here, the mirror image of ``_sync.py``: the statements are :mod:`mqkit.outbox.store`'s,
run through ``AsyncConnection.run_sync``, and the decisions :mod:`mqkit.outbox.relaying`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from mqkit import explain
from mqkit.context import Context
from mqkit.messages import Envelope
from mqkit.outbox import failpoints, store
from mqkit.outbox.locking import relay_lock
from mqkit.outbox.outbox import Outbox
from mqkit.outbox.relaying import (
    CLEAN_BATCH,
    CLEAN_ROUNDS,
    FINAL_PASSES,
    AsyncRelayClient,
    Pace,
    PassResult,
    PublishManyAsync,
    Settlement,
    Timer,
    declarations,
    failed_rows,
    groups,
    one_by_one,
    report,
    settle,
    split,
)
from mqkit.outbox.rows import Pending
from mqkit.retry import Reject

if TYPE_CHECKING:
    from mqkit.outbox.inbox import Inbox

__all__ = ["AsyncOutboxRelay", "inbox_handler"]

log = logging.getLogger("mqkit.outbox.relay")

T = TypeVar("T", bound=BaseModel)


class AsyncOutboxRelay:
    """Publishes the committed rows of an :class:`~mqkit.outbox.Outbox` (on an AsyncEngine)
    with a :class:`mqkit.AsyncClient`, in a task of its own, and marks them sent once
    confirmed; the asyncio twin of :class:`~mqkit.outbox.OutboxRelay`, with the same
    behaviour.

    ```python
    async with client.outbox_relay(outbox):   # or client.run() starts and stops it
        ...
    ```
    """

    def __init__(
        self, client: AsyncRelayClient, outbox: Outbox, publish: PublishManyAsync | None = None
    ) -> None:
        if not outbox.is_async:
            raise explain.outbox_relay_runtime("AsyncClient", "blocking Engine")
        if publish is None:
            raise explain.outbox_relay_direct("AsyncClient")
        engine = outbox.engine
        assert isinstance(engine, AsyncEngine)
        self._client = client
        self._publish_many = publish
        self._outbox = outbox
        self._engine: AsyncEngine = engine
        policy = outbox.policy
        self._lock = relay_lock(outbox.sync_engine.url, outbox.table.name)
        self._pace = Pace(policy.poll_interval)
        self._cleanup = Timer(policy.cleanup_interval)
        self._stop = False
        self._wake: asyncio.Event | None = None
        self._passing: asyncio.Lock | None = None
        self._task: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._declared: set[object] = set()
        self.sent = 0  # rows this relay published and marked sent
        self.parked = 0  # rows this relay parked

    def __repr__(self) -> str:
        state = "running" if self.started else "stopped"
        return f"<AsyncOutboxRelay {self._outbox.table.fullname} {state}>"

    @property
    def outbox(self) -> Outbox:
        """The outbox this relay publishes."""
        return self._outbox

    @property
    def started(self) -> bool:
        """Whether the relay's task runs."""
        return self._task is not None and not self._task.done()

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the table if the outbox creates it, and start the relay's task
        (idempotent; the client must be connected). Errors of the database at this point
        are raised here."""
        if self.started:
            return
        await self._prepare()
        loop = asyncio.get_running_loop()
        wake = self._wake = asyncio.Event()
        self._stop = False

        def waiter() -> None:
            loop.call_soon_threadsafe(wake.set)

        self._unsubscribe = self._outbox.add_waiter(waiter)
        self._task = loop.create_task(self._run(), name="mqkit-outbox-relay")
        log.info("relaying %s", self._outbox.table.fullname)

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop, waiting up to ``timeout`` seconds (then cancelling it); idempotent. The
        pass under way finishes, then what was committed before the call is published (up
        to ``FINAL_PASSES`` batches, unless the broker is unreachable): stop a relay after
        the consumers whose handlers write into its outbox. Rows left are sent by the next
        relay."""
        self._stop = True
        if self._wake is not None:
            self._wake.set()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        task, self._task = self._task, None
        if task is None:
            return
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run(self) -> None:
        """Start, and wait until :meth:`stop`."""
        await self.start()
        task = self._task
        if task is not None:
            await asyncio.wait({task})

    async def __aenter__(self) -> AsyncOutboxRelay:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def publish_pending(self) -> int:
        """Publish every row that is due now; how many were sent.

        Returns 0 on SQLite while another relay holds the turn. Raises the error when the
        broker or the database cannot be reached."""
        await self._prepare()
        total = 0
        try:
            while True:
                result = await self._pass()
                if result is None:
                    return total
                total += result.sent
                if result.trouble is not None:
                    raise result.trouble
                if not result.full:
                    return total
        finally:
            if not self.started and self._lock is not None:
                self._lock.release()  # not relaying: let other relays have their turn

    # -- the task ----------------------------------------------------------------------------

    async def _prepare(self) -> None:
        if not self._outbox.ready:
            async with self._engine.begin() as conn:
                await conn.run_sync(self._outbox.create_tables)

    async def _run(self) -> None:
        wake = self._wake
        assert wake is not None
        try:
            while not self._stop:
                try:
                    wait = await self._cycle()
                except Exception as exc:  # the database unreachable, most likely
                    wait = self._pace.after(sent=0, full=False, trouble=True)
                    log.warning(
                        "outbox relay pass failed: %s: %s; trying again in %.1fs",
                        type(exc).__name__,
                        exc,
                        wait,
                    )
                try:
                    await asyncio.wait_for(wake.wait(), wait)
                except asyncio.TimeoutError:
                    continue
                wake.clear()
                self._pace.woken()
            await self._final()
        finally:
            if self._lock is not None:
                self._lock.release()

    async def _final(self) -> None:
        for _ in range(FINAL_PASSES):
            try:
                result = await self._pass()
            except Exception as exc:
                log.warning("outbox relay's last pass failed: %s: %s", type(exc).__name__, exc)
                return
            if result is None or result.trouble is not None or not result.sent:
                return

    async def _cycle(self) -> float:
        result = await self._pass()
        if result is None:  # SQLite: another relay's turn
            return self._outbox.policy.poll_interval
        if self._cleanup.due():
            await self._clean()
        if result.trouble is not None:
            wait = self._pace.after(sent=result.sent, full=False, trouble=True)
            log.warning(
                "outbox relay could not publish: %s; trying again in %.1fs", result.trouble, wait
            )
            return wait
        return self._pace.after(sent=result.sent, full=result.full)

    async def _pass(self) -> PassResult | None:
        if self._passing is None:
            self._passing = asyncio.Lock()
        async with self._passing:
            if self._lock is not None and not self._lock.acquire():
                return None
            policy = self._outbox.policy
            table = self._outbox.table
            async with self._engine.begin() as conn:
                claimed = await conn.run_sync(
                    functools.partial(
                        store.claim, table=table, now=time.time(), limit=policy.batch_size
                    )
                )
                if not claimed:
                    return PassResult(0, 0, False, None)
                failpoints.reached("relay.claimed")
                rows, _later = split(claimed)
                errors = await self._send(rows)
                failpoints.reached("relay.confirmed")
                outcome = settle(rows, errors, now=time.time(), policy=policy)
                await conn.run_sync(
                    functools.partial(store.settle, table=table, outcome=outcome, now=time.time())
                )
                failpoints.reached("relay.marked")
            self._count(outcome)
            return PassResult(
                len(claimed), len(outcome.sent), len(claimed) >= policy.batch_size, outcome.trouble
            )

    async def _send(self, rows: list[Pending]) -> dict[int, BaseException]:
        client = self._client
        settings = client.settings
        errors: dict[int, BaseException] = {}
        for entity, ids in declarations(rows, settings.events_exchange, self._declared).items():
            try:
                await client.declare(entity)
                self._declared.add(entity)
            except Exception as exc:
                errors.update(dict.fromkeys(ids, exc))
        todo = [row for row in rows if row.id not in errors]
        made, broken = groups(
            todo, service=settings.service, events_exchange=settings.events_exchange
        )
        errors.update(broken)
        for group in made:
            try:
                failpoints.arm("relay.publishing")
                await self._publish(group.exchange, group.mandatory, group.envelopes, group.keys)
            except Exception as exc:
                failed = failed_rows(group.rows, exc)
                for row in one_by_one(group.rows, failed):
                    index = group.rows.index(row)
                    try:
                        await self._publish(
                            group.exchange,
                            group.mandatory,
                            [group.envelopes[index]],
                            [row.routing_key],
                        )
                        del failed[row.id]
                    except Exception as alone:
                        failed[row.id] = alone
                errors.update(failed)
        return errors

    async def _publish(
        self, exchange: str, mandatory: bool, envelopes: list[Envelope], keys: list[str]
    ) -> None:
        jobs = [(envelope, exchange, key) for envelope, key in zip(envelopes, keys, strict=True)]
        await self._publish_many(jobs, mandatory=mandatory)

    def _count(self, outcome: Settlement) -> None:
        self.sent += len(outcome.sent)
        self.parked += len(outcome.parked)
        report(log, outcome)

    async def _clean(self) -> None:
        before = time.time() - self._outbox.policy.retention
        table = self._outbox.table
        try:
            for _ in range(CLEAN_ROUNDS):
                async with self._engine.begin() as conn:
                    deleted = await conn.run_sync(
                        functools.partial(
                            store.clean, table=table, before=before, limit=CLEAN_BATCH
                        )
                    )
                if deleted < CLEAN_BATCH:
                    break
        except Exception as exc:
            log.warning("outbox relay could not delete sent rows: %s: %s", type(exc).__name__, exc)


# -- the inbox ---------------------------------------------------------------------------------


def inbox_handler(
    inbox: Inbox[AsyncConnection],
    fn: Callable[[T, Context], Awaitable[object]],
    consumer: str | None,
) -> Callable[[T, Context], Coroutine[Any, Any, None]]:
    """``fn`` awaited once per message id, in a transaction of ``inbox``'s AsyncEngine that
    records the id (see :mod:`mqkit.outbox.inbox`)."""
    engine = inbox.engine
    assert isinstance(engine, AsyncEngine)
    table = inbox.table

    @functools.wraps(fn)
    async def handle(message: T, ctx: Context) -> None:
        if not ctx.message_id:
            raise Reject(explain.inbox_no_message_id(ctx.queue))
        scope = inbox.scope(ctx, consumer)
        if not inbox.ready:
            async with engine.begin() as conn:
                await conn.run_sync(inbox.create_tables)
            inbox.ready = True
        async with engine.begin() as conn:
            fresh = await conn.run_sync(
                functools.partial(
                    store.record,
                    table=table,
                    consumer=scope,
                    message_id=ctx.message_id,
                    now=time.time(),
                )
            )
            if not fresh:
                inbox.dropped(ctx, scope)
                return
            failpoints.reached("inbox.recorded")
            token = inbox.enter(conn)
            try:
                await fn(message, ctx)
            finally:
                inbox.leave(token)
            failpoints.reached("inbox.handled")
        failpoints.reached("inbox.committed")
        if inbox.cleanup_due():
            await _forget(inbox, engine)

    return handle


async def _forget(inbox: Inbox[Any], engine: AsyncEngine) -> None:
    try:
        async with engine.begin() as conn:
            await conn.run_sync(
                functools.partial(store.forget, table=inbox.table, before=inbox.expired_before())
            )
    except Exception as exc:
        log.warning("inbox could not delete expired ids: %s: %s", type(exc).__name__, exc)

"""The outbox and inbox on the blocking runtime: :class:`OutboxRelay` (a thread publishing
with a :class:`mqkit.Client`) and the inbox's handler wrapper, on a SQLAlchemy ``Engine``.

Only I/O here: what to claim, what a failure does and when to look again are decided in
:mod:`mqkit.outbox.relaying`, and the SQL is :mod:`mqkit.outbox.store`'s.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel
from sqlalchemy import Connection, Engine

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
    Pace,
    PassResult,
    PublishMany,
    RelayClient,
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

__all__ = ["OutboxRelay", "inbox_handler"]

log = logging.getLogger("mqkit.outbox.relay")

T = TypeVar("T", bound=BaseModel)


class OutboxRelay:
    """Publishes the committed rows of an :class:`~mqkit.outbox.Outbox` with a
    :class:`mqkit.Client`, on a thread of its own, and marks them sent once confirmed.

    ```python
    with client.outbox_relay(outbox):       # or client.run() starts and stops it
        ...
    ```

    It wakes up when a transaction of this process that wrote into the outbox commits, and
    looks every ``poll_interval`` seconds otherwise. Relays on PostgreSQL work side by side
    (rows are claimed with ``FOR UPDATE SKIP LOCKED``); on SQLite one at a time works and
    the others wait their turn. Rows of one ``ordering_key`` go out in order. A row whose
    publish keeps failing is parked (``mqkit outbox list``); sent rows are deleted after
    the outbox's ``retention``. If the broker or the database is unreachable, it keeps
    trying, further and further apart (up to 30 s), and logs why.
    """

    def __init__(
        self, client: RelayClient, outbox: Outbox, publish: PublishMany | None = None
    ) -> None:
        if outbox.is_async:
            raise explain.outbox_relay_runtime("Client", "AsyncEngine")
        if publish is None:
            raise explain.outbox_relay_direct("Client")
        self._client = client
        self._publish_many = publish
        self._outbox = outbox
        self._engine: Engine = outbox.sync_engine
        policy = outbox.policy
        self._lock = relay_lock(self._engine.url, outbox.table.name)
        self._pace = Pace(policy.poll_interval)
        self._cleanup = Timer(policy.cleanup_interval)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._passing = threading.Lock()
        self._thread: threading.Thread | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._declared: set[object] = set()
        self.sent = 0  # rows this relay published and marked sent
        self.parked = 0  # rows this relay parked

    def __repr__(self) -> str:
        state = "running" if self.started else "stopped"
        return f"<OutboxRelay {self._outbox.table.fullname} {state}>"

    @property
    def outbox(self) -> Outbox:
        """The outbox this relay publishes."""
        return self._outbox

    @property
    def started(self) -> bool:
        """Whether the relay's thread runs."""
        return self._thread is not None and self._thread.is_alive()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Connect the client, create the table if the outbox creates it, and start the
        relay's thread (idempotent). Errors of the database or the broker at this point are
        raised here."""
        if self.started:
            return
        self._client.connect()
        self._prepare()
        self._stop.clear()
        self._unsubscribe = self._outbox.add_waiter(self._wake.set)
        self._thread = threading.Thread(target=self._run, name="mqkit-outbox-relay", daemon=True)
        self._thread.start()
        log.info("relaying %s", self._outbox.table.fullname)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop, waiting up to ``timeout`` seconds; idempotent. The pass under way
        finishes, then what was committed before the call is published (up to
        ``FINAL_PASSES`` batches, unless the broker is unreachable): stop a relay after the
        consumers whose handlers write into its outbox. Rows left are sent by the next
        relay."""
        self._stop.set()
        self._wake.set()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)

    def run(self) -> None:
        """Start, and block until :meth:`stop` (from another thread)."""
        self.start()
        thread = self._thread
        while thread is not None and thread.is_alive():
            thread.join(0.2)

    def __enter__(self) -> OutboxRelay:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def publish_pending(self) -> int:
        """Publish every row that is due now, in the calling thread; how many were sent.

        Returns 0 on SQLite while another relay holds the turn. Raises the error when the
        broker or the database cannot be reached."""
        self._client.connect()
        self._prepare()
        total = 0
        try:
            while True:
                result = self._pass()
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

    # -- the thread --------------------------------------------------------------------------

    def _prepare(self) -> None:
        if not self._outbox.ready:
            with self._engine.begin() as conn:
                self._outbox.create_tables(conn)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    wait = self._cycle()
                except Exception as exc:  # the database unreachable, most likely
                    wait = self._pace.after(sent=0, full=False, trouble=True)
                    log.warning(
                        "outbox relay pass failed: %s: %s; trying again in %.1fs",
                        type(exc).__name__,
                        exc,
                        wait,
                    )
                if self._wake.wait(wait):
                    self._wake.clear()
                    self._pace.woken()
            self._final()
        finally:
            if self._lock is not None:
                self._lock.release()

    def _final(self) -> None:
        for _ in range(FINAL_PASSES):
            try:
                result = self._pass()
            except Exception as exc:
                log.warning("outbox relay's last pass failed: %s: %s", type(exc).__name__, exc)
                return
            if result is None or result.trouble is not None or not result.sent:
                return

    def _cycle(self) -> float:
        result = self._pass()
        if result is None:  # SQLite: another relay's turn
            return self._outbox.policy.poll_interval
        if self._cleanup.due():
            self._clean()
        if result.trouble is not None:
            wait = self._pace.after(sent=result.sent, full=False, trouble=True)
            log.warning(
                "outbox relay could not publish: %s; trying again in %.1fs", result.trouble, wait
            )
            return wait
        return self._pace.after(sent=result.sent, full=result.full)

    def _pass(self) -> PassResult | None:
        with self._passing:
            if self._lock is not None and not self._lock.acquire():
                return None
            policy = self._outbox.policy
            table = self._outbox.table
            with self._engine.begin() as conn:
                claimed = store.claim(conn, table, now=time.time(), limit=policy.batch_size)
                if not claimed:
                    return PassResult(0, 0, False, None)
                failpoints.reached("relay.claimed")
                rows, _later = split(claimed)
                errors = self._send(rows)
                failpoints.reached("relay.confirmed")
                outcome = settle(rows, errors, now=time.time(), policy=policy)
                store.settle(conn, table, outcome, now=time.time())
                failpoints.reached("relay.marked")
            self._count(outcome)
            return PassResult(
                len(claimed), len(outcome.sent), len(claimed) >= policy.batch_size, outcome.trouble
            )

    def _send(self, rows: list[Pending]) -> dict[int, BaseException]:
        client = self._client
        settings = client.settings
        errors: dict[int, BaseException] = {}
        for entity, ids in declarations(rows, settings.events_exchange, self._declared).items():
            try:
                client.declare(entity)
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
                self._publish(group.exchange, group.mandatory, group.envelopes, group.keys)
            except Exception as exc:
                failed = failed_rows(group.rows, exc)
                for row in one_by_one(group.rows, failed):
                    index = group.rows.index(row)
                    try:
                        self._publish(
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

    def _publish(
        self, exchange: str, mandatory: bool, envelopes: list[Envelope], keys: list[str]
    ) -> None:
        jobs = [(envelope, exchange, key) for envelope, key in zip(envelopes, keys, strict=True)]
        self._publish_many(jobs, mandatory=mandatory)

    def _count(self, outcome: Settlement) -> None:
        self.sent += len(outcome.sent)
        self.parked += len(outcome.parked)
        report(log, outcome)

    def _clean(self) -> None:
        before = time.time() - self._outbox.policy.retention
        try:
            for _ in range(CLEAN_ROUNDS):
                with self._engine.begin() as conn:
                    deleted = store.clean(
                        conn, self._outbox.table, before=before, limit=CLEAN_BATCH
                    )
                if deleted < CLEAN_BATCH:
                    break
        except Exception as exc:
            log.warning("outbox relay could not delete sent rows: %s: %s", type(exc).__name__, exc)


# -- the inbox ---------------------------------------------------------------------------------


def inbox_handler(
    inbox: Inbox[Connection], fn: Callable[[T, Context], object], consumer: str | None
) -> Callable[[T, Context], None]:
    """``fn`` run once per message id, in a transaction of ``inbox``'s Engine that records
    the id (see :mod:`mqkit.outbox.inbox`)."""
    engine = inbox.engine
    assert isinstance(engine, Engine)
    table = inbox.table

    @functools.wraps(fn)
    def handle(message: T, ctx: Context) -> None:
        if not ctx.message_id:
            raise Reject(explain.inbox_no_message_id(ctx.queue))
        scope = inbox.scope(ctx, consumer)
        if not inbox.ready:
            with engine.begin() as conn:
                inbox.create_tables(conn)
            inbox.ready = True
        with engine.begin() as conn:
            fresh = store.record(
                conn, table, consumer=scope, message_id=ctx.message_id, now=time.time()
            )
            if not fresh:
                inbox.dropped(ctx, scope)
                return
            failpoints.reached("inbox.recorded")
            token = inbox.enter(conn)
            try:
                fn(message, ctx)
            finally:
                inbox.leave(token)
            failpoints.reached("inbox.handled")
        failpoints.reached("inbox.committed")
        if inbox.cleanup_due():
            _forget(inbox, engine)

    return handle


def _forget(inbox: Inbox[Any], engine: Engine) -> None:
    try:
        with engine.begin() as conn:
            store.forget(conn, inbox.table, before=inbox.expired_before())
    except Exception as exc:
        log.warning("inbox could not delete expired ids: %s: %s", type(exc).__name__, exc)

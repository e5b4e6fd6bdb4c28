"""A process of the crash tests (test_outbox_crash.py): an orders service writing through the
outbox, or a billing service applying through the inbox, on either runtime.

``python crash_child.py CONFIG_JSON``; ``MQKIT_TEST_CRASH_AT`` (see mqkit/outbox/failpoints.py)
makes it SIGKILL itself at a step. Config keys: ``role`` (``producer`` | ``consumer``),
``runtime`` (``sync`` | ``async``), ``db`` (a SQLAlchemy URL for that runtime), ``prefix``,
``broker``, ``queue``; a producer's ``orders`` (ids to write, one transaction each, before
its relay starts) and ``die_before_commit`` (an order id: SIGKILL after writing it, before
the commit); a consumer's ``log`` (a file it appends ``received ORDER ID`` and ``dropped ID``
lines to).

A producer exits 0 once its outbox has nothing left to send; a consumer runs until SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from typing import Any

from pydantic import BaseModel
from sqlalchemy import Connection, create_engine, text
from sqlalchemy.ext.asyncio import create_async_engine

import mqkit
from mqkit.outbox import Inbox, Outbox


class Charge(BaseModel):
    order: int


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class Log(logging.Handler):
    """Appends a line per event to the accounting log (one write(2) each: a line is whole
    even if the process is killed right after)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)

    def line(self, text: str) -> None:
        os.write(self.fd, (text + "\n").encode())

    def emit(self, record: logging.LogRecord) -> None:  # the inbox's duplicate lines
        if record.getMessage().startswith("duplicate"):
            self.line(f"dropped {getattr(record, 'message_id', '?')}")


def connect_args(url: str) -> dict[str, Any]:
    return {"timeout": 30} if url.startswith("sqlite") else {}


def ddl(prefix: str) -> list[str]:
    return [
        f"CREATE TABLE IF NOT EXISTS {prefix}orders (id INTEGER PRIMARY KEY)",
        f"CREATE TABLE IF NOT EXISTS {prefix}applied "
        "(order_id INTEGER NOT NULL, message_id VARCHAR(255) NOT NULL)",
    ]


def write_order(conn: Connection, outbox: Outbox, order: int, cfg: dict[str, Any]) -> None:
    conn.execute(text(f"INSERT INTO {cfg['prefix']}orders (id) VALUES (:id)"), {"id": order})
    outbox.publish(conn, Charge(order=order), queue=cfg["queue"])
    if order == cfg.get("die_before_commit"):
        die()


def pending(conn: Connection, outbox: Outbox) -> int:
    stats = outbox.stats(conn)
    return stats.pending


# -- the blocking runtime --------------------------------------------------------------------


def producer_sync(cfg: dict[str, Any]) -> None:
    engine = create_engine(cfg["db"], connect_args=connect_args(cfg["db"]))
    outbox = Outbox(engine, table_prefix=cfg["prefix"], batch_size=4, poll_interval=0.1)
    with engine.begin() as conn:
        for statement in ddl(cfg["prefix"]):
            conn.execute(text(statement))
    for order in cfg["orders"]:
        with engine.begin() as conn:
            write_order(conn, outbox, order, cfg)
    with mqkit.Client(url=cfg["broker"], service="orders") as client:
        relay = client.outbox_relay(outbox)
        relay.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with engine.begin() as conn:
                if pending(conn, outbox) == 0:
                    break
            time.sleep(0.05)
        relay.stop()
    engine.dispose()


def consumer_sync(cfg: dict[str, Any], log: Log) -> None:
    engine = create_engine(cfg["db"], connect_args=connect_args(cfg["db"]))
    with engine.begin() as conn:
        for statement in ddl(cfg["prefix"]):
            conn.execute(text(statement))
    inbox = Inbox(engine, table_prefix=cfg["prefix"])
    insert = text(f"INSERT INTO {cfg['prefix']}applied VALUES (:o, :m)")

    @inbox.handler
    def apply(charge: Charge, ctx: mqkit.Context) -> None:
        inbox.connection().execute(insert, {"o": charge.order, "m": ctx.message_id})

    def receive(charge: Charge, ctx: mqkit.Context) -> None:
        log.line(f"received {charge.order} {ctx.message_id}")
        apply(charge, ctx)

    with mqkit.Client(url=cfg["broker"], service=cfg["service"]) as client:
        client.consumer(cfg["queue"], Charge, receive)
        client.run()
    engine.dispose()


# -- the asyncio runtime ---------------------------------------------------------------------


async def producer_async(cfg: dict[str, Any]) -> None:
    engine = create_async_engine(cfg["db"], connect_args=connect_args(cfg["db"]))
    outbox = Outbox(engine, table_prefix=cfg["prefix"], batch_size=4, poll_interval=0.1)
    async with engine.begin() as conn:
        for statement in ddl(cfg["prefix"]):
            await conn.execute(text(statement))
    for order in cfg["orders"]:
        async with engine.begin() as conn:
            await conn.run_sync(lambda c, order=order: write_order(c, outbox, order, cfg))
    async with mqkit.AsyncClient(url=cfg["broker"], service="orders") as client:
        relay = client.outbox_relay(outbox)
        await relay.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            async with engine.begin() as conn:
                if await conn.run_sync(lambda c: pending(c, outbox)) == 0:
                    break
            await asyncio.sleep(0.05)
        await relay.stop()
    await engine.dispose()


async def consumer_async(cfg: dict[str, Any], log: Log) -> None:
    engine = create_async_engine(cfg["db"], connect_args=connect_args(cfg["db"]))
    async with engine.begin() as conn:
        for statement in ddl(cfg["prefix"]):
            await conn.execute(text(statement))
    inbox = Inbox(engine, table_prefix=cfg["prefix"])
    insert = text(f"INSERT INTO {cfg['prefix']}applied VALUES (:o, :m)")

    @inbox.handler
    async def apply(charge: Charge, ctx: mqkit.Context) -> None:
        await inbox.connection().execute(insert, {"o": charge.order, "m": ctx.message_id})

    async def receive(charge: Charge, ctx: mqkit.Context) -> None:
        log.line(f"received {charge.order} {ctx.message_id}")
        await apply(charge, ctx)

    async with mqkit.AsyncClient(url=cfg["broker"], service=cfg["service"]) as client:
        client.consumer(cfg["queue"], Charge, receive)
        await client.run()
    await engine.dispose()


def main() -> None:
    cfg = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    if cfg["role"] == "producer":
        if cfg["runtime"] == "sync":
            producer_sync(cfg)
        else:
            asyncio.run(producer_async(cfg))
        print("drained", flush=True)
        return
    log = Log(cfg["log"])
    inbox_log = logging.getLogger("mqkit.outbox.inbox")
    inbox_log.setLevel(logging.INFO)
    inbox_log.addHandler(log)
    if cfg["runtime"] == "sync":
        consumer_sync(cfg, log)
    else:
        asyncio.run(consumer_async(cfg, log))


if __name__ == "__main__":
    main()

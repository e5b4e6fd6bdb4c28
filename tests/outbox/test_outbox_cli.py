"""``mqkit outbox list|retry|purge|ddl`` run as real processes, on rows a real relay parked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pika
from pydantic import BaseModel
from sqlalchemy import text
from typer.testing import CliRunner

import mqkit
from mqkit.outbox import Outbox
from mqkit.outbox.cli import app

ROOT = Path(__file__).resolve().parents[2]


class Charge(BaseModel):
    order_id: str


class Ran:
    """What a command did: ``returncode``, ``stdout``, ``stderr``."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def cli(*args: str, db: str | None = None) -> Ran:
    """``mqkit outbox ARGS``, in this process (fast), with no terminal on stdin."""
    env = {"MQKIT_OUTBOX_DB": db, "COLUMNS": "250"}
    result = CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)
    return Ran(result.exit_code, result.stdout, result.stderr)


def process(*args: str, db: str | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m mqkit.outbox.cli ARGS`` as a process of its own, with no terminal."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MQKIT_")}
    env["COLUMNS"] = "250"
    if db is not None:
        env["MQKIT_OUTBOX_DB"] = db
    return subprocess.run(
        [sys.executable, "-m", "mqkit.outbox.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def channel_do(url: str, action: Any) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        action(connection.channel())
    finally:
        connection.close()


def test_parked_rows_are_listed_retried_and_purged(db, names, raw, broker_url) -> None:
    queue, nowhere = names.queue(), names.exchange()
    channel_do(broker_url, lambda ch: ch.exchange_declare(nowhere, "topic", durable=True))
    prefix = ["--table-prefix", db.prefix]
    engine = db.engine()
    outbox = Outbox(engine, table_prefix=db.prefix, max_attempts=1)
    with mqkit.Client(url=broker_url, service=names.service()) as client:
        with engine.begin() as conn:
            for n in range(2):
                outbox.publish(conn, Charge(order_id=str(n)), exchange=nowhere, routing_key="void")
            outbox.publish(conn, Charge(order_id="fine"), queue=queue)
        relay = client.outbox_relay(outbox)
        assert relay.publish_pending() == 1

        # list, as JSON through the asyncio driver, and as a table through the blocking one
        listed = cli("list", "--json", *prefix, db=db.async_url)
        assert listed.returncode == 0, listed.stderr
        report = json.loads(listed.stdout)
        assert report["counts"] == {"pending": 0, "parked": 2, "sent": 1}
        first, _ = report["parked"]
        assert first["attempts"] == 1 and "PublishUnroutable" in first["last_error"]
        assert first["target"] == f"exchange {nowhere!r} (key 'void')"
        table = process("list", *prefix, db=db.sync_url)  # the real entry point, once
        assert table.returncode == 0, table.stderr
        assert "2 parked" in table.stdout and first["message_id"] in table.stdout
        assert "PublishUnroutable" in table.stdout

        # retry one, once it can be routed: the relay sends it
        channel_do(broker_url, lambda ch: ch.queue_bind(queue, nowhere, "void"))
        retried = cli("retry", str(first["id"]), *prefix, db=db.sync_url)
        assert retried.returncode == 0, retried.stderr
        assert "1 parked row will be published again" in retried.stdout
        assert relay.publish_pending() == 1

        # purge asks first; with no terminal it refuses unless --yes
        refused = cli("purge", "--all", *prefix, db=db.sync_url)
        assert refused.returncode == 2 and "--yes" in refused.stderr
        purged = cli("purge", "--all", "--yes", *prefix, db=db.sync_url)
        assert purged.returncode == 0, purged.stderr
        assert "1 parked row deleted" in purged.stdout
        after = cli("list", "--json", *prefix, db=db.sync_url)
        relay.stop()
    assert json.loads(after.stdout)["counts"] == {"pending": 0, "parked": 0, "sent": 2}
    got = [json.loads(body)["order_id"] for _, _, body in raw.drain(queue)]
    assert got == ["fine", "0"]


def test_the_printed_ddl_makes_tables_the_outbox_and_inbox_use(db, names) -> None:
    printed = cli("ddl", "--table-prefix", db.prefix, db=db.sync_url)
    assert printed.returncode == 0, printed.stderr
    assert f"CREATE TABLE {db.prefix}outbox" in printed.stdout
    statements = [s for s in printed.stdout.split(";\n") if s.strip()]
    engine = db.engine()
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(text(statement))
    outbox = Outbox(engine, table_prefix=db.prefix, create_tables=False)
    with engine.begin() as conn:
        outbox.publish(conn, Charge(order_id="1"), queue="q")
    with engine.begin() as conn:
        assert outbox.stats(conn).pending == 1
        count = conn.execute(text(f"SELECT count(*) FROM {db.prefix}inbox")).scalar()
    assert count == 0


def test_bad_usage_says_what_to_do(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    no_db = cli("list")
    assert no_db.returncode == 2 and "MQKIT_OUTBOX_DB" in no_db.stderr
    missing = cli("list", "--table-prefix", "orders_", db=url)
    assert missing.returncode == 4 and "orders_outbox" in missing.stderr
    unreachable = cli("list", db="postgresql+psycopg://user:s3cret@127.0.0.1:1/nowhere")
    assert unreachable.returncode == 3, unreachable.stderr
    assert "cannot use the database" in unreachable.stderr
    assert "s3cret" not in unreachable.stderr + unreachable.stdout
    both = cli("retry", "1", "--all", db=url)
    assert both.returncode == 2 and "not both" in both.stderr
    prefix = cli("ddl", "--dialect", "sqlite", "--table-prefix", "bad prefix")
    assert prefix.returncode == 2 and "table_prefix" in prefix.stderr

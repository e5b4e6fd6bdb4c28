"""The suite's broker hygiene (tests/conftest.py) on a session of its own: what a test's
clients declared is gone after it, and a test that leaves something behind fails the run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pika
import pytest

TESTS = Path(__file__).resolve().parents[1]

INNER = '''
import json, os
import pika
from pydantic import BaseModel

import mqkit


class Order(BaseModel):
    order_id: str


class Paid(mqkit.Event, event_type="hygiene.paid"):
    order_id: str


def test_clean(names, broker_url):
    """A consumer (retry tiers, DLQ), a bus subscription (its own queues) and an exchange:
    all declared through mqkit, none deleted by the test itself."""
    queue = names.queue()
    with mqkit.Client(url=broker_url, service=names.service()) as client:
        with client.consumer(queue, Order, lambda message, ctx: None):
            pass
        bus = client.event_bus(exchange=names.exchange())
        bus.subscribe(Paid, lambda message, ctx: None)
        with bus:
            pass
        declared = [e.name for e in client.topology if isinstance(e, (mqkit.Queue, mqkit.Exchange))]
    with open(os.environ["HYGIENE_OUT"], "w") as out:
        json.dump(declared, out)


def test_leaks_behind_mqkits_back(names, broker_url):
    hidden = f"{names.base}-hidden"
    with open(os.environ["HYGIENE_HIDDEN"], "w") as out:
        out.write(hidden)
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    connection.channel().queue_declare(hidden, durable=True)
    connection.close()


def test_declares_outside_the_names(broker_url):
    with mqkit.Client(url=broker_url) as client:
        client.declare(mqkit.Queue(os.environ["HYGIENE_OUTSIDE"], type="classic"))
'''


def _exists(url: str, kind: str, name: str) -> bool:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        if kind == "queue":
            channel.queue_declare(name, passive=True)
        else:
            channel.exchange_declare(name, passive=True)
        return True
    except pika.exceptions.ChannelClosedByBroker:
        return False
    finally:
        if connection.is_open:
            connection.close()


@pytest.mark.rabbitmq_only(
    "runs pytest in a child process, which would have an in-memory broker of its own"
)
def test_cleanup_after_each_test_and_leftovers_fail_the_run(broker_url, broker_ctl, tmp_path, raw):  # type: ignore[no-untyped-def]
    broker_ctl.require()  # the inner session lists the broker with it
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_inner.py").write_text(INNER)
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nasyncio_default_fixture_loop_scope = function\nfilterwarnings = error\n"
    )
    outside = f"hygiene-outside-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "MQKIT_TEST_URL": broker_url,
        "HYGIENE_OUT": str(tmp_path / "declared.json"),
        "HYGIENE_OUTSIDE": outside,
        "HYGIENE_HIDDEN": str(tmp_path / "hidden.txt"),
    }
    gone = [outside, f"{outside}.dlq"]  # declare(Queue) also declares its DLQ
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", str(tmp_path)],
            cwd=TESTS.parent,  # where MQKIT_TEST_CTL may name scripts/rabbitmq4.sh
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        out = result.stdout + result.stderr
        assert result.returncode == 1, out
        # Teardown of the test that used a name outside `names`: an error naming it.
        assert "ERROR at teardown of test_declares_outside_the_names" in out, out
        assert "outside the suite's names, and left them on the broker" in out, out
        assert f"'{outside}'" in out, out
        # The end-of-session listing found what the other test declared behind mqkit's back.
        assert "test_inner.py::test_leaks_behind_mqkits_back left 1 queue(s)" in out, out
        assert "peak queues of this session alive at once:" in out, out
        # What the clean test's client declared is gone (the per-test cleanup deleted it).
        declared = json.loads((tmp_path / "declared.json").read_text())
        assert any(".retries." in n for n in declared) and any(n.endswith(".dlq") for n in declared)
        assert any(".hygiene.paid" in n for n in declared), declared
        left = [n for n in declared if _exists(broker_url, "queue", n)]
        left += [n for n in declared if _exists(broker_url, "exchange", n)]
        assert left == []
    finally:  # what the inner session left on purpose (when it could not clean it up)
        hidden = tmp_path / "hidden.txt"
        if hidden.exists():
            gone.append(hidden.read_text())
        connection = pika.BlockingConnection(pika.URLParameters(broker_url))
        channel = connection.channel()
        for name in gone:
            channel.queue_delete(name)
        connection.close()
    assert [n for n in gone if raw.exists(n)] == []

"""`mqkit dlq ...` run as a real process against real dead letters.

The dead letters are made raw with pika, carrying the ``x-mqkit-*`` headers documented in
mqkit/dead_letters.py, so these tests do not depend on consumer code; one end-to-end test
makes them with a real rejecting consumer too.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pika
import pytest
from conftest import wait_until

import mqkit
from mqkit import cli
from mqkit.topology import Queue, consumer_topology, queue_arguments

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_cli(
    *args: str, timeout: float = 60.0, columns: int = 250, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m mqkit.cli ARGS`` with no terminal on stdin, no MQKIT_* settings but
    those in ``env``, and a terminal ``columns`` wide (rich's default is 80)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MQKIT_")}
    environment.update(env or {})
    environment["COLUMNS"] = str(columns)
    environment["PYTHONIOENCODING"] = "utf-8"
    return subprocess.run(
        [sys.executable, "-m", "mqkit.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def declare(url: str, queue: str) -> None:
    """Declare ``queue`` and its DLQ exactly as an mqkit producer would."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        topology = consumer_topology(Queue(queue), None, default_type="quorum", delivery_limit=20)
        for q in topology:
            channel.queue_declare(q.name, durable=True, arguments=queue_arguments(q, "quorum"))
    finally:
        connection.close()


def dead_letter(
    url: str,
    queue: str,
    order_id: str,
    *,
    error_type: str = "ValueError",
    error_message: str = "card declined",
    original_queue: str | None = None,
    attempts: int = 3,
) -> str:
    """Put one dead letter into ``queue``.dlq the way a consumer that gave up would."""
    message_id = uuid.uuid4().hex
    headers: dict[str, Any] = {
        "x-mqkit-error-type": error_type,
        "x-mqkit-error-message": error_message,
        "x-mqkit-traceback": f'Traceback (most recent call last):\n  File "shop.py"\n{error_type}',
        "x-mqkit-attempts": attempts,
        "x-mqkit-original-queue": original_queue or queue,
        "x-mqkit-original-exchange": "",
        "x-mqkit-original-routing-key": original_queue or queue,
        "x-mqkit-service": "shop",
        "x-mqkit-host": "test-host",
        "x-mqkit-failed-at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "tenant": "acme",
    }
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            "",
            f"{queue}.dlq",
            json.dumps({"order_id": order_id, "amount": "9.90"}).encode(),
            pika.BasicProperties(
                content_type="application/json",
                delivery_mode=2,
                message_id=message_id,
                type="Order",
                app_id="shop",
                timestamp=int(time.time()),
                headers=headers,
            ),
            mandatory=True,
        )
    finally:
        connection.close()
    return message_id


@pytest.fixture
def dlq(broker_url, names, raw):
    """A queue with three dead letters: two ValueError, one KeyError. Yields
    (queue, {order_id: message_id})."""
    queue = names.queue()
    declare(broker_url, queue)
    ids = {
        "A-1": dead_letter(broker_url, queue, "A-1"),
        "A-2": dead_letter(broker_url, queue, "A-2", error_message="x" * 200),
        "B-1": dead_letter(broker_url, queue, "B-1", error_type="KeyError", error_message="'sku'"),
    }
    wait_until(lambda: raw.count(f"{queue}.dlq") == 3, what="3 dead letters")
    return queue, ids


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"mqkit {mqkit.__version__}"


def test_usage_error_exits_2():
    result = run_cli("dlq", "peek")
    assert result.returncode == 2
    assert "QUEUE" in result.stderr


def test_list_shows_the_dead_letters(broker_url, dlq, raw):
    queue, ids = dlq
    result = run_cli("dlq", "list", queue, "--url", broker_url)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"{queue}.dlq: 3 dead letters" in out
    for message_id in ids.values():
        assert message_id in out
    assert out.count("ValueError") == 2
    assert "KeyError" in out
    assert "card declined" in out
    assert "x" * 200 not in out  # long messages are cut short in the table
    assert queue in out
    assert raw.count(f"{queue}.dlq") == 3  # nothing removed


def test_list_is_readable_in_80_columns(broker_url, dlq, names):
    queue, ids = dlq
    other = names.queue()
    dead_letter(broker_url, queue, "C-1", error_type="TimeoutError", original_queue=other)
    result = run_cli("dlq", "list", queue, "--url", broker_url, columns=80)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, result.stdout
    assert f"{queue}.dlq: 4 dead letters" in result.stdout
    # Every id on a line of its own, whole (to copy into replay --message-id).
    for message_id in ids.values():
        assert any(line.strip().startswith(message_id) for line in lines), result.stdout
    # The error type and the start of the message on the next line; attempts and time
    # stay in their columns.
    assert "ValueError: card declined" in result.stdout
    assert "KeyError: 'sku'" in result.stdout
    assert "xxxxxxxx…" in result.stdout
    row = next(line for line in lines if line.strip().startswith(ids["A-1"]))
    assert row.split()[1:] and row.split()[1] == "3"  # attempts
    assert len(row.split()) == 4  # id, attempts, date, time: nothing wrapped or cut
    # The original queue is named only where it differs from QUEUE.
    assert f"(from {other})" in result.stdout
    assert result.stdout.count("(from ") == 1


def test_an_unused_bad_setting_does_not_stop_the_dlq_commands(broker_url, dlq):
    queue, ids = dlq
    env = {"MQKIT_PREFETCH": "abc", "MQKIT_QUEUE_TYPE": "fast", "MQKIT_HEARTBEAT": "5"}
    result = run_cli("dlq", "list", queue, "--url", broker_url, env=env)
    assert result.returncode == 0, result.stderr
    assert ids["A-1"] in result.stdout
    warnings = " ".join(result.stderr.split())
    assert "warning: ignoring MQKIT_PREFETCH='abc': not an integer" in warnings
    assert "mqkit dlq does not use prefetch" in warnings
    assert "warning: ignoring MQKIT_QUEUE_TYPE='fast'" in warnings
    assert "HEARTBEAT" not in warnings  # a valid value is neither ignored nor warned about
    # A bad value of a setting the commands use still stops them, naming it.
    env["MQKIT_CONNECT_TIMEOUT"] = "soon"
    result = run_cli("dlq", "list", queue, "--url", broker_url, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "MQKIT_CONNECT_TIMEOUT='soon'" in " ".join(result.stderr.split())


def test_list_limit_says_how_many_are_shown(broker_url, dlq):
    queue, _ = dlq
    result = run_cli("dlq", "list", queue, "--limit", "1", "--url", broker_url)
    assert result.returncode == 0, result.stderr
    assert "showing 1 of 3" in result.stdout


def test_peek_shows_full_details_and_removes_nothing(broker_url, dlq, raw):
    queue, ids = dlq
    result = run_cli("dlq", "peek", queue, "--limit", "3", "--url", broker_url)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for message_id in ids.values():
        assert message_id in out
    assert "card declined" in out
    assert "x" * 200 in out  # the full error message
    assert "tenant" in out and "acme" in out  # headers
    assert '"order_id": "A-1"' in out  # the body, pretty-printed
    assert "Traceback (most recent call last)" in out
    wait_until(lambda: raw.count(f"{queue}.dlq") == 3, what="peeked letters back in the DLQ")


def test_peek_json(broker_url, dlq, raw):
    queue, ids = dlq
    result = run_cli("dlq", "peek", queue, "--limit", "2", "--json", "--url", broker_url)
    assert result.returncode == 0, result.stderr
    letters = json.loads(result.stdout)
    assert len(letters) == 2
    for letter in letters:
        assert letter["message_id"] in ids.values()
        assert letter["original_queue"] == queue
        assert letter["attempts"] == 3
        assert letter["headers"]["tenant"] == "acme"
        assert json.loads(letter["body"])["order_id"] in ids
    wait_until(lambda: raw.count(f"{queue}.dlq") == 3, what="peeked letters back in the DLQ")


def test_export_writes_json_lines(broker_url, dlq, raw, tmp_path):
    queue, ids = dlq
    target = tmp_path / "dead.jsonl"
    result = run_cli("dlq", "export", queue, "--output", str(target), "--url", broker_url)
    assert result.returncode == 0, result.stderr
    assert "exported 3 dead letters" in result.stderr
    lines = target.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert {r["message_id"] for r in records} == set(ids.values())
    assert {r["error_type"] for r in records} == {"ValueError", "KeyError"}
    wait_until(lambda: raw.count(f"{queue}.dlq") == 3, what="exported letters still in the DLQ")


def test_export_to_stdout_with_limit(broker_url, dlq):
    queue, ids = dlq
    result = run_cli("dlq", "export", queue, "--limit", "2", "--url", broker_url)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 2  # stdout holds JSON lines only; the rest goes to stderr
    assert all(r["message_id"] in ids.values() for r in records)


def test_replay_moves_them_back_to_the_original_queue(broker_url, dlq, raw):
    queue, ids = dlq
    result = run_cli("dlq", "replay", queue, "--yes", "--url", broker_url)
    assert result.returncode == 0, result.stderr
    assert "replayed 3 dead letters" in result.stdout
    assert raw.count(f"{queue}.dlq") == 0
    wait_until(lambda: raw.count(queue) == 3, what="3 replayed messages in the work queue")
    back = raw.drain(queue)
    assert {props.message_id for _, props, _ in back} == set(ids.values())
    for _, props, body in back:
        assert json.loads(body)["order_id"] in ids
        assert "x-mqkit-error-type" not in (props.headers or {})
        assert (props.headers or {}).get("tenant") == "acme"  # the publisher's own headers stay


def test_replay_filters(broker_url, dlq, raw):
    queue, ids = dlq
    result = run_cli("dlq", "replay", queue, "--error-type", "KeyError", "-y", "--url", broker_url)
    assert result.returncode == 0, result.stderr
    assert "replayed 1 dead letter " in result.stdout
    result = run_cli(
        "dlq", "replay", queue, "--message-id", ids["A-2"], "--yes", "--url", broker_url
    )
    assert result.returncode == 0, result.stderr
    wait_until(lambda: raw.count(queue) == 2, what="2 replayed messages")
    back = {props.message_id for _, props, _ in raw.drain(queue)}
    assert back == {ids["B-1"], ids["A-2"]}
    assert raw.count(f"{queue}.dlq") == 1
    result = run_cli(
        "dlq", "replay", queue, "--error-type", "NoSuchError", "-y", "--url", broker_url
    )
    assert result.returncode == 0, result.stderr
    assert "matched" in result.stdout
    assert raw.count(f"{queue}.dlq") == 1


def test_replay_of_a_message_id_that_matches_nothing_says_so_and_fails(broker_url, dlq, raw):
    queue, ids = dlq
    result = run_cli(
        "dlq", "replay", queue, "--message-id", "no-such-id", "--yes", "--url", broker_url
    )
    assert result.returncode == cli.EXIT_NO_MATCH == 6, result.stdout + result.stderr
    error = " ".join(result.stderr.split())  # rich wraps long lines
    assert f"no dead letter in {queue}.dlq has message id 'no-such-id'" in error
    assert "nothing replayed (3 dead letters in it" in error
    assert f"mqkit dlq list {queue}" in error
    assert "replaying" not in result.stderr  # no empty progress bar before the error
    assert "Traceback" not in result.stderr
    # An id that exists, but not with that error type, matches nothing either.
    result = run_cli(
        "dlq", "replay", queue, "--message-id", ids["A-1"], "--error-type", "KeyError",
        "--yes", "--url", broker_url,
    )  # fmt: skip
    assert result.returncode == 6, result.stdout + result.stderr
    assert "and error type 'KeyError'" in " ".join(result.stderr.split())
    assert raw.count(f"{queue}.dlq") == 3


def test_replay_of_a_message_id_in_an_empty_dlq_fails_too(broker_url, names):
    queue = names.queue()
    declare(broker_url, queue)
    result = run_cli("dlq", "replay", queue, "--message-id", "x", "--yes", "--url", broker_url)
    assert result.returncode == 6, result.stdout + result.stderr
    assert "nothing replayed (0 dead letters in it" in " ".join(result.stderr.split())


def test_replay_progress_shows_the_total_it_knows(broker_url, dlq):
    queue, ids = dlq
    by_id = run_cli(
        "dlq", "replay", queue, "--message-id", ids["A-1"], "--yes", "--url", broker_url
    )
    assert by_id.returncode == 0, by_id.stderr
    assert "1/1" in by_id.stderr and "?" not in by_id.stderr
    by_type = run_cli(
        "dlq", "replay", queue, "--error-type", "ValueError", "--yes", "--url", broker_url
    )
    assert by_type.returncode == 0, by_type.stderr
    # 2 dead letters left, so at most 2 can match; it ends at what was replayed.
    assert "replaying (at most 2)" in by_type.stderr and "1/1" in by_type.stderr
    everything = run_cli("dlq", "replay", queue, "--yes", "--url", broker_url)
    assert everything.returncode == 0, everything.stderr
    assert "1/1" in everything.stderr and "?" not in everything.stderr


def test_replay_that_fails_part_way_exits_5(broker_url, names, raw):
    """The work queue (declared by someone else) takes 2 messages and refuses the rest."""
    queue = names.queue()
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        channel = connection.channel()
        channel.queue_declare(
            queue, durable=True, arguments={"x-max-length": 2, "x-overflow": "reject-publish"}
        )
        channel.queue_declare(f"{queue}.dlq", durable=True)
    finally:
        connection.close()
    ids = [dead_letter(broker_url, queue, f"o-{n}") for n in range(3)]
    result = run_cli("dlq", "replay", queue, "--yes", "--url", broker_url)
    assert result.returncode == 5, result.stdout + result.stderr
    error = " ".join(result.stderr.split())
    assert "replay failed after 2 dead letters replayed (1 left in" in error
    assert "Traceback" not in result.stderr
    wait_until(lambda: raw.count(queue) == 2, what="the 2 replayed messages")
    wait_until(lambda: raw.count(f"{queue}.dlq") == 1, what="the refused one left in the DLQ")
    [(_, props, _)] = raw.drain(f"{queue}.dlq")
    assert props.message_id == ids[2]


def test_replay_and_purge_refuse_without_a_terminal(broker_url, dlq, raw):
    queue, _ = dlq
    for command in ("replay", "purge"):
        result = run_cli("dlq", command, queue, "--url", broker_url)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "--yes" in result.stderr
    assert raw.count(f"{queue}.dlq") == 3


def test_purge_yes_empties_the_dlq(broker_url, dlq, raw):
    queue, _ = dlq
    result = run_cli("dlq", "purge", queue, "--yes", "--url", broker_url)
    assert result.returncode == 0, result.stderr
    assert "purged 3 dead letters" in result.stdout
    assert raw.count(f"{queue}.dlq") == 0
    assert raw.count(queue) == 0
    result = run_cli("dlq", "list", queue, "--url", broker_url)
    assert result.returncode == 0, result.stderr
    assert "0 dead letters" in result.stdout


def test_unreachable_broker_exits_3_with_a_clear_message():
    port = free_port()
    url = f"amqp://guest:guest@127.0.0.1:{port}/"
    started = time.monotonic()
    result = run_cli("dlq", "list", "orders", "--url", url, "--connect-timeout", "2")
    assert result.returncode == 3, result.stdout + result.stderr
    assert time.monotonic() - started < 30
    assert "cannot connect" in result.stderr
    assert f"127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_wrong_password_exits_3_and_is_masked(broker_url):
    secret = "n0t-the-Passw0rd"
    parts = broker_url.split("@", 1)
    user = parts[0].split("://", 1)[1].split(":", 1)[0]
    url = f"amqp://{user}:{secret}@{parts[1]}"
    result = run_cli("dlq", "peek", "orders", "--url", url, "--connect-timeout", "5")
    assert result.returncode == 3, result.stdout + result.stderr
    assert secret not in result.stdout + result.stderr
    assert "wrong username or password" in result.stderr
    assert "***" in result.stderr


def test_invalid_url_is_a_usage_error():
    result = run_cli("dlq", "list", "orders", "--url", "http://guest:hunter2@localhost/")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "hunter2" not in result.stdout + result.stderr
    assert "not an AMQP URL" in result.stderr


def test_missing_queue_exits_4(broker_url, names, raw):
    queue = names.queue()  # never declared
    result = run_cli("dlq", "list", queue, "--url", broker_url)
    assert result.returncode == 4, result.stdout + result.stderr
    assert f"{queue}.dlq" in result.stderr
    assert not raw.exists(f"{queue}.dlq")  # looking does not create it


def test_url_from_the_environment(broker_url, dlq):
    queue, _ = dlq
    env = {k: v for k, v in os.environ.items() if not k.startswith("MQKIT_")}
    env.update(MQKIT_URL=broker_url, COLUMNS="250")
    result = subprocess.run(
        [sys.executable, "-m", "mqkit.cli", "dlq", "list", queue],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "3 dead letters" in result.stdout


class Order(mqkit.Event, event_type="cli-test.order"):
    order_id: str


def test_end_to_end_with_a_rejecting_consumer(broker_url, names, raw):
    """Dead letters made by a real consumer: list shows the reason, replay sends them back."""
    queue = names.queue()

    def reject(message: Order, ctx: mqkit.Context) -> None:
        raise mqkit.Reject(f"order {message.order_id} is on hold")

    with mqkit.Client(url=broker_url, service=names.service()) as client:
        consumer = client.consumer(queue, Order, reject, retry=mqkit.RetryPolicy(max_attempts=1))
        consumer.start()
        try:
            producer = client.producer(Order, queue=queue)
            sent = producer.publish(Order(order_id="E-1"))
            wait_until(lambda: raw.count(f"{queue}.dlq") == 1, what="the rejected message")
        finally:
            consumer.stop()

    listed = run_cli("dlq", "list", queue, "--url", broker_url)
    assert listed.returncode == 0, listed.stderr
    assert sent in listed.stdout
    assert "order E-1 is on hold" in listed.stdout

    replayed = run_cli("dlq", "replay", queue, "--yes", "--url", broker_url)
    assert replayed.returncode == 0, replayed.stderr
    wait_until(lambda: raw.count(queue) == 1, what="the replayed message")
    [(_, props, body)] = raw.drain(queue)
    assert props.message_id == sent
    assert json.loads(body) == {"order_id": "E-1"}

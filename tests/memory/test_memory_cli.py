"""``mqkit dlq ...`` against a ``memory://NAME`` URL, run in this process (typer's CliRunner):
the command's own client reaches the test's in-memory broker, so dead letters a real
consumer made can be listed, exported, replayed and purged in a unit-test's time."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

import mqkit
from mqkit import cli
from mqkit.testing.memory import MemoryBroker
from mqkit.testing.pytest_plugin import Recorder, published


class Order(BaseModel):
    id: int
    card: str


class Ran:
    def __init__(self, code: int, stdout: str, stderr: str) -> None:
        self.code, self.stdout, self.stderr = code, stdout, stderr


def mqkit_cli(*args: str) -> Ran:
    """``mqkit ARGS`` in this process, with a wide terminal and no terminal on stdin."""
    result = CliRunner().invoke(cli.app, list(args), env={"COLUMNS": "250"})
    return Ran(result.exit_code, result.stdout, result.stderr)


@pytest.fixture
def dead_letters(mqkit_memory: MemoryBroker) -> dict[int, str]:
    """Three orders in ``orders.dlq``, put there by a consumer that rejected two (expired
    card) at once and gave up on one (declined three times): order id -> message id, in the
    DLQ's order (1, 3, then 2 after its retries)."""

    def charge(order: Order, ctx: mqkit.Context) -> None:
        if order.card == "expired":
            raise mqkit.Reject("card expired")
        raise ValueError("card declined")

    with mqkit.Client(url=mqkit_memory.url, service="shop") as client:
        client.producer(Order, queue="orders").publish_many(
            [Order(id=1, card="expired"), Order(id=2, card="declined"), Order(id=3, card="expired")]
        )
        retry = mqkit.RetryPolicy(max_attempts=3, delays=(5,))
        with client.consumer("orders", Order, Recorder(charge), retry=retry):
            mqkit_memory.run_until_idle()
    letters = {m.decode(Order).id: m.message_id or "" for m in mqkit_memory.peek("orders.dlq")}
    assert list(letters) == [1, 3, 2]
    return letters


def test_dlq_list_and_peek_on_a_memory_url(
    mqkit_memory: MemoryBroker, dead_letters: dict[int, str]
) -> None:
    ran = mqkit_cli("dlq", "list", "orders", "--url", mqkit_memory.url)
    assert ran.code == 0, ran.stderr
    assert "orders.dlq: 3 dead letters" in ran.stdout
    for message_id in dead_letters.values():
        assert message_id in ran.stdout
    assert "Reject" in ran.stdout and "ValueError" in ran.stdout

    ran = mqkit_cli("dlq", "peek", "orders", "--json", "--url", mqkit_memory.url)
    assert ran.code == 0, ran.stderr
    letters = json.loads(ran.stdout)
    assert [letter["message_id"] for letter in letters] == list(dead_letters.values())
    by_id = {json.loads(letter["body"])["id"]: letter for letter in letters}
    assert by_id[2]["attempts"] == 3 and by_id[2]["error_type"] == "ValueError"
    assert by_id[1]["error_message"] == "card expired"
    assert mqkit_memory.count("orders.dlq") == 3  # looking removes nothing


def test_dlq_export_writes_json_lines(
    mqkit_memory: MemoryBroker, dead_letters: dict[int, str]
) -> None:
    ran = mqkit_cli("dlq", "export", "orders", "--limit", "2", "--url", mqkit_memory.url)
    assert ran.code == 0, ran.stderr
    lines = [json.loads(line) for line in ran.stdout.splitlines()]
    assert [line["message_id"] for line in lines] == [dead_letters[1], dead_letters[3]]
    assert "exported 2 dead letters from orders.dlq" in ran.stderr
    assert mqkit_memory.count("orders.dlq") == 3


def test_dlq_replay_sends_them_back_and_purge_empties(
    mqkit_memory: MemoryBroker, dead_letters: dict[int, str]
) -> None:
    url = mqkit_memory.url
    refused = mqkit_cli("dlq", "replay", "orders", "--url", url)
    assert refused.code == cli.EXIT_USAGE and "--yes" in refused.stderr

    ran = mqkit_cli(
        "dlq", "replay", "orders", "--message-id", dead_letters[2], "--yes", "--url", url
    )
    assert ran.code == 0, ran.stderr
    assert "replayed 1 dead letter from orders.dlq; 2 left" in ran.stdout
    assert published(mqkit_memory, "orders", Order) == [Order(id=2, card="declined")]
    assert mqkit_memory.count("orders.dlq") == 2

    missing = mqkit_cli("dlq", "replay", "orders", "--message-id", "nope", "--yes", "--url", url)
    assert missing.code == cli.EXIT_NO_MATCH

    ran = mqkit_cli("dlq", "purge", "orders", "--yes", "--url", url)
    assert ran.code == 0, ran.stderr
    assert "purged 2 dead letters from orders.dlq" in ran.stdout
    assert mqkit_memory.count("orders.dlq") == 0
    assert mqkit_memory.count("orders") == 1


def test_dlq_of_a_missing_queue_and_a_wrong_login(mqkit_memory: MemoryBroker) -> None:
    ran = mqkit_cli("dlq", "list", "never-declared", "--url", mqkit_memory.url)
    assert ran.code == cli.EXIT_MISSING, ran.stdout + ran.stderr
    assert "never-declared.dlq" in ran.stderr

    mqkit_memory.users = {}
    ran = mqkit_cli("dlq", "list", "orders", "--url", mqkit_memory.url, "--connect-timeout", "2")
    assert ran.code == cli.EXIT_CONNECT
    assert "credentials" in ran.stderr


def test_the_console_script_says_a_memory_url_names_a_broker_of_its_own() -> None:
    """``mqkit`` run as a command has a process of its own: a memory:// URL there names a new,
    empty broker, and the command says so before it answers."""
    import subprocess
    import sys

    ran = subprocess.run(
        [sys.executable, "-c", "from mqkit.cli import main; main()", "dlq", "list", "orders"],
        env={"MQKIT_URL": "memory://elsewhere", "COLUMNS": "250", "PATH": ""},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "memory:// brokers live inside one Python process" in ran.stderr
    assert "typer.testing.CliRunner" in ran.stderr
    assert ran.returncode == 4  # and the empty broker has no such DLQ
    # In process (the tests' own broker), no such warning.
    assert "live inside one Python process" not in mqkit_cli("dlq", "list", "orders").stderr

"""TLS and EXTERNAL login against a throwaway RabbitMQ node with an amqps listener
(``RabbitNode(tls=True)``, one per module), on both runtimes; and passwords that never show
from a malformed URL given to a client.

Every TLS setup error fails at once, well within ``connect_timeout``, with words that say it
is a TLS problem and what to do.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import time
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from pydantic import BaseModel

import mqkit
from mqkit.testing import RabbitNode

# Generous: a TLS error must fail "at once", never after the whole connect_timeout.
CONNECT_TIMEOUT = 30.0
AT_ONCE = 8.0


class Ping(BaseModel):
    n: int


@pytest.fixture(scope="module")
def node() -> Iterator[RabbitNode]:
    with RabbitNode(f"mqkit-tls-{uuid.uuid4().hex[:4]}", tls=True) as rabbit:
        yield rabbit


@pytest.fixture(scope="module")
def other_ca_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A CA that signed nothing the node has."""
    path = tmp_path_factory.mktemp("other-ca") / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture(scope="module")
def encrypted_key_file(node: RabbitNode, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The node's client key, encrypted with the pass phrase 'right pass phrase'."""
    key = serialization.load_pem_private_key(Path(node.key_file).read_bytes(), None)
    path = tmp_path_factory.mktemp("encrypted") / "key.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"right pass phrase"),
        )
    )
    return str(path)


def tls_settings(node: RabbitNode, **overrides: Any) -> dict[str, Any]:
    """Password login over verified TLS."""
    values: dict[str, Any] = {
        "url": node.amqps_url,
        "ca_file": node.ca_file,
        "connect_timeout": CONNECT_TIMEOUT,
        "queue_type": "classic",
    }
    values.update(overrides)
    return values


def external_settings(node: RabbitNode, **overrides: Any) -> dict[str, Any]:
    """EXTERNAL login with the node's client certificate."""
    values = tls_settings(
        node,
        url=node.external_url,
        cert_file=node.cert_file,
        key_file=node.key_file,
        auth="external",
    )
    values.update(overrides)
    return values


def fails_at_once(rt: Any, **overrides: Any) -> str:
    """Connect with ``overrides``; return the ConnectionFailed text, checking it came at once."""
    started = time.monotonic()
    with pytest.raises(mqkit.ConnectionFailed) as info, rt.client(**overrides):
        pass
    took = time.monotonic() - started
    assert took < AT_ONCE, f"took {took:.1f}s: retried instead of failing at once"
    text = str(info.value)
    assert "is RabbitMQ running" not in text  # not the words for an unreachable broker
    return text


def connections(node: RabbitNode, service: str) -> list[list[str]]:
    """``service``'s client connections on the node: [user, auth_mechanism, ssl].

    Only that client's own (its connection name carries the service name): a connection an
    earlier test left closing must not count.
    """
    out = node.ctl(
        "list_connections",
        "user",
        "auth_mechanism",
        "ssl",
        "client_properties",
        "--quiet",
        "--no-table-headers",
    )
    rows = [line.split("\t", 3) for line in out.splitlines() if line.strip()]
    return [row[:3] for row in rows if len(row) == 4 and f"mqkit:{service} (" in row[3]]


def delete_queues(node: RabbitNode, prefix: str) -> None:
    """Delete every queue on the node whose name starts with ``prefix``."""
    out = node.ctl("list_queues", "name", "--quiet", "--no-table-headers")
    doomed = [name for name in out.split() if name.startswith(prefix)]
    if not doomed:
        return
    connection = pika.BlockingConnection(pika.URLParameters(node.url))
    try:
        channel = connection.channel()
        for name in doomed:
            channel.queue_delete(name)
    finally:
        connection.close()


def round_trip(client: Any, queue: str, collector: Any) -> None:
    received = collector()
    consumer = client.consumer(queue, Ping, received)
    consumer.start()
    client.producer(Ping, queue=queue).publish(Ping(n=7))
    assert received.wait(1, timeout=15) == [Ping(n=7)]
    consumer.stop()


# -- TLS that works ------------------------------------------------------------------------------


def test_verified_tls_round_trip(rt: Any, node: RabbitNode, names: Any, collector: Any) -> None:
    queue = names.queue()
    try:
        with rt.client(**tls_settings(node, service=queue)) as client:
            round_trip(client, queue, collector)
            assert client.health().url.startswith("amqps://guest:***@127.0.0.1:")
            assert connections(node, queue) == [["guest", "PLAIN", "true"]] * 2
    finally:
        delete_queues(node, queue)


def test_external_login_with_the_client_certificate(
    rt: Any, node: RabbitNode, names: Any, collector: Any
) -> None:
    queue = names.queue()
    try:
        with rt.client(**external_settings(node, service=queue)) as client:
            round_trip(client, queue, collector)
            seen = connections(node, queue)
            # Both of the client's connections (publishing, consuming) logged in with the
            # certificate: the URL names no user, and neither fell back to guest/guest.
            assert seen == [[node.client_user, "EXTERNAL", "true"]] * 2, seen
    finally:
        delete_queues(node, queue)


def test_an_encrypted_key_with_key_password(
    rt: Any, node: RabbitNode, encrypted_key_file: str
) -> None:
    settings = external_settings(
        node, key_file=encrypted_key_file, key_password="right pass phrase"
    )
    with rt.client(**settings) as client:
        assert client.health().connected


# -- TLS setup errors: at once, and saying so ---------------------------------------------------


def test_a_missing_ca_file(rt: Any, node: RabbitNode) -> None:
    text = fails_at_once(rt, **tls_settings(node, ca_file="/nonexistent/ca.pem"))
    assert "TLS setup failed" in text
    assert "ca_file '/nonexistent/ca.pem' cannot be read" in text and "MQKIT_CA_FILE" in text


def test_a_ca_that_did_not_sign_the_broker_certificate(
    rt: Any, node: RabbitNode, other_ca_file: str
) -> None:
    text = fails_at_once(rt, **tls_settings(node, ca_file=other_ca_file))
    assert "TLS certificate verification failed" in text
    assert "set ca_file to the CA that signed it" in text


def test_plain_amqp_to_the_tls_port(rt: Any, node: RabbitNode) -> None:
    url = f"amqp://guest:guest@127.0.0.1:{node.tls_port}/"
    text = fails_at_once(rt, **tls_settings(node, url=url))
    assert "that port speaks TLS" in text and "use amqps://" in text


def test_tls_to_the_plain_port(rt: Any, node: RabbitNode) -> None:
    url = f"amqps://guest:guest@127.0.0.1:{node.port}/"
    text = fails_at_once(rt, **tls_settings(node, url=url))
    assert "the TLS handshake failed" in text and "does not speak TLS" in text


def test_a_key_that_is_not_the_certificates(rt: Any, node: RabbitNode) -> None:
    _cert, other_key = node.issue_client_cert(f"other-{uuid.uuid4().hex[:4]}")
    text = fails_at_once(rt, **external_settings(node, key_file=other_key))
    assert "TLS setup failed" in text and "is not the private key of cert_file" in text


def test_an_encrypted_key_without_or_with_a_wrong_key_password(
    rt: Any, node: RabbitNode, encrypted_key_file: str
) -> None:
    text = fails_at_once(rt, **external_settings(node, key_file=encrypted_key_file))
    assert "is encrypted and no key_password is set" in text and "MQKIT_KEY_PASSWORD" in text
    wrong = external_settings(node, key_file=encrypted_key_file, key_password="Wr0ng-PW")
    text = fails_at_once(rt, **wrong)
    assert "key_password does not decrypt key_file" in text and "Wr0ng-PW" not in text


def test_an_encrypted_key_never_prompts_with_stdin_closed(
    rt: Any, node: RabbitNode, encrypted_key_file: str
) -> None:
    """OpenSSL would ask for the pass phrase on the terminal (and block there); in a process
    with stdin closed and no controlling terminal, connecting still fails at once, saying
    what to set."""
    settings = external_settings(node, key_file=encrypted_key_file, connect_timeout=20)
    code = textwrap.dedent(
        f"""
        import asyncio, sys
        import mqkit

        settings = mqkit.Settings(**{settings!r})

        async def run_async():
            async with mqkit.AsyncClient(settings):
                pass

        try:
            if {rt.is_async!r}:
                asyncio.run(run_async())
            else:
                with mqkit.Client(settings):
                    pass
        except mqkit.ConnectionFailed as exc:
            print(exc)
            sys.exit(3)
        """
    )
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", code],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,  # no controlling terminal to prompt on
        check=False,
    )
    assert time.monotonic() - started < 30
    assert done.returncode == 3, done.stderr
    assert "is encrypted and no key_password is set" in done.stdout
    assert "pass phrase:" not in done.stderr.lower()  # OpenSSL's prompt


# -- EXTERNAL: explicit, and clear when refused ---------------------------------------------------


def test_external_with_a_certificate_of_an_unknown_user(rt: Any, node: RabbitNode) -> None:
    cert, key = node.issue_client_cert(f"nobody-{uuid.uuid4().hex[:4]}")
    text = fails_at_once(rt, **external_settings(node, cert_file=cert, key_file=key))
    assert "refused the EXTERNAL login" in text and "that user must exist" in text


def test_a_client_certificate_with_a_url_without_user_is_refused(rt: Any, node: RabbitNode) -> None:
    """Without auth='external', such a client logged in as guest/guest."""
    settings = external_settings(node, auth="plain")
    with pytest.raises(mqkit.ConfigError) as info:
        rt.make_client(**settings)
    assert "guest/guest" in str(info.value) and "auth='external'" in str(info.value)


@pytest.mark.parametrize(
    "query",
    [
        "ssl_options=%7B%27cert_reqs%27%3A0%7D",  # pika: TLS without verification
        "auth=external",  # aiormq
        "auth_mechanism=EXTERNAL",
        "cafile=%2Ftmp%2Fca.pem",
        "no_verify_ssl=1",
    ],
)
def test_url_parameters_that_change_tls_or_auth_are_refused(
    rt: Any, node: RabbitNode, query: str
) -> None:
    with pytest.raises(mqkit.ConfigError) as info:
        rt.make_client(**tls_settings(node, url=f"{node.amqps_url}?{query}"))
    text = str(info.value)
    assert "TLS or authentication" in text and "ca_file" in text and "auth" in text


# -- passwords in malformed URLs -------------------------------------------------------------------

HALVES = ("Kx7q", "ZEBRA-7731")


def _everything_shown(error: BaseException) -> str:
    parts = ["".join(traceback.format_exception(error))]
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        parts += [str(current), repr(current)]
        todo += [current.__cause__, current.__context__]
    return "\n".join(parts)


@pytest.mark.parametrize("separator", [" ", "@", ","], ids=["space", "at", "comma"])
def test_a_client_given_a_malformed_url_never_shows_the_password(
    rt: Any, separator: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"amqp://probe:{separator.join(HALVES)}@127.0.0.1:5672/"
    caplog.set_level(logging.DEBUG)
    with pytest.raises(mqkit.ConfigError) as info:
        rt.make_client(url=url)
    shown = _everything_shown(info.value) + "\n".join(r.getMessage() for r in caplog.records)
    for half in HALVES:
        assert half not in shown
    assert "percent-encoded" in str(info.value)
    assert "urllib.parse.quote(password, safe='')" in str(info.value)

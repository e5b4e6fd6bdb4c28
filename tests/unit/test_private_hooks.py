"""The private parts of aiormq and pika the shells rely on, pinned: if an upgrade removes
them, these fail loudly instead of a shell quietly losing a feature.

- ``_watch_blocked`` wraps aiormq's handlers of connection.blocked / unblocked (aiormq has
  no callback for them): without them ``health()`` cannot report a broker alarm.
- The pipelined ``publish_many`` writes frames with aiormq's own confirm bookkeeping and
  checks the channel's close event (``is_closed`` lags behind a close-ok): without them it
  falls back to the slower one-task-per-message path.
- The blocking client drops a connection the broker no longer answers (it blocks it during an
  alarm) with pika's ``_adapter_disconnect_stream``: without it, closing waits in vain.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiormq
from pamqp import commands as spec

from mqkit._async import connection as async_connection
from mqkit._async import publisher as async_publisher


def test_aiormq_still_has_the_connection_blocked_handlers() -> None:
    for name in async_connection._BLOCKED_HOOKS:
        assert callable(getattr(aiormq.Connection, name, None)), (
            f"aiormq.Connection.{name} is gone: mqkit cannot see connection.blocked any more "
            f"(aiormq {aiormq.__version__}); update mqkit._async.connection._watch_blocked"
        )


def test_aiormq_still_has_what_the_pipelined_publish_uses() -> None:
    # Instance attributes are set in Channel.__init__: look for them in its source.
    import inspect

    source = inspect.getsource(aiormq.Channel)
    for name in async_publisher._PIPELINE_ATTRS:
        short = name.replace("_Channel__", "__")
        assert hasattr(aiormq.Channel, name) or f"self.{short}" in source, (
            f"aiormq.Channel no longer has {name} (aiormq {aiormq.__version__}): the "
            "pipelined publish_many falls back to one task per message"
        )


class _FakeUnderlay:
    def __init__(self, connection: Any) -> None:
        self.connection = connection


class _FakeAmqp:
    """Stands in for an aiormq Connection: the two private handlers, recording calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def _Connection__handle_connection_blocked(self, frame: Any) -> None:
        self.calls.append("blocked")

    async def _Connection__handle_connection_unblocked(self, frame: Any) -> None:
        self.calls.append("unblocked")


class _FakeConnection:
    def __init__(self, amqp: Any) -> None:
        self.transport = _FakeUnderlay(amqp)


def test_watching_a_connection_reports_block_and_unblock_after_aiormq_did() -> None:
    amqp = _FakeAmqp()
    connection: Any = _FakeConnection(amqp)
    seen: list[tuple[str, Any]] = []
    assert async_connection._watch_blocked(
        connection,
        lambda conn, reason: seen.append((reason, conn)),
        lambda conn: seen.append(("unblocked", conn)),
    )

    async def frames() -> None:
        await amqp._Connection__handle_connection_blocked(
            spec.Connection.Blocked(reason="low on memory")
        )
        await amqp._Connection__handle_connection_unblocked(spec.Connection.Unblocked())

    asyncio.run(frames())
    assert amqp.calls == ["blocked", "unblocked"]  # aiormq's own handling still runs
    assert seen == [("low on memory", connection), ("unblocked", connection)]


def test_a_connection_without_the_handlers_is_not_watched() -> None:
    connection: Any = _FakeConnection(object())
    assert not async_connection._watch_blocked(connection, print, print)


def test_pika_still_has_the_call_that_drops_a_connection_at_once() -> None:
    from pika.adapters.base_connection import BaseConnection

    assert callable(getattr(BaseConnection, "_adapter_disconnect_stream", None)), (
        "pika's BaseConnection._adapter_disconnect_stream is gone: Client.close() waits for a "
        "close-ok a blocked connection never gets, and leaves its socket open"
    )

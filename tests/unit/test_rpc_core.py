"""Request/reply as plain decisions (mqkit.rpc)."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel

from mqkit.errors import DecodeError, RemoteError, RequestTimeout
from mqkit.messages import Incoming
from mqkit.retry import GiveUp
from mqkit.rpc import (
    ERROR_REPLY_TYPE,
    REPLY_TO,
    answer,
    read_reply,
    request_envelope,
    request_timeout,
)


class Add(BaseModel):
    a: int
    b: int


class Sum(BaseModel):
    total: int


def _request(**overrides: object) -> Incoming:
    values: dict[str, object] = {
        "body": b'{"a": 1, "b": 2}',
        "delivery_tag": 1,
        "correlation_id": "corr-1",
        "reply_to": REPLY_TO,
    }
    values.update(overrides)
    return Incoming(**values)  # type: ignore[arg-type]


def test_request_envelope() -> None:
    envelope = request_envelope(Add(a=1, b=2), service="web", correlation_id="c-1")
    assert envelope.reply_to == "amq.rabbitmq.reply-to"
    assert (envelope.correlation_id, envelope.app_id) == ("c-1", "web")
    with pytest.raises(TypeError, match="request expected a pydantic model, got dict"):
        request_envelope({"a": 1}, service="web", correlation_id="c-1")


def test_request_timeout_names_queue_and_timeout() -> None:
    error = request_timeout("adder", 0.5)
    assert isinstance(error, RequestTimeout)
    assert str(error) == "no reply from queue 'adder' within 0.5s; is a responder running?"


def test_a_result_is_the_reply() -> None:
    reply = answer("adder", _request(), service="calc", result=Sum(total=3))
    assert reply is not None and reply.reply_to == REPLY_TO
    assert reply.envelope.correlation_id == "corr-1"
    assert reply.envelope.app_id == "calc"
    assert read_reply(reply.envelope.headers, reply.envelope.body, Sum) == Sum(total=3)


@pytest.mark.parametrize(
    ("failure", "result", "error_type", "message"),
    [
        (ValueError("negative"), None, "ValueError", "negative"),
        (GiveUp("DecodeError", "body is not valid JSON", 1), None, "DecodeError", "valid JSON"),
        (None, 42, "TypeError", "responder for 'adder' returned int; return a pydantic model"),
    ],
)
def test_failures_are_error_replies(failure, result, error_type, message) -> None:
    reply = answer("adder", _request(), service="calc", result=result, failure=failure)
    assert reply is not None
    envelope = reply.envelope
    assert envelope.type == ERROR_REPLY_TYPE and envelope.correlation_id == "corr-1"
    assert envelope.headers["x-mqkit-error-type"] == error_type
    assert message in envelope.headers["x-mqkit-error-message"]
    assert json.loads(envelope.body)["error_type"] == error_type  # readable by non-mqkit callers
    with pytest.raises(RemoteError) as info:
        read_reply(envelope.headers, envelope.body, Sum)
    assert info.value.error_type == error_type and message in info.value.error_message


def test_no_reply_to_means_no_reply() -> None:
    assert answer("adder", _request(reply_to=None), service="calc", result=Sum(total=1)) is None


def test_read_reply_decodes_bytes_headers_and_bad_bodies() -> None:
    headers = {"x-mqkit-error-type": b"KeyError", "x-mqkit-error-message": b"'sku'"}
    with pytest.raises(RemoteError, match="KeyError"):
        read_reply(headers, b"{}", Sum)
    with pytest.raises(DecodeError, match="Sum"):
        read_reply(None, b'{"nope": 1}', Sum)

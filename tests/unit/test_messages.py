"""Messages: the Event registry, the envelope (wire format) and decoding errors."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from pydantic import BaseModel, field_validator

from mqkit.errors import DecodeError, MqkitError
from mqkit.messages import (
    CONTENT_TYPE,
    Event,
    Incoming,
    decode,
    decode_event,
    encode,
    event_class,
    to_datetime,
    type_name,
)


class ChargeCard(BaseModel):
    order_id: str
    amount: Decimal


class UnitOrderPlaced(Event, event_type="unit.orders.placed"):
    order_id: str
    total: Decimal


class UnitCacheCleared(Event):
    key: str


def test_event_type_keyword_and_default() -> None:
    assert UnitOrderPlaced.event_type == "unit.orders.placed"
    assert UnitCacheCleared.event_type == "UnitCacheCleared"
    assert issubclass(UnitOrderPlaced, BaseModel)
    # event_type is a class attribute, not a field on the wire.
    assert "event_type" not in UnitOrderPlaced.model_fields


def test_events_register_by_event_type() -> None:
    assert event_class("unit.orders.placed") is UnitOrderPlaced
    assert event_class("UnitCacheCleared") is UnitCacheCleared
    assert event_class("unit.nobody.defined.this") is None


def test_redefining_an_event_type_replaces_the_registration() -> None:
    class First(Event, event_type="unit.redefined"):
        a: int

    class Second(Event, event_type="unit.redefined"):
        b: int

    assert event_class("unit.redefined") is Second
    assert First.event_type == Second.event_type == "unit.redefined"


def test_type_name() -> None:
    assert type_name(ChargeCard) == "ChargeCard"
    assert type_name(UnitOrderPlaced) == "unit.orders.placed"


def test_encode_sets_the_wire_format() -> None:
    before = int(time.time())
    envelope = encode(ChargeCard(order_id="42", amount=Decimal("9.90")), service="billing")
    after = int(time.time())
    assert envelope.content_type == CONTENT_TYPE == "application/json"
    assert envelope.delivery_mode == 2
    assert envelope.app_id == "billing"
    assert envelope.type == "ChargeCard"
    assert before <= envelope.timestamp <= after
    assert isinstance(envelope.message_id, str) and len(envelope.message_id) >= 16
    assert envelope.correlation_id is None
    assert envelope.headers == {}
    assert envelope.priority is None and envelope.expiration is None
    # A plain JSON body: no wrapper, nothing pickled; Decimal stays exact.
    assert json.loads(envelope.body) == {"order_id": "42", "amount": "9.90"}


def test_encode_message_ids_are_unique_unless_given() -> None:
    message = ChargeCard(order_id="1", amount=Decimal(1))
    ids = {encode(message, service="s").message_id for _ in range(100)}
    assert len(ids) == 100
    assert encode(message, service="s", message_id="mine").message_id == "mine"


def test_encode_event_uses_event_type_and_options() -> None:
    headers = {"tenant": "acme"}
    envelope = encode(
        UnitOrderPlaced(order_id="7", total=Decimal("1.5")),
        service="shop",
        headers=headers,
        correlation_id="corr-1",
        reply_to="replies",
        priority=5,
        expiration=1.5,
    )
    assert envelope.type == "unit.orders.placed"
    assert envelope.headers == {"tenant": "acme"}
    assert envelope.headers is not headers  # a copy: the caller's dict is not shared
    assert envelope.correlation_id == "corr-1"
    assert envelope.reply_to == "replies"
    assert envelope.priority == 5
    assert envelope.expiration == 1500  # milliseconds, as AMQP carries it
    assert json.loads(envelope.body) == {"order_id": "7", "total": "1.5"}


def test_decode_round_trip() -> None:
    original = ChargeCard(order_id="42", amount=Decimal("9.90"))
    decoded = decode(encode(original, service="s").body, ChargeCard)
    assert decoded == original
    assert isinstance(decoded.amount, Decimal)


@pytest.mark.parametrize("body", [b"{not json", b"", b"{'order_id': '1'}", b'{"order_id": "1",'])
def test_decode_malformed_json(body: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        decode(body, ChargeCard)
    text = str(info.value)
    assert "not valid JSON" in text
    assert "ChargeCard" in text
    assert isinstance(info.value, MqkitError)
    assert info.value.__cause__ is not None


def test_decode_schema_invalid_names_the_fields() -> None:
    with pytest.raises(DecodeError) as info:
        decode(b'{"order_id": 5, "amount": "lots"}', ChargeCard)
    text = str(info.value)
    assert "does not match ChargeCard" in text
    assert "order_id" in text and "amount" in text


def test_decode_missing_field() -> None:
    with pytest.raises(DecodeError, match="amount"):
        decode(b'{"order_id": "1"}', ChargeCard)


def test_decode_wrong_json_shape() -> None:
    with pytest.raises(DecodeError, match="ChargeCard"):
        decode(b"[1, 2, 3]", ChargeCard)


@pytest.mark.parametrize("body", [b"\xff\xfe\x00", b'{"order_id": "\xff", "amount": 1}'])
def test_decode_non_utf8_body(body: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        decode(body, ChargeCard)
    text = str(info.value)
    assert "ChargeCard" in text
    assert "JSON" in text or "UTF" in text.upper()


def test_decode_event_by_type() -> None:
    body = UnitOrderPlaced(order_id="1", total=Decimal(2)).model_dump_json().encode()
    event = decode_event(body, "unit.orders.placed")
    assert isinstance(event, UnitOrderPlaced)
    assert event.order_id == "1"


@pytest.mark.parametrize("event_type", ["unit.unknown.type", None])
def test_decode_event_unknown_type(event_type: str | None) -> None:
    with pytest.raises(DecodeError) as info:
        decode_event(b"{}", event_type)
    assert repr(event_type) in str(info.value)
    assert "registered" in str(info.value)


def test_decode_event_invalid_body_for_known_type() -> None:
    with pytest.raises(DecodeError, match="UnitOrderPlaced"):
        decode_event(b'{"order_id": "1"}', "unit.orders.placed")


def _incoming(**overrides: object) -> Incoming:
    values: dict[str, object] = {
        "body": b'{"order_id": "1", "amount": "2"}',
        "delivery_tag": 7,
        "message_id": "mid-1",
        "correlation_id": "corr-1",
        "reply_to": "amq.rabbitmq.reply-to.x",
        "type": "ChargeCard",
        "app_id": "shop",
        "content_type": "application/json",
        "timestamp": datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc),
        "headers": {"tenant": "acme", "mqkit-attempt": 1},
        "priority": 3,
        "expiration": "60000",
        "exchange": "orders",
        "routing_key": "orders.new",
    }
    values.update(overrides)
    return Incoming(**values)  # type: ignore[arg-type]


def test_republished_keeps_ids_and_properties() -> None:
    incoming = _incoming()
    envelope = incoming.republished({"mqkit-attempt": 2, "x-mqkit-error-type": "ValueError"})
    assert envelope.body == incoming.body
    assert envelope.message_id == "mid-1"
    assert envelope.correlation_id == "corr-1"
    assert envelope.reply_to == "amq.rabbitmq.reply-to.x"
    assert envelope.type == "ChargeCard"
    assert envelope.app_id == "shop"
    assert envelope.priority == 3
    assert envelope.content_type == "application/json"
    assert envelope.delivery_mode == 2
    assert envelope.timestamp == int(incoming.timestamp.timestamp())  # type: ignore[union-attr]
    # New headers win, the publisher's stay.
    assert envelope.headers == {
        "tenant": "acme",
        "mqkit-attempt": 2,
        "x-mqkit-error-type": "ValueError",
    }
    # A copy must not expire while it waits in a retry queue or a DLQ.
    assert envelope.expiration is None
    # The delivery's own headers are not modified.
    assert incoming.headers == {"tenant": "acme", "mqkit-attempt": 1}


def test_republished_drops_none_headers_and_fills_gaps() -> None:
    incoming = _incoming(message_id=None, timestamp=None, content_type=None, type=None)
    envelope = incoming.republished({"tenant": None, "extra": "x"})
    assert envelope.headers == {"mqkit-attempt": 1, "extra": "x"}
    assert envelope.message_id  # a plain client may send none; the copy still gets one
    assert abs(envelope.timestamp - time.time()) < 5
    assert envelope.content_type == "application/json"


def test_to_datetime() -> None:
    assert to_datetime(None) is None
    from_int = to_datetime(1_700_000_000)
    assert from_int == datetime(2023, 11, 14, 22, 13, 20, tzinfo=timezone.utc)
    naive = to_datetime(datetime(2024, 1, 1, 0, 0, 0))
    assert naive is not None and naive.utcoffset() == timedelta(0)
    aware = datetime(2024, 1, 1, tzinfo=timezone(timedelta(hours=2)))
    assert to_datetime(aware) is aware


def test_to_datetime_reads_what_pamqp_reads_and_nothing_it_cannot() -> None:
    # pika hands the timestamp property over as an int; pamqp as a datetime, reading a value
    # above 2**32 as milliseconds. to_datetime does the same, so both runtimes agree.
    assert to_datetime(1_700_000_000_000) == datetime(2023, 11, 14, 22, 13, 20, tzinfo=timezone.utc)
    assert to_datetime(2**32) == datetime.fromtimestamp(2**32 / 1000, tz=timezone.utc)
    # Beyond the year 9999, or not a number at all: no timestamp, never an error.
    for hostile in (2**62, 2**64 - 1, 253_402_300_800_000, -1, "soon", b"\xff", [1], 1e300):
        assert to_datetime(hostile) is None
    last = to_datetime(253_402_300_799_999)  # the last millisecond (as a float, like pamqp)
    assert last is not None and last.year == 9999 and last.second == 59


def test_incoming_turns_bytes_from_the_wire_into_text() -> None:
    # pika hands a short string that is not UTF-8 over as bytes, header names too.
    incoming = _incoming(
        message_id=b"\xff-id",
        type=b"orders.\xfe",
        app_id=b"shop",
        headers={b"\xffkey": 1, "ok": b"\xff"},
    )
    assert incoming.message_id == "\ufffd-id"
    assert incoming.type == "orders.\ufffd"
    assert incoming.app_id == "shop"
    assert incoming.headers == {"\ufffdkey": 1, "ok": b"\xff"}  # values are left alone
    long_key = _incoming(headers={b"\xff" * 200: 1})
    [name] = long_key.headers
    assert len(name.encode()) <= 255  # still a valid short string when copied


def test_republished_headers_are_encodable_by_both_clients() -> None:
    # pika reads a double as an int (of any size); pamqp writes floats as single precision.
    incoming = _incoming(
        headers={
            "huge": 10**300,
            "fine": 2**63 - 1,
            "float": 1e300,
            "small": 1.5,
            "nested": {"deep": [10**30, "x"]},
            "decimal": Decimal("1.25"),
            "flag": True,
        }
    )
    headers = incoming.republished({}).headers
    assert headers["huge"] == str(10**300)
    assert headers["fine"] == 2**63 - 1
    assert headers["float"] == "1e+300"
    assert headers["small"] == 1.5
    assert headers["nested"] == {"deep": [str(10**30), "x"]}
    assert headers["decimal"] == Decimal("1.25")
    assert headers["flag"] is True


class Strict(BaseModel):
    order_id: str

    @field_validator("order_id")
    @classmethod
    def _no_type_errors_here(cls, value: str) -> str:
        if value == "boom":
            raise TypeError("validator exploded")  # pydantic does not wrap a TypeError
        return value


def test_decode_turns_any_exception_of_a_validator_into_a_decode_error() -> None:
    with pytest.raises(DecodeError) as info:
        decode(b'{"order_id": "boom"}', Strict)
    assert "TypeError" in str(info.value) and "validator exploded" in str(info.value)
    assert "Strict" in str(info.value)
    assert isinstance(info.value.__cause__, TypeError)

"""Content headers the client libraries cannot decode, repaired (mqkit.wire and the two
per-connection hooks that run it)."""

from __future__ import annotations

import asyncio
import struct
from datetime import datetime, timezone
from typing import Any

import aio_pika
import pika
import pika.frame
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pamqp import frame as pamqp_frame
from pika.adapters.select_connection import SelectConnection
from yarl import URL

from mqkit._async import lenient as async_lenient
from mqkit._sync.lenient import LenientSelectConnection, repair_buffer
from mqkit.wire import MAX_MILLIS, MAX_SECONDS, PAMQP, PIKA, repair_frame, repair_header

PLACEHOLDER = datetime(2001, 9, 9, 1, 46, 40, tzinfo=timezone.utc)  # 1_000_000_000 s
PLACEHOLDER_BYTES = b"T" + struct.pack(">Q", 1_000_000_000)
HUGE = 2**62


class RawProperties(pika.BasicProperties):
    """BasicProperties whose encoded bytes get ``patches`` (old, new) applied: how a test
    makes a content header pika would never write (a T header value of any size)."""

    def __init__(self, *, patches: tuple[tuple[bytes, bytes], ...] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._patches = patches

    def encode(self) -> list[bytes]:
        blob = b"".join(super().encode())
        for old, new in self._patches:
            assert old in blob, old
            blob = blob.replace(old, new)
        return [blob]


def stamp(value: int) -> tuple[bytes, bytes]:
    """A patch that turns every PLACEHOLDER header value into the raw T value ``value``."""
    return PLACEHOLDER_BYTES, b"T" + struct.pack(">Q", value)


def header_frame(properties: pika.BasicProperties, channel: int = 1) -> bytes:
    return pika.frame.Header(channel, 3, properties).marshal()


def decoded_by_pika(frame: bytes) -> pika.BasicProperties:
    consumed, decoded = pika.frame.decode_frame(frame)
    assert consumed == len(frame)
    return decoded.properties  # type: ignore[union-attr]


def decoded_by_pamqp(frame: bytes) -> Any:
    consumed, _channel, decoded = pamqp_frame.unmarshal(frame)
    assert consumed == len(frame)
    return decoded.properties


HOSTILE = RawProperties(
    content_type="application/json",
    message_id="hostile-1",
    timestamp=HUGE,
    headers={"when": PLACEHOLDER, "nested": {"list": [PLACEHOLDER, 1, "x"]}, "n": 7},
    patches=(stamp(HUGE),),
)


def test_the_hostile_frame_breaks_both_libraries() -> None:
    # What the repair is for (if a library learns to decode these, this test says so).
    frame = header_frame(HOSTILE)
    with pytest.raises((ValueError, OverflowError, OSError)):
        pika.frame.decode_frame(frame)
    with pytest.raises(Exception, match="out of range"):
        pamqp_frame.unmarshal(frame)


def test_repaired_for_pika_keeps_the_raw_values_as_integers() -> None:
    repaired = repair_frame(header_frame(HOSTILE, channel=5), PIKA)
    assert repaired is not None
    frame, channel, repair = repaired
    assert channel == 5
    assert repair.message_id == "hostile-1"
    assert len(repair.changes) == 2 and all("beyond the year 9999" in c for c in repair.changes)
    props = decoded_by_pika(frame)
    assert props.headers == {"when": HUGE, "nested": {"list": [HUGE, 1, "x"]}, "n": 7}
    assert props.timestamp == HUGE  # pika hands the property over as an int: left alone
    assert props.message_id == "hostile-1" and props.content_type == "application/json"


def test_repaired_for_pamqp_drops_the_timestamp_property() -> None:
    repaired = repair_frame(header_frame(HOSTILE), PAMQP)
    assert repaired is not None
    frame, _channel, repair = repaired
    assert any("property timestamp" in c and "dropped" in c for c in repair.changes)
    props = decoded_by_pamqp(frame)
    assert props.timestamp is None
    assert props.headers == {"when": HUGE, "nested": {"list": [HUGE, 1, "x"]}, "n": 7}
    assert props.message_id == "hostile-1" and props.content_type == "application/json"


def test_a_value_beyond_int64_is_capped() -> None:
    props = RawProperties(headers={"when": PLACEHOLDER}, patches=(stamp(2**64 - 1),))
    repaired = repair_frame(header_frame(props), PAMQP)
    assert repaired is not None
    assert decoded_by_pamqp(repaired[0]).headers == {"when": 2**63 - 1}


@pytest.mark.parametrize(
    ("value", "pika_repairs", "pamqp_repairs"),
    [
        (1_700_000_000, False, False),  # seconds
        (1_700_000_000_000, True, False),  # milliseconds: pamqp reads them, pika cannot
        (MAX_SECONDS, False, False),
        (MAX_SECONDS + 1, True, False),
        (MAX_MILLIS, True, False),
        (MAX_MILLIS + 1, True, True),
    ],
)
def test_only_what_a_library_cannot_decode_is_changed(
    value: int, pika_repairs: bool, pamqp_repairs: bool
) -> None:
    frame = header_frame(RawProperties(headers={"when": PLACEHOLDER}, patches=(stamp(value),)))
    assert (repair_frame(frame, PIKA) is not None) is pika_repairs
    assert (repair_frame(frame, PAMQP) is not None) is pamqp_repairs
    for codec, decode in ((PIKA, decoded_by_pika), (PAMQP, decoded_by_pamqp)):
        repaired = repair_frame(frame, codec)
        decode(repaired[0] if repaired else frame)  # decodes either way


def test_text_that_is_not_utf8_is_repaired_for_pamqp_only() -> None:
    props = RawProperties(
        message_id="MSGID",
        type="TYPE1",
        headers={"kkkk": "v"},
        patches=(
            (b"\x05MSGID", b"\x05\xff\xfe-id"),
            (b"\x05TYPE1", b"\x05ty\xffpe"),
            (b"\x04kkkk", b"\x04k\xffkk"),
        ),
    )
    frame = header_frame(props)
    with pytest.raises(Exception, match="codec can't decode"):
        pamqp_frame.unmarshal(frame)
    assert repair_frame(frame, PIKA) is None  # pika hands over bytes; Incoming makes text
    repaired = repair_frame(frame, PAMQP)
    assert repaired is not None
    decoded = decoded_by_pamqp(repaired[0])
    assert decoded.message_id == "\ufffd\ufffd-id"
    assert decoded.message_type == "ty\ufffdpe"
    assert decoded.headers == {"k\ufffdkk": "v"}
    assert repaired[2].message_id == "\ufffd\ufffd-id"


def test_a_long_key_that_is_not_utf8_stays_a_short_string() -> None:
    key = "k" * 200
    bad = b"\xff" * 200
    props = RawProperties(headers={key: 1}, patches=((key.encode(), bad),))
    repaired = repair_frame(header_frame(props), PAMQP)
    assert repaired is not None
    [name] = decoded_by_pamqp(repaired[0]).headers
    assert len(name.encode()) <= 255 and set(name) == {"\ufffd"}


def test_clean_frames_and_other_frames_are_left_alone() -> None:
    clean = RawProperties(
        content_type="application/json",
        message_id="m1",
        timestamp=1_700_000_000,
        headers={"mqkit-attempt": 2, "x-mqkit-original-exchange": "ex", "Tenant": "T"},
    )
    frame = header_frame(clean)
    assert repair_frame(frame, PAMQP) is None
    assert repair_frame(frame, PIKA) is None
    body = pika.frame.Body(1, b"T" * 20).marshal()
    assert repair_frame(body, PAMQP) is None
    assert repair_header(b"\x00\x3c", PAMQP) is None  # truncated: the library says what
    assert repair_frame(frame[:-1] + b"\x00", PAMQP) is None  # bad frame end: not ours


def test_the_sync_hook_repairs_the_first_frame_of_pikas_buffer() -> None:
    frame = header_frame(HOSTILE)
    rest = pika.frame.Body(1, b"abc").marshal()
    repaired = repair_buffer(frame + rest)
    assert repaired is not None and repaired.endswith(rest)
    consumed, decoded = pika.frame.decode_frame(repaired)
    assert decoded.properties.headers["when"] == HUGE  # type: ignore[union-attr]
    assert repaired[consumed:] == rest
    assert repair_buffer(rest + frame) is None  # a body frame first: nothing to do
    assert repair_buffer(frame[:20]) is None  # incomplete: pika waits for more


def test_the_sync_hook_uses_pikas_frame_reading_as_tested() -> None:
    # LenientSelectConnection overrides pika internals; if pika renames them, this fails.
    assert "_read_frame" in vars(pika.connection.Connection)
    assert issubclass(LenientSelectConnection, SelectConnection)
    connection = LenientSelectConnection.__new__(LenientSelectConnection)
    connection._frame_buffer = header_frame(HOSTILE)  # type: ignore[attr-defined]
    consumed, decoded = connection._read_frame()  # type: ignore[attr-defined]
    assert consumed == len(connection._frame_buffer)  # type: ignore[attr-defined]
    assert decoded.properties.headers["when"] == HUGE
    connection._frame_buffer = b"\x02\x00\x01\x00\x00\x00\x02\x00\x3c\xce"  # type: ignore[attr-defined]
    with pytest.raises(struct.error):  # not repairable: pika's own error, as before
        connection._read_frame()  # type: ignore[attr-defined]


def test_the_async_hook_is_supported_by_this_aiormq() -> None:
    assert async_lenient.supported()


def _filtered(chunks: list[bytes]) -> bytes:
    out: list[bytes] = []
    frames = async_lenient.FrameFilter(out.append)
    for chunk in chunks:
        frames.feed_data(chunk)
    return b"".join(out)


def test_the_async_filter_repairs_content_headers_in_the_byte_stream() -> None:
    header = header_frame(HOSTILE)
    body = pika.frame.Body(1, b"hello").marshal()
    repaired = repair_frame(header, PAMQP)
    assert repaired is not None
    assert _filtered([header + body]) == repaired[0] + body
    decoded = decoded_by_pamqp(repaired[0])
    assert decoded.timestamp is None and decoded.headers["when"] == HUGE


def test_the_async_filter_passes_clean_chunks_on_uncopied() -> None:
    clean = header_frame(RawProperties(message_id="m", headers={"a": 1}))
    chunk = (pika.frame.Body(1, b"x" * 50).marshal() + clean) * 3
    out: list[bytes] = []
    async_lenient.FrameFilter(out.append).feed_data(chunk)
    assert out == [chunk] and out[0] is chunk


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(0, 400), max_size=12))
def test_the_async_filter_copes_with_any_chunking(cuts: list[int]) -> None:
    # The socket hands over chunks cut anywhere: inside a head, a header, a body.
    hostile, clean = header_frame(HOSTILE), header_frame(RawProperties(message_id="m"))
    body = pika.frame.Body(1, b"0123456789" * 7).marshal()
    stream = body + hostile + body + clean + hostile + body
    repaired = repair_frame(hostile, PAMQP)
    assert repaired is not None
    expected = body + repaired[0] + body + clean + repaired[0] + body
    points = sorted({min(c, len(stream)) for c in cuts})
    bounds = zip([0, *points], [*points, len(stream)], strict=True)
    chunks = [stream[a:b] for a, b in bounds if a < b]
    assert _filtered(chunks) == expected


def test_the_async_filter_passes_a_protocol_header_through() -> None:
    assert _filtered([b"AMQP\x00\x00", b"\x09\x01"]) == b"AMQP\x00\x00\x09\x01"


async def test_the_async_transport_filters_only_its_own_reader() -> None:
    reader = asyncio.StreamReader()
    writer: Any = object()

    class Inner(async_lenient.TransportFactory):
        async def create(self, url: Any, **kwargs: Any) -> Any:
            return reader, writer

    transport = async_lenient.RepairingTransport(Inner())
    got_reader, got_writer = await transport.create(URL("amqp://h/"))
    assert got_reader is reader and got_writer is writer
    reader.feed_data(header_frame(HOSTILE))
    reader.feed_eof()
    repaired = repair_frame(header_frame(HOSTILE), PAMQP)
    assert repaired is not None
    assert await reader.read() == repaired[0]
    assert "feed_data" not in vars(asyncio.StreamReader())  # other readers untouched


def test_encodable_turns_bytes_into_bytearray_for_pamqp() -> None:
    headers = {"a": b"\xff", "b": {"c": [b"\xfe", 1]}, "d": "text"}
    assert async_lenient.encodable(headers) == {
        "a": bytearray(b"\xff"),
        "b": {"c": [bytearray(b"\xfe"), 1]},
        "d": "text",
    }
    same = {"a": 1, "b": bytearray(b"x")}
    assert async_lenient.encodable(same) is same


# Any table pika can write, timestamps of any size put in: both libraries decode the repair,
# and every value but the timestamps comes out as it went in.
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.text(max_size=20)
    | st.binary(max_size=10)
    | st.just(PLACEHOLDER)
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    headers=st.dictionaries(st.text(max_size=10), _VALUES, max_size=5),
    raw=st.integers(0, 2**64 - 1),
    timestamp=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
)
def test_any_table_is_decodable_after_repair(
    headers: dict[str, Any], raw: int, timestamp: int | None
) -> None:
    props = RawProperties(
        headers=headers or None,
        timestamp=timestamp,
        patches=(stamp(raw),) if PLACEHOLDER_BYTES in _encoded(headers) else (),
    )
    frame = header_frame(props)
    for codec, decode in ((PIKA, decoded_by_pika), (PAMQP, decoded_by_pamqp)):
        repaired = repair_frame(frame, codec)
        decoded = decode(repaired[0] if repaired else frame)
        if not headers:
            continue
        assert set(decoded.headers) == set(headers)


def _encoded(headers: dict[str, Any]) -> bytes:
    pieces: list[bytes] = []
    pika.data.encode_table(pieces, headers)
    return b"".join(pieces)


async def test_install_gives_only_this_connection_the_repairing_transport() -> None:
    mine = aio_pika.Connection("amqp://guest:guest@localhost/")
    other = aio_pika.Connection("amqp://guest:guest@localhost/")
    assert async_lenient.install(mine, "amqp://guest:guest@localhost/")
    assert isinstance(mine.kwargs["transport_factory"], async_lenient.RepairingTransport)
    assert "transport_factory" not in other.kwargs  # nothing process-wide


async def test_install_on_an_old_aiormq_warns_once_and_changes_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(async_lenient, "_SUPPORTED", False)
    monkeypatch.setattr(async_lenient, "_warned", False)
    connection = aio_pika.Connection("amqp://guest:guest@localhost/")
    assert not async_lenient.install(connection, "amqp://guest:guest@localhost/")
    assert not async_lenient.install(connection, "amqp://guest:guest@localhost/")
    assert "transport_factory" not in connection.kwargs
    warnings = [r for r in caplog.records if "transport_factory" in r.getMessage()]
    assert len(warnings) == 1 and "6.9" in warnings[0].getMessage()

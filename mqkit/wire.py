"""Content headers a client library cannot decode, repaired before it tries.

RabbitMQ delivers whatever a publisher sent. Some properties and headers it accepts make
pika or pamqp (under aio-pika) raise while decoding a message's *content header*, and a
client library that cannot decode a frame drops the whole connection; the broker then
redelivers the message to the next connection, which drops too, without end. Found so far:

- a ``timestamp`` property, or a timestamp-typed (``T``) header value, beyond the year 9999
  (``datetime`` cannot hold it): pika fails on the header, pamqp on both;
- a short string property (``message_id``, ``type``, ...) or a header name that is not
  UTF-8: pamqp fails (pika hands over ``bytes``, which :class:`mqkit.messages.Incoming`
  turns into text).

:func:`repair_frame` rewrites such a content header into one the library can decode,
changing only what it cannot: a header timestamp it cannot hold becomes a 64-bit integer
(``l``, the raw value; above ``2**63 - 1`` that number), a ``timestamp`` property it cannot
hold is dropped (``ctx.timestamp`` is ``None``, as for a message without one), text that is
not UTF-8 is decoded with U+FFFD for the bad bytes. The message is then handled like any
other: acked, retried or dead-lettered.

This module is pure (bytes in, bytes out). The shells run it on mqkit's own connections
only (:mod:`mqkit._sync.lenient`, :mod:`mqkit._async.lenient`), never as a process-wide
patch of pika or pamqp: other libraries in the same process keep their behaviour.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "FRAME_HEADER",
    "INT64_MAX",
    "MAX_MILLIS",
    "MAX_SECONDS",
    "PAMQP",
    "PIKA",
    "SHORTSTR_MAX",
    "Codec",
    "Repair",
    "repair_frame",
    "repair_header",
]

FRAME_HEADER = 2  # the AMQP frame type of a content header
FRAME_END = 0xCE
BASIC = 60  # the only content class

MAX_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z, the last second a datetime can hold
MAX_MILLIS = MAX_SECONDS * 1000 + 999  # the same, in milliseconds
INT64_MAX = 2**63 - 1
SHORTSTR_MAX = 255  # bytes


@dataclass(frozen=True, slots=True)
class Codec:
    """What one client library's decoder can take.

    ``header_stamp_max``: the largest ``T`` table value it decodes; ``property_stamp_max``:
    the largest ``timestamp`` property (``None``: any, it hands over the integer);
    ``utf8_only``: whether short strings and table keys must be UTF-8.
    """

    name: str
    header_stamp_max: int
    property_stamp_max: int | None
    utf8_only: bool


# pika decodes a T value as seconds; its timestamp property is a plain int.
PIKA = Codec("pika", MAX_SECONDS, None, utf8_only=False)
# pamqp reads a value above 2**32 as milliseconds, for both; it decodes short strings and
# table keys as UTF-8 and fails on anything else.
PAMQP = Codec("pamqp", MAX_MILLIS, MAX_MILLIS, utf8_only=True)


@dataclass(frozen=True, slots=True)
class Repair:
    """A content header rewritten: the new ``payload``, what was changed (for the log), and
    the message's id (as text) when it has one."""

    payload: bytes
    changes: tuple[str, ...]
    message_id: str | None


class _Malformed(ValueError):
    """The bytes do not parse as an AMQP field table (or array)."""


# Basic's properties in wire order: (flag bit, name, kind).
_PROPERTIES = (
    (0x8000, "content_type", "shortstr"),
    (0x4000, "content_encoding", "shortstr"),
    (0x2000, "headers", "table"),
    (0x1000, "delivery_mode", "octet"),
    (0x0800, "priority", "octet"),
    (0x0400, "correlation_id", "shortstr"),
    (0x0200, "reply_to", "shortstr"),
    (0x0100, "expiration", "shortstr"),
    (0x0080, "message_id", "shortstr"),
    (0x0040, "timestamp", "timestamp"),
    (0x0020, "type", "shortstr"),
    (0x0010, "user_id", "shortstr"),
    (0x0008, "app_id", "shortstr"),
    (0x0004, "cluster_id", "shortstr"),
)

_SHORTSTR, _OCTET, _TIMESTAMP, _TABLE = range(4)
_KIND = {"shortstr": _SHORTSTR, "octet": _OCTET, "timestamp": _TIMESTAMP, "table": _TABLE}
_LAYOUT = tuple((bit, _KIND[kind]) for bit, _name, kind in _PROPERTIES)

# Field value types of a fixed size (RabbitMQ's set, plus pika's U).
_FIXED = {
    b"t": 1,
    b"b": 1,
    b"B": 1,
    b"s": 2,
    b"u": 2,
    b"U": 2,
    b"I": 4,
    b"i": 4,
    b"l": 8,
    b"L": 8,
    b"f": 4,
    b"d": 8,
    b"D": 5,
    b"T": 8,
    b"V": 0,
}
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")
_FRAME_HEAD = struct.Struct(">BHI")


def repair_frame(frame: bytes, codec: Codec) -> tuple[bytes, int, Repair] | None:
    """``frame`` (a whole AMQP frame: 7-byte head, payload, frame-end) rewritten so that
    ``codec`` can decode it, with its channel number and what changed; ``None`` when it is
    not a content header or nothing needs changing."""
    if len(frame) < 8 or frame[0] != FRAME_HEADER:
        return None
    _kind, channel, size = _FRAME_HEAD.unpack_from(frame)
    if len(frame) != 8 + size or frame[-1] != FRAME_END:
        return None
    repair = repair_header(frame[7:-1], codec)
    if repair is None:
        return None
    head = _FRAME_HEAD.pack(FRAME_HEADER, channel, len(repair.payload))
    return head + repair.payload + frame[-1:], channel, repair


def repair_header(payload: bytes, codec: Codec) -> Repair | None:
    """A content header's payload rewritten so that ``codec`` can decode it, or ``None``
    when it can already (or is not a ``basic`` content header mqkit can read)."""
    if len(payload) < 14 or payload[0:2] != b"\x00\x3c":  # class 60 (basic)
        return None
    flags = int.from_bytes(payload[12:14], "big")
    pos = 14
    while payload[pos - 1] & 1:  # more flag words follow (unused by basic)
        pos += 2
        if pos > len(payload):
            return None
    try:
        if not _needs_repair(payload, pos, flags, codec):
            return None
        return _repair_properties(payload, pos, flags, codec)
    except (IndexError, struct.error, _Malformed):
        return None  # not ours to parse: let the library say what is wrong


def _needs_repair(payload: bytes, pos: int, flags: int, codec: Codec) -> bool:
    """Whether any property needs a repair: the fast check every content header gets (the
    common case builds nothing)."""
    utf8_only = codec.utf8_only
    stamp_max = codec.property_stamp_max
    for bit, kind in _LAYOUT:
        if not flags & bit:
            continue
        if kind == _SHORTSTR:
            end = pos + 1 + payload[pos]
            text = payload[pos + 1 : end]
            if utf8_only and not text.isascii() and _fix_text(text, codec) is not None:
                return True
        elif kind == _OCTET:
            end = pos + 1
        elif kind == _TIMESTAMP:
            end = pos + 8
            if stamp_max is not None and _U64.unpack_from(payload, pos)[0] > stamp_max:
                return True
        else:
            end = pos + 4 + _U32.unpack_from(payload, pos)[0]
            table = payload[pos + 4 : end]
            if _suspect(table, codec) and _repair_table(table, codec, []) is not None:
                return True
        pos = end
    return False


def _repair_properties(payload: bytes, start: int, flags: int, codec: Codec) -> Repair | None:
    pieces: list[bytes] = []
    changes: list[str] = []
    message_id: str | None = None
    new_flags = flags
    pos = start
    for bit, name, kind in _PROPERTIES:
        if not flags & bit:
            continue
        if kind == "shortstr":
            end = pos + 1 + payload[pos]
            raw = payload[pos + 1 : end]
            if end > len(payload):
                raise _Malformed(name)
            fixed = _fix_text(raw, codec)
            if fixed is not None:
                changes.append(f"property {name} is not UTF-8 ({raw[:40]!r}...)")
                pieces.append(bytes([len(fixed)]) + fixed)
            else:
                pieces.append(payload[pos:end])
            if name == "message_id":
                message_id = (fixed or raw).decode("utf-8", "replace")
        elif kind == "octet":
            end = pos + 1
            pieces.append(payload[pos:end])
        elif kind == "timestamp":
            end = pos + 8
            value = _U64.unpack_from(payload, pos)[0]
            limit = codec.property_stamp_max
            if limit is not None and value > limit:
                changes.append(f"property timestamp {value} is beyond the year 9999: dropped")
                new_flags &= ~bit
            else:
                pieces.append(payload[pos:end])
        else:  # the headers table
            end = pos + 4 + _U32.unpack_from(payload, pos)[0]
            if end > len(payload):
                raise _Malformed(name)
            table = payload[pos + 4 : end]
            inner = _repair_table(table, codec, changes) if _suspect(table, codec) else None
            if inner is None:
                pieces.append(payload[pos:end])
            else:
                pieces.append(_U32.pack(len(inner)) + inner)
        pos = end
    if not changes:
        return None
    flag_word = new_flags.to_bytes(2, "big")
    body = b"".join(pieces) + payload[pos:]
    return Repair(payload[:12] + flag_word + payload[14:start] + body, tuple(changes), message_id)


def _suspect(table: bytes, codec: Codec) -> bool:
    """Whether a table may hold something ``codec`` cannot decode (cheap; a walk decides).

    Without a ``T`` byte there is no timestamp value; all-ASCII bytes hold no key that is not
    UTF-8. Most tables pass both tests."""
    if b"T" in table:
        return True
    return codec.utf8_only and not table.isascii()


def _fix_text(raw: bytes, codec: Codec) -> bytes | None:
    """``raw`` short-string bytes made UTF-8 (at most 255 bytes), or ``None`` if fine."""
    if not codec.utf8_only or raw.isascii():
        return None
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", "replace").encode("utf-8")
        return text[:SHORTSTR_MAX].decode("utf-8", "ignore").encode("utf-8")
    return None


def _repair_table(buf: bytes, codec: Codec, changes: list[str], where: str = "") -> bytes | None:
    """A field table's content (after its length) rewritten, or ``None`` if unchanged."""
    out: list[bytes] | None = None
    copied = pos = 0
    end = len(buf)
    while pos < end:
        entry = pos
        key_end = pos + 1 + buf[pos]
        if key_end > end:
            raise _Malformed("table key")
        key = buf[pos + 1 : key_end]
        name = where + key.decode("utf-8", "replace")
        new_key = _fix_text(key, codec)
        if new_key is not None:
            changes.append(f"header name {key[:40]!r} is not UTF-8")
        value_start = key_end
        new_value, pos = _repair_value(buf, value_start, codec, changes, name)
        if new_key is None and new_value is None:
            continue
        if out is None:
            out = []
        out.append(buf[copied:entry])
        out.append(buf[entry:key_end] if new_key is None else bytes([len(new_key)]) + new_key)
        out.append(buf[value_start:pos] if new_value is None else new_value)
        copied = pos
    if pos != end:
        raise _Malformed("table length")
    if out is None:
        return None
    out.append(buf[copied:])
    return b"".join(out)


def _repair_array(buf: bytes, codec: Codec, changes: list[str], where: str) -> bytes | None:
    """A field array's content rewritten, or ``None`` if unchanged."""
    out: list[bytes] | None = None
    copied = pos = 0
    while pos < len(buf):
        start = pos
        new_value, pos = _repair_value(buf, start, codec, changes, f"{where}[]")
        if new_value is None:
            continue
        if out is None:
            out = []
        out.append(buf[copied:start])
        out.append(new_value)
        copied = pos
    if pos != len(buf):
        raise _Malformed("array length")
    if out is None:
        return None
    out.append(buf[copied:])
    return b"".join(out)


def _repair_value(
    buf: bytes, pos: int, codec: Codec, changes: list[str], name: str
) -> tuple[bytes | None, int]:
    """The field value at ``pos`` (its type byte): its replacement (type byte included) or
    ``None``, and where the next one starts."""
    kind = buf[pos : pos + 1]
    pos += 1
    size = _FIXED.get(kind)
    if size is not None:
        end = pos + size
        if end > len(buf):
            raise _Malformed(name)
        if kind == b"T":
            value = _U64.unpack_from(buf, pos)[0]
            if value > codec.header_stamp_max:
                changes.append(
                    f"header {name!r}: timestamp {value} is beyond the year 9999: "
                    "kept as an integer"
                )
                return b"l" + _I64.pack(min(value, INT64_MAX)), end
        return None, end
    if kind in (b"S", b"x", b"F", b"A"):
        start = pos + 4
        end = start + _U32.unpack_from(buf, pos)[0]
        if end > len(buf):
            raise _Malformed(name)
        if kind == b"F":
            inner = _repair_table(buf[start:end], codec, changes, f"{name}.")
        elif kind == b"A":
            inner = _repair_array(buf[start:end], codec, changes, name)
        else:
            return None, end
        if inner is None:
            return None, end
        return kind + _U32.pack(len(inner)) + inner, end
    raise _Malformed(f"unknown field type {kind!r}")

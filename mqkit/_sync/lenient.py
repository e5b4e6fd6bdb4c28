"""A pika connection that survives content headers pika cannot decode.

pika decodes each frame in ``Connection._read_frame``; when a content header holds a value
it cannot decode (a timestamp header beyond the year 9999), that raises out of the IO loop
and the connection is lost, on every redelivery. :class:`LenientSelectConnection` catches
that for content-header frames only, lets :func:`mqkit.wire.repair_frame` rewrite the frame,
and decodes it again. Only mqkit's own connections are made this way: pika itself is not
patched, so other code in the process keeps pika's behaviour.

``_read_frame`` and ``_frame_buffer`` are pika internals (stable from pika 1.0 to 1.4);
``tests/unit/test_wire.py`` fails loudly if they change.
"""

from __future__ import annotations

import logging
from typing import Any

from pika.adapters.select_connection import SelectConnection

from mqkit.wire import FRAME_HEADER, PIKA, repair_frame

__all__ = ["LenientSelectConnection", "repair_buffer"]

log = logging.getLogger("mqkit.wire")

_HEAD = 7  # frame type, channel, size


def repair_buffer(buffer: bytes) -> bytes | None:
    """``buffer`` (pika's unread bytes, starting at a frame) with its first frame repaired,
    or ``None`` when that frame is not a content header that can be repaired."""
    if len(buffer) < _HEAD + 1 or buffer[0] != FRAME_HEADER:
        return None
    end = _HEAD + int.from_bytes(buffer[3:7], "big") + 1
    if end > len(buffer):
        return None
    repaired = repair_frame(buffer[:end], PIKA)
    if repaired is None:
        return None
    frame, channel, repair = repaired
    log.warning(
        "message %s on channel %d: %s; delivering it with what could be decoded",
        repair.message_id,
        channel,
        "; ".join(repair.changes),
    )
    return frame + buffer[end:]


class LenientSelectConnection(SelectConnection):
    """A ``SelectConnection`` that repairs content headers pika cannot decode instead of
    losing the connection over them (see the module's docstring)."""

    # pika's type stubs do not show these internals: hence the Any.
    def _read_frame(self) -> Any:
        pika: Any = super()
        try:
            return pika._read_frame()
        except Exception:
            state: Any = self
            repaired = repair_buffer(state._frame_buffer)
            if repaired is None:
                raise
            state._frame_buffer = repaired
            return pika._read_frame()

"""Every error mqkit raises, in one tree.

```
MqkitError
├── ConfigError (also ValueError)    # invalid settings or arguments
├── ConnectionFailed                 # cannot connect / authenticate / lost and not recovered
├── TopologyError                    # declare conflicts, missing queue
├── PublishError                     # the broker did not take responsibility for a message
│   ├── PublishUnroutable            #   mandatory publish returned: no queue bound
│   ├── PublishNacked                #   the broker nacked it
│   ├── PublishTimeout               #   no confirm within confirm_timeout
│   └── PublishTooLarge              #   above max_message_size: not stored
├── RequestTimeout                   # RPC: no reply in time
├── RemoteError                      # RPC: the responder's handler raised
└── DecodeError                      # a body that is not a valid message of the expected type
```

pika and aio-pika exceptions never reach users unwrapped: each shell translates them in one
place and keeps the original as ``__cause__``. The handler signals ``Reject`` and ``Retry``
(see :mod:`mqkit.retry`) are not errors and are not part of this tree.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "ConfigError",
    "ConnectionFailed",
    "DecodeError",
    "MqkitError",
    "PublishError",
    "PublishNacked",
    "PublishTimeout",
    "PublishTooLarge",
    "PublishUnroutable",
    "RemoteError",
    "RequestTimeout",
    "TopologyError",
]


class MqkitError(Exception):
    """Base class of every error mqkit raises."""


class ConfigError(MqkitError, ValueError):
    """Invalid settings or arguments. The message names the field and what is allowed."""


class ConnectionFailed(MqkitError):
    """The broker cannot be reached, refused the credentials, or was lost and not recovered."""


class TopologyError(MqkitError):
    """A declare conflicts with what exists on the broker, or an entity is missing.

    ``reply_code`` is the AMQP code the broker closed the channel with (406 precondition
    failed, 404 not found, 403 access refused, ...), ``None`` when the broker did not say.
    """

    def __init__(self, message: str, *, reply_code: int | None = None) -> None:
        super().__init__(message)
        self.reply_code = reply_code


class PublishError(MqkitError):
    """The broker did not confirm a publish.

    ``unconfirmed`` lists the message ids the broker did not take (for ``publish_many``, every
    message that may not have been stored; re-publishing them is safe, consumers must be
    idempotent anyway).
    """

    def __init__(self, message: str, *, unconfirmed: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.unconfirmed: list[str] = list(unconfirmed)


class PublishUnroutable(PublishError):
    """A mandatory publish came back: no queue is bound for that exchange and routing key."""


class PublishNacked(PublishError):
    """The broker nacked the publish (for example a full queue with overflow=reject-publish)."""


class PublishTimeout(PublishError):
    """No confirm arrived within ``confirm_timeout`` (the link may be down, or the broker
    blocks publishing during a memory or disk alarm). The message may have been stored after
    all; its id is in ``unconfirmed``: publish it again with that same ``message_id``, so an
    idempotent consumer drops the duplicate."""


class PublishTooLarge(PublishError):
    """The message is larger than the broker accepts (``max_message_size``): it was not
    stored, and sending it again fails again. ``size`` is its body's size in bytes,
    ``limit`` the largest size allowed (mqkit's setting, or the broker's own limit); both are
    ``None`` on the one error ``publish_many`` raises for several such messages."""

    def __init__(
        self,
        message: str,
        *,
        size: int | None = None,
        limit: int | None = None,
        unconfirmed: Sequence[str] = (),
    ) -> None:
        super().__init__(message, unconfirmed=unconfirmed)
        self.size = size
        self.limit = limit


class RequestTimeout(MqkitError):
    """An RPC request got no reply within its timeout."""


class RemoteError(MqkitError):
    """The responder's handler raised; ``error_type`` and ``error_message`` say what it raised."""

    def __init__(self, error_type: str, error_message: str) -> None:
        super().__init__(f"responder raised {error_type}: {error_message}")
        self.error_type = error_type
        self.error_message = error_message


class DecodeError(MqkitError):
    """A body could not be decoded into the expected message type."""

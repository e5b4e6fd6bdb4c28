"""Configuration: one :class:`Settings`, read from ``MQKIT_*`` environment variables.

```python
settings = mqkit.Settings(service="billing")          # MQKIT_URL, MQKIT_PREFETCH, ... apply
client = mqkit.Client(settings, confirm_timeout=5)   # keyword overrides on top
```
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from mqkit.errors import ConfigError

__all__ = ["Settings", "mask_url"]

_PASSWORD_IN_URL = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)(?P<pw>[^@\s]*)@", re.I)


def mask_url(text: str) -> str:
    """Return ``text`` with the password of every AMQP URL in it replaced by ``***``."""
    return _PASSWORD_IN_URL.sub(r"\g<head>***@", text)


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("amqp", "amqps"):
        raise ValueError(
            f"{mask_url(url)!r} is not an AMQP URL: use amqp://user:pass@host:5672/vhost"
        )
    if not parts.hostname:
        raise ValueError(f"{mask_url(url)!r} names no host: use amqp://user:pass@host:5672/vhost")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise ValueError(f"{mask_url(url)!r} has an invalid port") from None
    return url


class Settings(BaseSettings):
    """mqkit's configuration; every field can be set as ``MQKIT_<FIELD>`` in the environment.

    An invalid value raises :class:`mqkit.ConfigError` (also a ``ValueError``) naming the field.
    ``repr()`` and ``str()`` never show a password.
    """

    model_config = SettingsConfigDict(env_prefix="MQKIT_", extra="forbid", frozen=True)

    url: str = Field(
        "amqp://guest:guest@localhost:5672/",
        description="Broker URL; a comma-separated list is a fail-over list.",
    )
    urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Fail-over URLs, tried in order (env: comma-separated). Overrides `url`.",
    )
    service: str = Field("mqkit", min_length=1, description="This service's name (app_id).")
    prefetch: int = Field(64, ge=1, le=65535, description="Unacked deliveries per consumer.")
    confirm_timeout: float = Field(10.0, gt=0, description="Seconds to wait for a confirm.")
    heartbeat: int = Field(30, ge=0, le=3600, description="AMQP heartbeat in seconds (0: off).")
    connect_timeout: float = Field(10.0, gt=0, description="Seconds to keep trying to connect.")
    drain_timeout: float = Field(
        30.0, ge=0, description="Seconds run() lets running handlers finish when stopping."
    )
    queue_type: Literal["quorum", "classic"] = Field("quorum", description="Default queue type.")
    delivery_limit: int = Field(
        20, ge=1, description="Quorum queues' x-delivery-limit: poison messages go to the DLQ."
    )
    events_exchange: str = Field("mqkit.events", min_length=1, description="Event bus exchange.")
    max_message_size: int = Field(
        134_217_728,
        ge=1,
        le=536_870_912,
        description=(
            "Largest message body in bytes: a larger one raises PublishTooLarge before it is "
            "sent. Set it to the broker's max_message_size (RabbitMQ 3.x default 128 MiB, "
            "4.x 16 MiB; at most 512 MiB)."
        ),
    )
    declare: Literal["auto", "strict", "passive"] = Field(
        "auto",
        description=(
            "How queues and exchanges are declared. auto: declare what is missing; a queue "
            "that exists with other arguments is used as it is (one WARNING says what mqkit "
            "cannot guarantee there). strict: such a queue is a TopologyError. passive: "
            "declare nothing, only check that it exists (needs no configure permission)."
        ),
    )
    ca_file: str | None = Field(None, description="TLS: CA bundle (amqps://).")
    cert_file: str | None = Field(None, description="TLS: client certificate.")
    key_file: str | None = Field(None, description="TLS: client key.")

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from None

    @field_validator("urls", mode="before")
    @classmethod
    def _split_urls(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        for part in value.split(","):
            _check_url(part.strip())
        return value

    @field_validator("urls")
    @classmethod
    def _valid_urls(cls, value: list[str]) -> list[str]:
        return [_check_url(url) for url in value]

    @model_validator(mode="after")
    def _tls_pairs(self) -> Settings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        return self

    @property
    def all_urls(self) -> list[str]:
        """The URLs to try, in order: ``urls`` if given, else ``url`` split on commas."""
        if self.urls:
            return list(self.urls)
        return [part.strip() for part in self.url.split(",") if part.strip()]

    def merged(self, **overrides: Any) -> Settings:
        """A copy with ``overrides`` applied and validated (unknown names raise ConfigError)."""
        if not overrides:
            return self
        unknown = sorted(set(overrides) - set(type(self).model_fields))
        if unknown:
            raise ConfigError(
                f"unknown setting(s) {', '.join(unknown)}; "
                f"valid: {', '.join(type(self).model_fields)}"
            )
        values = self.model_dump(exclude_unset=True)
        values.update(overrides)
        return type(self)(**values)

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            if name == "url" and isinstance(value, str):
                yield name, mask_url(value)
            elif name == "urls" and isinstance(value, list):
                yield name, [mask_url(v) for v in value]
            else:
                yield name, value


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        field = ".".join(str(part) for part in error["loc"]) or "settings"
        problems.append(f"{field}: {mask_url(error['msg'])}")
    return "invalid mqkit settings: " + "; ".join(problems)

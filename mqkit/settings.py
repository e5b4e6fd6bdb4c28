"""Configuration: one :class:`Settings`, read from ``MQKIT_*`` environment variables.

```python
settings = mqkit.Settings(service="billing")          # MQKIT_URL, MQKIT_PREFETCH, ... apply
client = mqkit.Client(settings, confirm_timeout=5)   # keyword overrides on top
```
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from mqkit.errors import ConfigError
from mqkit.urls import check_url, mask_url, split_urls

__all__ = ["Settings", "mask_url"]

# Fields whose values are never repeated in an error: they hold or may hold a password.
_SECRET_FIELDS = frozenset({"url", "urls", "key_password"})


class Settings(BaseSettings):
    """mqkit's configuration; every field can be set as ``MQKIT_<FIELD>`` in the environment.

    An invalid value raises :class:`mqkit.ConfigError` (also a ``ValueError``) naming the field
    (or the environment variable) and the value it got, except for the URLs and
    ``key_password``, whose values no error, ``repr()`` or ``str()`` ever shows. Special
    characters in a URL's user name, password or virtual host must be percent-encoded
    (``urllib.parse.quote(password, safe="")``), and a URL carries no parameters: TLS and
    login are the settings ``ca_file``, ``cert_file``, ``key_file``, ``key_password`` and
    ``auth``.

    Memory: ``prefetch`` bounds a consumer's unacked deliveries by count, not by size, so a
    consumer may hold up to ``prefetch`` x the largest message in memory (64 x 50 MB is
    3.2 GB). For large messages lower ``prefetch`` (per consumer: ``client.consumer(...,
    prefetch=2)``), and cap the size with the broker's ``max_message_size``.
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
    key_password: SecretStr | None = Field(
        None,
        description="TLS: the pass phrase of an encrypted key_file (never prompted for).",
    )
    auth: Literal["plain", "external"] = Field(
        "plain",
        description=(
            "How to log in. plain: the URL's user and password. external: the client "
            "certificate (cert_file, key_file; amqps:// only; the URL names no user); the "
            "broker needs the rabbitmq_auth_mechanism_ssl plugin."
        ),
    )

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
            return
        except ValidationError as exc:
            message = _describe(exc, keywords=set(values))
        # Raised here, outside the except block, so that the ValidationError (which holds
        # the input, URLs and passwords included) is neither the cause nor the context.
        raise ConfigError(message)

    @field_validator("urls", mode="before")
    @classmethod
    def _split_urls(cls, value: Any) -> Any:
        if isinstance(value, str):
            return split_urls(value)
        return value

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        if not split_urls(value):
            raise ValueError("no URL given: use amqp://user:password@host:5672/vhost")
        for part in split_urls(value):
            check_url(part)
        return value

    @field_validator("urls")
    @classmethod
    def _valid_urls(cls, value: list[str]) -> list[str]:
        return [check_url(url) for url in value]

    @field_validator("auth", mode="before")
    @classmethod
    def _auth_lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _tls_and_auth(self) -> Settings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        if self.key_password is not None and self.key_file is None:
            raise ValueError("key_password is set but key_file is not: give both, or neither")
        urls = self.all_urls
        if self.auth == "external":
            if self.cert_file is None:
                raise ValueError(
                    "auth='external' logs in with a client certificate: set cert_file and "
                    "key_file (MQKIT_CERT_FILE, MQKIT_KEY_FILE)"
                )
            if any(urlsplit(url).scheme.lower() != "amqps" for url in urls):
                raise ValueError(
                    "auth='external' needs TLS: use amqps:// URLs (and ca_file for the broker's CA)"
                )
            if any(urlsplit(url).username or urlsplit(url).password for url in urls):
                raise ValueError(
                    "auth='external' logs in as the user the client certificate names: remove "
                    "the user name and password from the URL (amqps://host:5671/vhost)"
                )
        elif self.cert_file is not None and any(not urlsplit(url).username for url in urls):
            raise ValueError(
                "a client certificate is given and a URL names no user, which would log in "
                "as guest/guest: set auth='external' (MQKIT_AUTH=external) to log in with the "
                "certificate, or put the user and password in the URL"
            )
        return self

    @property
    def all_urls(self) -> list[str]:
        """The URLs to try, in order: ``urls`` if given, else ``url`` split on commas."""
        if self.urls:
            return list(self.urls)
        return split_urls(self.url)

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


def _describe(exc: ValidationError, *, keywords: set[str]) -> str:
    """One line for every problem: ``MQKIT_PREFETCH='abc': not an integer`` for a value from
    the environment, ``prefetch='abc': not an integer`` for a keyword (URLs and passwords:
    the name only, never the value)."""
    problems = []
    for error in exc.errors(include_url=False):
        loc = error["loc"]
        field = str(loc[0]) if loc else ""
        # Our own validators' texts mask their URLs already (and show how to write one).
        reason = _reason(error) if error["type"] == "value_error" else mask_url(_reason(error))
        if not field:
            problems.append(reason)
            continue
        if field not in Settings.model_fields:
            valid = ", ".join(Settings.model_fields)
            problems.append(f"{field}: not a setting (valid: {valid})")
            continue
        name = field if field in keywords else _env_name(field)
        name += "".join(f"[{part}]" for part in loc[1:])
        if field in _SECRET_FIELDS:
            problems.append(f"{name}: {reason}")
        else:
            problems.append(f"{name}={_shown(error['input'])}: {reason}")
    return "invalid mqkit settings: " + "; ".join(problems)


def _env_name(field: str) -> str:
    """The environment variable ``field`` was read from, as spelled there."""
    wanted = f"MQKIT_{field}".upper()
    return next((name for name in os.environ if name.upper() == wanted), wanted)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _reason(error: ErrorDetails) -> str:
    """pydantic's complaint, in a few plain words."""
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return "not an integer"
    if kind in ("float_parsing", "float_type"):
        return "not a number"
    if kind == "string_type":
        return "not a string"
    if kind in ("bool_parsing", "bool_type"):
        return "not true or false"
    if kind == "greater_than_equal":
        return f"must be at least {ctx['ge']}"
    if kind == "greater_than":
        return f"must be greater than {ctx['gt']}"
    if kind == "less_than_equal":
        return f"must be at most {ctx['le']}"
    if kind == "less_than":
        return f"must be less than {ctx['lt']}"
    if kind == "string_too_short" and ctx.get("min_length") == 1:
        return "must not be empty"
    if kind == "literal_error":
        return f"must be {ctx['expected']}"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    return error["msg"]

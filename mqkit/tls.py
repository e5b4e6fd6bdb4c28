"""TLS and login, decided once for both clients: the ``ssl.SSLContext``, the login mechanism,
and what a failed TLS connection means.

Each shell asks :func:`ssl_context` for the context of an ``amqps://`` URL, :func:`external`
whether to log in with the client certificate (SASL EXTERNAL) instead of the URL's user and
password, and :func:`failure` (from its ``connect_error``) whether a failed attempt was a TLS
or EXTERNAL problem that no retry can fix, with the words to say so. A TLS problem fails at
once: a missing CA file, a key that is not the certificate's, a certificate that does not
verify, a plain ``amqp://`` URL on a TLS port (found by :func:`speaks_tls`) or an
``amqps://`` URL on a plain one.

The context never lets OpenSSL prompt for a pass phrase: an encrypted ``key_file`` is opened
with ``key_password`` or not at all.

```python
context = tls.ssl_context(settings)          # raises TLSSetupError, with the reason
fatal = tls.failure(url, exc)                 # a ConnectionFailed to raise, or None
```
"""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Iterator
from typing import Literal, Protocol
from urllib.parse import urlsplit

from pydantic import SecretStr

from mqkit import explain
from mqkit.errors import ConnectionFailed

__all__ = [
    "PROBE_TIMEOUT",
    "PortSpeaksTLS",
    "TLSSettings",
    "TLSSetupError",
    "external",
    "failure",
    "probe_needed",
    "speaks_tls",
    "ssl_context",
    "ssl_reason",
    "uses_tls",
]

PROBE_TIMEOUT = 2.0  # seconds for speaks_tls(): a TLS port answers a ClientHello at once

# OpenSSL reasons that mean "the other side sent something that is not TLS".
_NOT_TLS = frozenset(
    {
        "WRONG_VERSION_NUMBER",
        "UNKNOWN_PROTOCOL",
        "RECORD_LAYER_FAILURE",
        "PACKET_LENGTH_TOO_LONG",
        "HTTP_REQUEST",
        "UNEXPECTED_RECORD",
    }
)
# "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca": a reason inside an error's text (pika
# reports an alert the broker sent as text inside its own exception).
_REASON_IN_TEXT = re.compile(r"\[(?:SSL|X509)[^\]:]*: (?P<reason>[A-Z0-9_]+)\] (?P<text>[^(')\"]+)")


class TLSSettings(Protocol):
    """The settings this module reads (:class:`mqkit.Settings` has them)."""

    @property
    def ca_file(self) -> str | None: ...

    @property
    def cert_file(self) -> str | None: ...

    @property
    def key_file(self) -> str | None: ...

    @property
    def key_password(self) -> SecretStr | None: ...

    @property
    def auth(self) -> Literal["plain", "external"]: ...


class TLSSetupError(Exception):
    """The local TLS material cannot be used (a file, a key, a pass phrase); the message
    says why and what to do. Connecting turns it into :class:`ConnectionFailed` (via
    :func:`failure`) at once, without retrying."""


class PortSpeaksTLS(ConnectionError):
    """A shell's finding: the port an ``amqp://`` URL names answered a TLS handshake."""


def uses_tls(url: str) -> bool:
    """Whether ``url`` asks for TLS (``amqps://``)."""
    return urlsplit(url).scheme.lower() == "amqps"


def external(settings: TLSSettings) -> bool:
    """Whether to log in with the client certificate (SASL EXTERNAL) rather than the URL's
    user and password. Only when asked for (``auth="external"``): a URL without a user never
    falls back to guest/guest silently, :class:`mqkit.Settings` refuses that combination."""
    return settings.auth == "external"


def ssl_context(settings: TLSSettings) -> ssl.SSLContext:
    """The context for an ``amqps://`` connection: verifies the broker's certificate (against
    ``ca_file``, else the system's CAs) and its host name, and presents ``cert_file`` /
    ``key_file`` when given. Raises :class:`TLSSetupError` saying what is wrong."""
    ca_file = settings.ca_file
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except OSError as exc:
        if ca_file is not None and not isinstance(exc, ssl.SSLError):
            raise TLSSetupError(explain.tls_file_unreadable("ca_file", ca_file, _why(exc))) from exc
        raise TLSSetupError(explain.tls_file_invalid("ca_file", str(ca_file), _why(exc))) from exc
    if settings.cert_file is not None and settings.key_file is not None:
        _load_client_certificate(context, settings.cert_file, settings.key_file, settings)
    return context


def _load_client_certificate(
    context: ssl.SSLContext, cert_file: str, key_file: str, settings: TLSSettings
) -> None:
    for setting, path in (("cert_file", cert_file), ("key_file", key_file)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise TLSSetupError(explain.tls_file_unreadable(setting, path, _why(exc))) from exc
    asked: list[bool] = []
    secret = settings.key_password

    def password() -> bytes:
        # Given as a function so that OpenSSL never falls back to prompting on the terminal
        # (which blocks, or with no terminal fails once per attempt).
        asked.append(True)
        return b"" if secret is None else secret.get_secret_value().encode()

    try:
        context.load_cert_chain(cert_file, key_file, password=password)
    except ssl.SSLError as exc:
        if getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
            problem = explain.tls_key_mismatch(cert_file, key_file)
        elif asked:
            problem = (
                explain.tls_key_encrypted(key_file)
                if secret is None
                else explain.tls_key_password_wrong(key_file)
            )
        else:
            problem = _invalid_pem(cert_file, key_file, exc)
        raise TLSSetupError(problem) from exc


def _invalid_pem(cert_file: str, key_file: str, exc: ssl.SSLError) -> str:
    """Which of the two files OpenSSL could not read ("PEM lib" does not say)."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        probe.load_verify_locations(cafile=cert_file)  # reads certificates only
    except ssl.SSLError:
        return explain.tls_file_invalid("cert_file", cert_file, _why(exc))
    return explain.tls_file_invalid("key_file", key_file, _why(exc))


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "reason", None)
        return str(reason or (exc.args[-1] if exc.args else exc))
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


# --------------------------------------------------------------------------- failures


def failure(url: str, exc: BaseException) -> ConnectionFailed | None:
    """The error for a connection attempt to ``url`` that failed with ``exc`` because of TLS
    or EXTERNAL authentication, which another attempt cannot fix; ``None`` for anything else.

    Looks through what the client libraries wrap (causes, contexts, arguments, pika's
    workflow exceptions) for: :class:`TLSSetupError`, :class:`PortSpeaksTLS`, certificate
    verification errors, a port that does not speak TLS, an alert from the broker, and the
    broker's answer to an EXTERNAL login.
    """
    for error in _chain(exc):
        if isinstance(error, TLSSetupError):
            return explain.tls_setup(url, str(error))
        if isinstance(error, PortSpeaksTLS):
            return explain.plain_to_tls(url)
        if isinstance(error, ssl.SSLCertVerificationError):
            reason = error.verify_message or getattr(error, "reason", None) or str(error)
            return explain.tls_verify_failed(url, str(reason))
    for error in _chain(exc):
        text = str(error) if not error.args else " ".join(str(arg) for arg in error.args)
        if _external_not_offered(error):
            return explain.external_not_offered(url, _short(text))
        if "mechanism EXTERNAL" in text and "refused" in text.lower():
            return explain.external_refused(url, _short(text))
        reason = getattr(error, "reason", None) if isinstance(error, ssl.SSLError) else None
        found = _REASON_IN_TEXT.search(text)
        if reason is None and found is not None:
            reason = found.group("reason")
        if reason is None:
            continue
        if reason == "CERTIFICATE_VERIFY_FAILED":
            return explain.tls_verify_failed(url, _reason_text(reason, found))
        if reason in _NOT_TLS and uses_tls(url):
            return explain.tls_not_spoken(url, _reason_text(reason, found))
        if "ALERT" in reason:
            return explain.tls_refused(url, _reason_text(reason, found))
    return None


def ssl_reason(exc: BaseException) -> str | None:
    """``"TLS: <OpenSSL's reason>"`` when an ``ssl.SSLError`` is behind ``exc`` (for the
    shells' one-line descriptions of errors), else ``None``."""
    for error in _chain(exc):
        if isinstance(error, ssl.SSLError):
            reason = getattr(error, "reason", None)
            detail = getattr(error, "verify_message", None) or (
                error.args[-1] if error.args else ""
            )
            return f"TLS: {reason}: {detail}" if reason else f"TLS: {detail or error}"
    return None


def _external_not_offered(error: BaseException) -> bool:
    """pika: "could not negotiate use of the EXTERNAL authentication mechanism"; aiormq:
    ``AuthenticationError('PLAIN AMQPLAIN', [what aiormq knows])`` (the broker's mechanisms
    first: when PLAIN is among them, the one that failed was EXTERNAL)."""
    if type(error).__name__ != "AuthenticationError" or not error.args:
        return False
    first = str(error.args[0])
    if "negotiate" in first:
        return "EXTERNAL" in first
    offered = first.split()
    return "PLAIN" in offered and "EXTERNAL" not in offered


def probe_needed(url: str, exc: BaseException) -> bool:
    """Whether an attempt on a plain ``amqp://`` URL failed the way a TLS port answers plain
    AMQP (it closes the connection before the AMQP handshake), so that :func:`speaks_tls`
    should tell whether it is one. A load balancer without a backend closes alike, hence the
    probe, rather than a guess."""
    if uses_tls(url):
        return False
    for error in _chain(exc):
        name = type(error).__name__
        text = " ".join(str(arg) for arg in error.args).lower()
        if isinstance(error, ConnectionResetError | EOFError) or name in (
            "IncompatibleProtocolError",
            "StreamLostError",
        ):
            return True
        if "connection reset" in text or "stream connection lost" in text:
            return True
    return False


def speaks_tls(url: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether the host and port of ``url`` answer a TLS handshake (blocking; run it in a
    thread from asyncio). Verifies nothing and sends nothing but a ClientHello: it only
    tells a TLS port from one that is not."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = _port(parts.netloc, default=5672)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as sock,
            context.wrap_socket(sock, server_hostname=None),
        ):
            return True
    except ssl.SSLError as exc:
        # An alert is TLS too (the port wants something else of us); garbage or EOF is not.
        reason = getattr(exc, "reason", None) or ""
        return "ALERT" in reason
    except OSError:
        return False


def _port(netloc: str, *, default: int) -> int:
    host = netloc.rpartition("@")[2]
    if host.startswith("["):
        host = host.partition("]")[2]
    port = host.rpartition(":")[2] if ":" in host else ""
    return int(port) if port.isdigit() else default


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception it wraps, each once."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        error = todo.pop(0)
        if id(error) in seen:
            continue
        seen.add(id(error))
        yield error
        inner: list[object] = [error.__cause__, error.__context__, *error.args]
        inner.extend(getattr(error, "exceptions", None) or ())  # pika's workflow failure
        inner.append(getattr(error, "exception", None))
        todo.extend(e for e in inner if isinstance(e, BaseException))


def _short(text: str) -> str:
    return text if len(text) <= 200 else f"{text[:197]}..."


def _reason_text(reason: str, found: re.Match[str] | None) -> str:
    if found is not None and found.group("reason") == reason:
        return f"{reason}: {found.group('text').strip()}"
    return reason

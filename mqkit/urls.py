"""AMQP URLs as mqkit takes them: split a fail-over list, check one URL, mask its password.

A password must never reach a log line, an error or a ``repr()``, even from a URL that is
malformed: a space, a raw ``@`` or a raw ``,`` in the password once put all or part of it in
the error meant to reject it. So a URL as configured is masked with :func:`mask_raw_url`
(everything between ``scheme://user:`` and the *last* ``@`` goes, whatever it holds), and
:func:`check_url` accepts only URLs whose special characters are percent-encoded, so that
every URL that gets past the settings is one the text masker :func:`mask_url` reads correctly.

```python
check_url("amqp://app:p%40ss@rabbit:5672/prod")   # fine
mask_raw_url("amqp://app:p@ss word@rabbit/")       # 'amqp://app:***@rabbit/'
split_urls("amqp://a@h1/, amqp://b@h2/")            # ['amqp://a@h1/', 'amqp://b@h2/']
```
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlsplit

__all__ = [
    "ENCODE_ADVICE",
    "MEMORY_SCHEME",
    "check_url",
    "mask_raw_url",
    "mask_url",
    "memory_name",
    "split_urls",
]

# In free text: scheme://user:password@ where the password runs to the last '@' before the
# next whitespace or the next URL (a raw '@' in it is masked too).
_PASSWORD_IN_TEXT = re.compile(
    r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)(?P<pw>(?:(?!://)\S)*)@", re.IGNORECASE
)
_SCHEME = re.compile(r"^\s*[a-z][a-z0-9+.-]*://", re.IGNORECASE)
_BAD_PERCENT = re.compile(r"%(?![0-9a-fA-F]{2})")

ENCODE_ADVICE = (
    "special characters in the user name, password or virtual host (space @ : / ? # , % [ ]) "
    "must be percent-encoded: build the URL with urllib.parse.quote(password, safe=''), "
    "which turns 'p@ss word' into 'p%40ss%20word'"
)

# URL parameters pika or aiormq would act on; mqkit takes none of them from a URL.
_TLS_AND_AUTH_PARAMETERS = frozenset(
    {
        "auth",
        "auth_mechanism",
        "cadata",
        "cafile",
        "capath",
        "certfile",
        "keyfile",
        "no_verify_ssl",
        "ssl",
        "ssl_options",
        "tls",
        "verify",
    }
)


def mask_url(text: str) -> str:
    """Return ``text`` with the password of every AMQP URL in it replaced by ``***``.

    For free text (an error message, a log line). A URL as configured, which may be
    malformed, is masked with :func:`mask_raw_url`.
    """
    return _PASSWORD_IN_TEXT.sub(r"\g<head>***@", text)


def mask_raw_url(url: str) -> str:
    """One URL exactly as configured, well-formed or not, with its password replaced by ``***``.

    Everything between the first ``:`` after ``scheme://`` (or after the start, without a
    scheme) and the *last* ``@`` is the password here: a space, a raw ``@``, ``/``, ``#`` or
    ``,`` in it cannot make part of it show. (A raw ``@`` in a virtual host hides the host
    too; such a URL is invalid anyway.)
    """
    scheme_end = url.find("://")
    start = scheme_end + 3 if scheme_end >= 0 else 0
    at = url.rfind("@")
    if at < start:
        return url  # no user information: nothing secret
    userinfo = url[start:at]
    colon = userinfo.find(":")
    if colon < 0:
        if any(c.isspace() or c in "@," for c in userinfo):
            return f"{url[:start]}***{url[at:]}"  # "user password@": all of it may be secret
        return url  # a user name without password
    return f"{url[: start + colon + 1]}***{url[at:]}"


def split_urls(value: str) -> list[str]:
    """Split a comma-separated list of URLs; a ``,`` that starts no new URL stays in its URL.

    So ``amqp://u:pa,ss@h/`` stays one URL (an invalid one: the ``,`` must be written ``%2C``),
    and its pieces never reach an error message on their own.
    """
    urls: list[str] = []
    for piece in value.split(","):
        if not piece.strip():
            continue
        if urls and not _SCHEME.match(piece):
            urls[-1] = f"{urls[-1]},{piece}"
        else:
            urls.append(piece)
    return [url.strip() for url in urls]


MEMORY_SCHEME = "memory://"
_MEMORY_NAME = re.compile(r"[A-Za-z0-9_.\-]*")


def memory_name(url: str) -> str | None:
    """The broker name in a ``memory://NAME`` URL (the in-process broker of
    :mod:`mqkit.testing.memory`), ``None`` if ``url`` is not a memory URL; raise
    ``ValueError`` for a memory URL with more than a name (letters, digits, ``_.-``)."""
    text = url.strip()
    if not text.lower().startswith(MEMORY_SCHEME):
        return None
    name = text[len(MEMORY_SCHEME) :].rstrip("/")
    if not _MEMORY_NAME.fullmatch(name):
        raise ValueError(
            f"{mask_raw_url(url)!r} is not a valid memory URL: use memory:// or memory://NAME "
            "(NAME of letters, digits, '_', '.', '-')"
        )
    return name


def check_url(url: str) -> str:
    """Return ``url`` if mqkit can use it, else raise ``ValueError`` saying why (password
    masked). An AMQP URL is ``amqp[s]://user:password@host:port/vhost``, its special
    characters percent-encoded, without URL parameters; ``memory://NAME`` is the in-process
    broker of :mod:`mqkit.testing.memory`."""
    if memory_name(url) is not None:
        return url
    masked = mask_raw_url(url)
    example = "use amqp://user:password@host:5672/vhost"
    scheme = _SCHEME.match(url)
    if scheme is None or scheme.group().strip()[:-3].lower() not in ("amqp", "amqps"):
        raise ValueError(f"{masked!r} is not an AMQP URL: {example}")
    rest = url[scheme.end() :]
    authority_end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    authority = rest[:authority_end]
    userinfo = authority[: max(0, authority.rfind("@"))]
    if (
        any(c.isspace() for c in url)
        or "," in url
        or any(c in "@[]" for c in userinfo)  # more than one '@', or brackets
        or "@" in rest[authority_end:]  # a raw '/', '?' or '#' in the password, '@' in the path
        or _BAD_PERCENT.search(rest)
    ):
        raise ValueError(f"{masked!r} is not a valid AMQP URL: {ENCODE_ADVICE}")
    try:
        parts = urlsplit(url)
    except ValueError:  # an unbalanced '[' in the host
        parts = None
    if parts is None or not parts.hostname:
        raise ValueError(f"{masked!r} names no host: {example}")
    if not _valid_port(parts.netloc):
        raise ValueError(f"{masked!r} has an invalid port: {example}")
    if parts.query or parts.fragment or url.rstrip().endswith(("?", "#")):
        raise ValueError(_parameters_refused(masked, parts.query, parts.fragment))
    return url


def _valid_port(netloc: str) -> bool:
    """Whether the port in ``netloc`` (if any) is a number in 1..65535 (checked without
    ``urlsplit().port``, whose exception would carry the netloc, password included)."""
    host = netloc.rpartition("@")[2]
    if host.startswith("["):  # [IPv6]:port
        host = host.partition("]")[2]
    if ":" not in host:
        return True
    port = host.rpartition(":")[2]
    return port == "" or (port.isdigit() and 0 < int(port) < 65536)


def _parameters_refused(masked: str, query: str, fragment: str) -> str:
    shown = masked.partition("?")[0].partition("#")[0]
    names = sorted({name for name, _ in parse_qsl(query, keep_blank_values=True)})
    if not names:  # a raw '?' or '#' in the virtual host
        return f"{shown!r} is not a valid AMQP URL: {ENCODE_ADVICE}"
    listed = ", ".join(repr(name) for name in names)
    if set(names) & _TLS_AND_AUTH_PARAMETERS:
        why = (
            f"URL parameters {listed} would change TLS or authentication; set them with the "
            "settings ca_file, cert_file, key_file, key_password and auth (MQKIT_CA_FILE, ...), "
            "never in the URL"
        )
    else:
        why = (
            f"URL parameters {listed} are not read by mqkit; connection options are settings "
            "(heartbeat, connect_timeout, ...), so that both clients behave the same"
        )
    return f"{shown!r}: {why}; remove them from the URL"

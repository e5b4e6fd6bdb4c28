"""What went wrong, in words: the texts of the errors both runtimes raise.

Each shell's ``translate()`` maps its client's exception types (pika's, aiormq's) to one of
these functions and passes plain values: URLs, a timeout, the cause as text, the broker's
reply code and reply text. So the words live here once, and a user reads the same message
whichever runtime they run. Every URL and cause is masked (:func:`mqkit.settings.mask_url`).

```python
raise explain.unreachable(settings.all_urls, settings.connect_timeout, cause) from exc
raise explain.broker_refused(404, "NOT_FOUND - no queue 'x'", what="count dead letters") from exc
```
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from urllib.parse import urlsplit

from mqkit.errors import (
    ConfigError,
    ConnectionFailed,
    MqkitError,
    PublishError,
    PublishNacked,
    PublishTimeout,
    PublishTooLarge,
    PublishUnroutable,
    TopologyError,
)
from mqkit.settings import mask_url
from mqkit.topology import Binding, Entity, Exchange, Queue

__all__ = [
    "ACCESS_REFUSED",
    "NOT_FOUND",
    "PRECONDITION_FAILED",
    "RESOURCE_LOCKED",
    "broker_refused",
    "closed",
    "confirm_timeout",
    "declaring",
    "external_not_offered",
    "external_refused",
    "handler_is_async",
    "handler_is_generator",
    "handler_not_callable",
    "handler_signature",
    "inbox_handler_runtime",
    "inbox_no_message_id",
    "inbox_outside_handler",
    "link_lost",
    "many_failed",
    "missing_dlq",
    "nacked",
    "no_answer",
    "not_connected",
    "on_dead_letters",
    "outbox_bad_value",
    "outbox_dialect",
    "outbox_header_not_json",
    "outbox_key_for_queue",
    "outbox_no_file_lock",
    "outbox_no_target",
    "outbox_not_a_connection",
    "outbox_not_a_model",
    "outbox_not_an_engine",
    "outbox_relay_direct",
    "outbox_relay_runtime",
    "outbox_two_targets",
    "plain_to_tls",
    "publishing",
    "publishing_blocked",
    "target",
    "tls_file_invalid",
    "tls_file_unreadable",
    "tls_key_encrypted",
    "tls_key_mismatch",
    "tls_key_password_wrong",
    "tls_not_spoken",
    "tls_refused",
    "tls_setup",
    "tls_verify_failed",
    "too_large",
    "unknown_vhost",
    "unreachable",
    "unroutable",
    "using_existing",
    "wrong_credentials",
]

# AMQP reply codes of a channel the broker closed.
ACCESS_REFUSED = 403
NOT_FOUND = 404
RESOURCE_LOCKED = 405
PRECONDITION_FAILED = 406

# -------------------------------------------------------------------------- connecting


def unreachable(urls: Sequence[str], timeout: float, cause: str | None) -> ConnectionFailed:
    """No broker answered at any of ``urls`` within ``timeout`` seconds; ``cause`` is the
    last attempt's error as text (``None``: no attempt finished in time)."""
    hosts = ", ".join(dict.fromkeys(mask_url(url) for url in urls))
    last = mask_url(cause) if cause else "no attempt finished in time"
    return ConnectionFailed(
        f"cannot connect to {hosts} within {timeout:g}s (last error: {last}); "
        "is RabbitMQ running and reachable from here?"
    )


def wrong_credentials(url: str, cause: str) -> ConnectionFailed:
    """The broker at ``url`` refused the login (not retried: waiting does not fix it)."""
    return ConnectionFailed(
        f"cannot connect to {mask_url(url)}: wrong username or password ({mask_url(cause)}); "
        "check the credentials in the URL (MQKIT_URL)"
    )


def unknown_vhost(url: str, cause: str) -> ConnectionFailed:
    """The broker at ``url`` has no such virtual host, or the user may not use it."""
    vhost = urlsplit(url).path[1:] or "/"
    return ConnectionFailed(
        f"cannot connect to {mask_url(url)}: virtual host {vhost!r} does not exist or this "
        f"user may not use it ({mask_url(cause)}); create it (rabbitmqctl add_vhost) or fix "
        "the URL's path"
    )


# -------------------------------------------------------------------------- TLS and login
# None of these is retried: waiting does not fix a file, a certificate or a port.


def tls_setup(url: str, problem: str) -> ConnectionFailed:
    """TLS could not be set up for ``url`` from the local files; ``problem`` says why (one of
    the ``tls_file_*`` / ``tls_key_*`` texts)."""
    return ConnectionFailed(f"cannot connect to {mask_url(url)}: TLS setup failed: {problem}")


def tls_file_unreadable(setting: str, path: str, cause: str) -> str:
    """The file of ``setting`` (``ca_file``, ``cert_file``, ``key_file``) cannot be read."""
    return (
        f"{setting} {path!r} cannot be read ({cause}); set {setting} "
        f"(MQKIT_{setting.upper()}) to a PEM file this process may read"
    )


def tls_file_invalid(setting: str, path: str, cause: str) -> str:
    """The file of ``setting`` holds no usable PEM certificate or key."""
    what = {"ca_file": "CA certificate", "cert_file": "certificate"}.get(setting, "private key")
    return f"{setting} {path!r} holds no usable {what} ({cause}); give a PEM file"


def tls_key_mismatch(cert_file: str, key_file: str) -> str:
    """The key is not the certificate's."""
    return (
        f"key_file {key_file!r} is not the private key of cert_file {cert_file!r}; give the "
        "key that was made with that certificate"
    )


def tls_key_encrypted(key_file: str) -> str:
    """An encrypted key and no pass phrase."""
    return (
        f"key_file {key_file!r} is encrypted and no key_password is set; set key_password "
        "(MQKIT_KEY_PASSWORD): mqkit never prompts for a pass phrase"
    )


def tls_key_password_wrong(key_file: str) -> str:
    """The pass phrase does not decrypt the key."""
    return f"key_password does not decrypt key_file {key_file!r}; check the pass phrase"


def tls_verify_failed(url: str, reason: str) -> ConnectionFailed:
    """The broker's certificate did not verify (unknown CA, wrong host name, expired)."""
    return ConnectionFailed(
        f"cannot connect to {mask_url(url)}: TLS certificate verification failed ({reason}); "
        "the broker's certificate must be signed by a CA in ca_file (MQKIT_CA_FILE; without "
        "it, the system's CAs) and name the host in the URL: set ca_file to the CA that "
        "signed it, and connect by a name the certificate lists"
    )


def tls_not_spoken(url: str, reason: str) -> ConnectionFailed:
    """An amqps:// URL reached a port that does not speak TLS."""
    return ConnectionFailed(
        f"cannot connect to {mask_url(url)}: the TLS handshake failed ({reason}): that port "
        "does not speak TLS; use amqp:// for a plain port, or the broker's TLS port (usually "
        "5671) with amqps://"
    )


def plain_to_tls(url: str) -> ConnectionFailed:
    """An amqp:// URL reached a port that speaks TLS."""
    return ConnectionFailed(
        f"cannot connect to {mask_url(url)}: that port speaks TLS, and the URL asks for plain "
        "AMQP; use amqps:// (and ca_file) for this port, or the broker's plain port (usually "
        "5672)"
    )


def tls_refused(url: str, reason: str) -> ConnectionFailed:
    """The broker ended the TLS handshake with an alert (it rejected our certificate)."""
    return ConnectionFailed(
        f"cannot connect to {mask_url(url)}: the broker refused the TLS handshake ({reason}); "
        "it may require a client certificate (cert_file, key_file), or not trust the CA "
        "that signed the one given"
    )


def external_refused(url: str, cause: str) -> ConnectionFailed:
    """The broker refused an EXTERNAL (client certificate) login."""
    return ConnectionFailed(
        f"cannot connect to {mask_url(url)}: the broker refused the EXTERNAL login with the "
        f"client certificate ({mask_url(cause)}); it logs in as the user the certificate "
        "names (its distinguished name, or its common name with ssl_cert_login_from = "
        "common_name): that user must exist and may use the virtual host, and the TLS "
        "listener must ask for peer certificates (ssl_options.verify = verify_peer)"
    )


def external_not_offered(url: str, cause: str) -> ConnectionFailed:
    """auth='external', and the broker does not offer the EXTERNAL mechanism."""
    return ConnectionFailed(
        f"cannot connect to {mask_url(url)}: the broker does not offer EXTERNAL "
        f"authentication ({mask_url(cause)}); enable the rabbitmq_auth_mechanism_ssl plugin "
        "and list EXTERNAL in auth_mechanisms, or log in with auth='plain' and a user and "
        "password in the URL"
    )


def link_lost(what: str, cause: str) -> ConnectionFailed:
    """The connection (or the channel under it) went away while doing ``what``."""
    return ConnectionFailed(
        f"{what}: the connection to the broker was lost ({mask_url(cause)}); mqkit reconnects "
        "in the background: retry shortly"
    )


def no_answer(what: str, timeout: float | None = None) -> ConnectionFailed:
    """The broker did not answer ``what`` within ``timeout`` seconds (``None``: in time)."""
    within = "in time" if timeout is None else f"within {timeout:g}s"
    return ConnectionFailed(
        f"{what}: no answer from the broker {within}; is it overloaded or unreachable?"
    )


def not_connected(what: str, timeout: float, last_error: str | None) -> ConnectionFailed:
    """``what`` waited ``timeout`` seconds for a connection that did not come back."""
    because = f" (last error: {mask_url(last_error)})" if last_error else ""
    return ConnectionFailed(
        f"{what}: not connected to the broker{because} after waiting {timeout:g}s; mqkit "
        "keeps reconnecting in the background"
    )


def closed(what: str) -> ConnectionFailed:
    """``what`` was tried on a client that was closed."""
    return ConnectionFailed(f"{what}: the mqkit client is closed; open a new one")


# -------------------------------------------------------------------------- topology


def declaring(entity: Entity, *, passive: bool = False) -> str:
    """What declaring ``entity`` means, for error messages ("declare queue 'orders'";
    ``passive``: "check that queue 'orders' exists")."""
    verb = "check that {} exists" if passive else "declare {}"
    if isinstance(entity, Queue):
        return verb.format(f"queue {entity.name!r}")
    if isinstance(entity, Exchange):
        return verb.format(f"exchange {entity.name!r}")
    assert isinstance(entity, Binding)
    return (
        f"bind queue {entity.queue!r} to exchange {entity.exchange!r} "
        f"with routing key {entity.routing_key!r}"
    )


_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<arg>[^']+)' for (?P<kind>queue|exchange) '(?P<name>[^']+)' "
    r"in vhost '[^']*': received (?P<received>.+) but current is (?P<current>.+)$"
)


def broker_refused(
    reply_code: int | None, reply_text: str, *, what: str, missing: str | None = None
) -> TopologyError:
    """The broker closed the channel with ``reply_code`` (``None``: not known) and
    ``reply_text`` while doing ``what`` (e.g. "declare queue 'orders'"). ``missing``
    replaces the advice for NOT_FOUND (default: "declare it first")."""
    error = _refused(reply_code, mask_url(reply_text), what, missing)
    error.reply_code = reply_code
    return error


def using_existing(entity: Entity, refused: TopologyError) -> str:
    """The WARNING for a queue (or exchange) that exists in a shape mqkit did not declare
    (``refused``: why the broker refused mqkit's declare), and that mqkit uses as it is."""
    if isinstance(entity, Queue):
        name = entity.name
        limits = (
            "mqkit's retries and dead letters still work (they are published copies, into "
            f"the service's retry tiers and {name}.dlq), but the broker will not park a message "
            "whose "
            "consumer crashes or loses its connection before acking it: it may be redelivered "
            "without end, or dropped by the queue's own delivery limit"
        )
        kind = "queue"
    else:
        name = entity.name if isinstance(entity, Exchange) else str(entity)
        limits = "it is used with its own type and arguments"
        kind = "exchange"
    if refused.reply_code == ACCESS_REFUSED:
        why = "this user may not configure it"
    else:  # drop the advice ("delete it, or ..."): here mqkit takes the queue as it is
        why = str(refused).rsplit("; ", 1)[0]
    return (
        f"using the existing {kind} {name!r} as it is ({why}): {limits}. "
        "Set declare='strict' to make this an error."
    )


def _refused(reply_code: int | None, text: str, what: str, missing: str | None) -> TopologyError:
    if reply_code == PRECONDITION_FAILED:
        return TopologyError(_precondition(text, what))
    if reply_code == NOT_FOUND:
        return TopologyError(f"{what}: not found ({text}); {missing or 'declare it first'}")
    if reply_code == RESOURCE_LOCKED:
        return TopologyError(
            f"{what}: locked ({text}); an exclusive queue belongs to the connection that "
            "declared it: use another name, or stop the service holding it"
        )
    if reply_code == ACCESS_REFUSED:
        return TopologyError(
            f"{what}: access refused ({text}); grant the user permission, or use a name "
            "that does not start with 'amq.'"
        )
    code = "" if reply_code is None else f"{reply_code} "
    return TopologyError(f"{what}: the broker closed the channel ({code}{text})")


def _precondition(text: str, what: str) -> str:
    match = _INEQUIVALENT.search(text)
    if match is None:
        return f"{what}: precondition failed ({text})"
    kind, name, arg = match["kind"], match["name"], match["arg"]
    current = match["current"].strip()
    detail = f"inequivalent arg {arg!r}: received {match['received']} but current is {current}"
    advice = "delete it, or declare it as it is"
    if arg == "x-queue-type":
        # "current is 'classic'", "current is the value 'classic' of type 'longstr'"
        value = re.search(r"'([^']*)'", current)
        existing = value.group(1) if value else "classic"  # no x-queue-type means classic
        advice += f" (queue_type={existing!r})"
    return f"{kind} {name!r} already exists with other arguments ({detail}); {advice}"


def on_dead_letters(action: str, dlq: str) -> str:
    """What a dead-letter tool was doing ("count the dead letters in 'orders.dlq'")."""
    return f"{action} the dead letters in {dlq!r}"


def missing_dlq(queue: str) -> str:
    """The advice when ``queue``'s DLQ is not there (``missing=`` of :func:`broker_refused`)."""
    return f"a dead-letter queue does not exist until a consumer of {queue!r} has started"


# -------------------------------------------------------------------------- publishing


def target(exchange: str, routing_key: str) -> str:
    """Where a publish goes: "queue 'q'" (the default exchange) or "exchange 'e' (routing
    key 'k')"."""
    if exchange:
        return f"exchange {exchange!r} (routing key {routing_key!r})"
    return f"queue {routing_key!r}"


def publishing(message_id: str, exchange: str, routing_key: str) -> str:
    """What publishing one message means, for error messages."""
    return f"publish message {message_id} to {target(exchange, routing_key)}"


def unroutable(what: str, reply: str) -> PublishUnroutable:
    """A mandatory publish came back (basic.return) with ``reply`` ("312 NO_ROUTE")."""
    return PublishUnroutable(
        f"{what}: the broker returned it as unroutable ({reply}); no queue is bound for it: "
        "declare the queue, or a binding for that routing key, first"
    )


def nacked(what: str) -> PublishNacked:
    """The broker nacked a publish."""
    return PublishNacked(
        f"{what}: the broker nacked it; a queue may be full (overflow=reject-publish) or the "
        "broker is short of resources: retry later"
    )


def confirm_timeout(
    what: str, timeout: float, cause: str | None = None, *, unconfirmed: Sequence[str] = ()
) -> PublishTimeout:
    """No confirm within ``timeout`` seconds for the messages ``unconfirmed`` (``cause``:
    why, when known, such as the link being down)."""
    because = mask_url(cause) if cause else "the broker did not answer"
    return PublishTimeout(
        f"{what}: no confirm within {timeout:g}s ({because}); it may have been stored after "
        "all (the broker stores what it had accepted once it answers again, e.g. when a "
        "memory or disk alarm clears). Its message id is kept (.unconfirmed): to send it "
        "again, publish it with that same message_id, so an idempotent consumer drops the "
        "duplicate",
        unconfirmed=unconfirmed,
    )


def publishing_blocked(reason: str) -> str:
    """Why publishes get no confirm while the broker blocks the publishing connection
    (``reason``: the broker's, e.g. "low on memory"); the ``cause`` of
    :func:`confirm_timeout`."""
    return (
        f"the broker is blocking this client's publishing connection ({reason}): a memory or "
        "disk alarm; publishing resumes by itself once the alarm clears"
    )


def too_large(
    what: str, size: int, limit: int, *, broker: bool, unconfirmed: Sequence[str] = ()
) -> PublishTooLarge:
    """A message whose body is ``size`` bytes is above ``limit``: the broker's own
    max_message_size (``broker``: it refused a message for its size) or mqkit's
    ``max_message_size`` setting (checked before sending)."""
    if broker:
        where = f"the broker's max_message_size of {limit} bytes, so the broker did not store it"
        advice = (
            "raise the broker's limit, and set mqkit's max_message_size to match so such a "
            "message fails before it is sent"
        )
    else:
        where = f"the max_message_size setting of {limit} bytes, so it was not sent"
        advice = "raise the setting together with the broker's max_message_size"
    return PublishTooLarge(
        f"{what}: too large: the body is {size} bytes, above {where}; send a smaller message "
        f"(e.g. store the payload elsewhere and send a reference to it), or {advice}",
        size=size,
        limit=limit,
        unconfirmed=unconfirmed,
    )


def many_failed(
    errors: Sequence[MqkitError], *, total: int, unconfirmed: Sequence[str]
) -> MqkitError:
    """The one error for a batch of ``total`` publishes of which some failed with ``errors``.

    A single publish raises its own error; so does a batch whose errors are all
    :class:`TopologyError` (a missing exchange). Otherwise a :class:`PublishError` of the
    specific subclass when every failure is of one kind, whose ``unconfirmed`` lists the ids.
    """
    assert errors, "many_failed() needs at least one error"
    kinds = {type(error) for error in errors}
    if total == 1 or kinds == {TopologyError}:
        first = errors[0]
        if isinstance(first, PublishError):
            first.unconfirmed = list(unconfirmed)
        return first
    kind = kinds.pop() if len(kinds) == 1 else PublishError
    cls = kind if issubclass(kind, PublishError) else PublishError
    summary = "; ".join(sorted({str(error) for error in errors})[:3])
    return cls(
        f"{len(unconfirmed)} of {total} messages were not confirmed: {summary}; "
        "see .unconfirmed for their ids",
        unconfirmed=unconfirmed,
    )


# -------------------------------------------------------------------------- handlers


def handler_not_callable(role: str, handler: object) -> TypeError:
    """``handler`` given to ``role`` (e.g. "consumer of queue 'orders'") cannot be called."""
    return TypeError(
        f"{role}: the handler must be a function taking (message, ctx), got {handler!r} "
        f"(a {type(handler).__name__}); pass the function itself"
    )


def handler_is_async(role: str, name: str) -> TypeError:
    """An ``async def`` handler given to the blocking Client, which would never await it."""
    return TypeError(
        f"{role}: the handler {name} is an async def function, and Client runs handlers on "
        "worker threads: it would never be awaited, and its messages would be acked unhandled; "
        f"use mqkit.AsyncClient for async handlers, or make {name} a plain function"
    )


def handler_is_generator(role: str, name: str) -> TypeError:
    """A generator function as handler: calling it would not run its body."""
    return TypeError(
        f"{role}: the handler {name} is a generator function (it yields), so calling it "
        "would not run its body and every message would be acked unhandled; make it a "
        "function that returns"
    )


def handler_signature(role: str, name: str, signature: str, why: str) -> TypeError:
    """A handler that cannot be called as ``handler(message, ctx)`` (``why``: Python's
    reason)."""
    return TypeError(
        f"{role}: the handler {name}{signature} cannot be called as handler(message, ctx) "
        f"({why}); give it two positional parameters, e.g. def {name}(message, ctx): ..."
    )


# -------------------------------------------------------------------------- outbox and inbox


def outbox_not_a_model(message: object) -> TypeError:
    """``outbox.publish`` was given something that is not a pydantic model."""
    return TypeError(
        f"outbox.publish expects a message (a pydantic model instance), got "
        f"{type(message).__name__}; pass e.g. OrderPlaced(...), not a dict or its JSON"
    )


def outbox_two_targets(queue: str, exchange: str) -> ConfigError:
    """``outbox.publish`` was given both ``queue=`` and ``exchange=``."""
    return ConfigError(
        f"outbox.publish got queue={queue!r} and exchange={exchange!r}; a message goes to a "
        "queue, or to an exchange with a routing key: pass one of them"
    )


def outbox_key_for_queue(queue: str, routing_key: str) -> ConfigError:
    """``routing_key=`` given with ``queue=`` (and not equal to it)."""
    return ConfigError(
        f"outbox.publish(queue={queue!r}) sends to that queue; routing_key={routing_key!r} "
        "does not apply (use exchange= with routing_key= to route by key)"
    )


def outbox_no_target(type_name: str) -> ConfigError:
    """A message that is not an Event given no ``queue=`` / ``exchange=``."""
    return ConfigError(
        f"outbox.publish({type_name}) needs queue= or exchange=: only an mqkit.Event goes to "
        "the event bus when no target is given"
    )


def outbox_header_not_json(path: str, value: object) -> TypeError:
    """A header ``outbox.publish`` cannot keep in its row (the row keeps headers as JSON)."""
    return TypeError(
        f"outbox.publish: header {path} is {type(value).__name__} {value!r:.80}, which the "
        "outbox cannot store: headers must map strings to strings, numbers, booleans, None, "
        "or lists and string-keyed objects of those"
    )


def outbox_bad_value(what: str, value: object, need: str) -> ConfigError:
    """An outbox or inbox argument ``what`` with a value it cannot take (``need``: what it
    needs)."""
    return ConfigError(f"{what}={value!r:.80} is not usable: it must be {need}")


def outbox_not_an_engine(role: str, value: object) -> TypeError:
    """``Outbox(...)`` / ``Inbox(...)`` given something that is not a SQLAlchemy engine."""
    return TypeError(
        f"{role} expects a SQLAlchemy Engine (or AsyncEngine), got {type(value).__name__}; "
        "make one with sqlalchemy.create_engine(url) or "
        "sqlalchemy.ext.asyncio.create_async_engine(url)"
    )


def outbox_dialect(role: str, dialect: str) -> ConfigError:
    """An engine of a database the outbox does not support."""
    return ConfigError(
        f"{role} works on PostgreSQL and SQLite, not on {dialect}: its relay needs "
        "PostgreSQL's FOR UPDATE SKIP LOCKED or SQLite's single writer to claim rows safely"
    )


def outbox_not_a_connection(value: object, *, expects_async: bool | None) -> TypeError:
    """``outbox.publish`` given something other than the connection of a transaction."""
    kind = type(value).__name__
    hint = (
        "async with engine.begin() as conn: await outbox.publish(conn, message)"
        if expects_async
        else "with engine.begin() as conn: outbox.publish(conn, message)"
    )
    extra = (
        "; an Engine has no transaction of yours to write in"
        if kind in ("Engine", "AsyncEngine")
        else ""
    )
    return TypeError(
        f"outbox.publish expects the Connection (or Session) of your transaction, got "
        f"{kind}{extra}; write it as: {hint}"
    )


def outbox_relay_runtime(client: str, engine: str) -> ConfigError:
    """A relay whose client and outbox engine are of different runtimes."""
    other = "AsyncClient" if client == "Client" else "Client"
    return ConfigError(
        f"a {client}'s outbox relay needs an Outbox on a "
        f"{'AsyncEngine' if client == 'AsyncClient' else 'blocking Engine'}, but this one is "
        f"on a {engine}; use {other}.outbox_relay(outbox), or make the Outbox on "
        f"{'create_async_engine(url)' if client == 'AsyncClient' else 'create_engine(url)'}"
    )


def outbox_relay_direct(client: str) -> TypeError:
    """An outbox relay made without its client's publisher (``OutboxRelay(client, outbox)``)."""
    return TypeError(
        f"an outbox relay is made by its {client}: use client.outbox_relay(outbox) "
        "(it publishes through the client's confirmed publisher, and the client's run() and "
        "close() start and stop it)"
    )


def inbox_handler_runtime(name: str, *, handler_async: bool, engine_async: bool) -> TypeError:
    """``inbox.handler(fn)`` where ``fn`` and the inbox's engine are of different runtimes."""
    if handler_async:
        return TypeError(
            f"inbox.handler({name}): {name} is an async def function but this Inbox is on a "
            "blocking Engine; make the Inbox on an AsyncEngine (create_async_engine), or make "
            f"{name} a plain function"
        )
    return TypeError(
        f"inbox.handler({name}): {name} is a plain function but this Inbox is on an "
        f"AsyncEngine, whose transactions must be awaited; make {name} an async def function, "
        "or make the Inbox on a blocking Engine (create_engine)"
    )


def inbox_no_message_id(queue: str) -> str:
    """The reason a message without a ``message_id`` is dead-lettered by an inbox handler."""
    return (
        f"the message on {queue!r} has no message_id, so the inbox cannot tell a redelivery "
        "from a new message; publish it with a message_id (mqkit publishers always set one)"
    )


def inbox_outside_handler() -> LookupError:
    """``inbox.connection()`` called outside a handler the inbox wrapped."""
    return LookupError(
        "inbox.connection() is only available while a handler wrapped by inbox.handler(...) "
        "runs; call it from that handler (or from code it calls)"
    )


def outbox_no_file_lock(path: str) -> ConfigError:
    """No ``fcntl`` here to make SQLite relays take turns."""
    return ConfigError(
        f"the outbox relay cannot lock {path}: this platform has no fcntl.flock, which makes "
        "SQLite relays take turns; run the relay on PostgreSQL, or on a POSIX system"
    )


# -- middleware and observability (issue 11) ---------------------------------------------------


def middleware_not_middleware(value: object, client: str) -> TypeError:
    """An item of ``middleware=[...]`` that is not a :class:`mqkit.Middleware`."""
    return TypeError(
        f"{client}(middleware=...) takes mqkit.Middleware objects, got {value!r} "
        f"({type(value).__name__}); subclass mqkit.Middleware and override the hooks you need "
        "(publish / handle for Client, publish_async / handle_async for AsyncClient, "
        "on_event for both)"
    )


def middleware_runtime(name: str, hook: str, client: str) -> TypeError:
    """A middleware whose hooks are for the other client (``hook``: the one it defines)."""
    if client == "AsyncClient":
        twin = f"{hook}_async"
        return TypeError(
            f"middleware {name} defines {hook}(), which Client calls; AsyncClient awaits "
            f"{twin}() instead: define `async def {twin}(...)` (or give {name} to a Client)"
        )
    plain = hook.removesuffix("_async")
    return TypeError(
        f"middleware {name} defines {hook}(), which AsyncClient awaits; Client calls "
        f"{plain}() instead: define a plain `def {plain}(...)` (or give {name} to an AsyncClient)"
    )


def middleware_coroutine_hook(name: str, hook: str) -> TypeError:
    """A hook that must be a plain function (``publish``, ``handle``, ``on_event``) is an
    ``async def``."""
    if hook == "on_event":
        return TypeError(
            f"middleware {name}: on_event is an async def function, but the pipeline calls it "
            "as a plain function on both clients (it must be quick and must not block); make "
            "it a plain def"
        )
    return TypeError(
        f"middleware {name}: {hook}() is an async def function; Client calls {hook}() as a "
        f"plain function and AsyncClient awaits {hook}_async(): rename it to {hook}_async"
    )


def middleware_plain_async_hook(name: str, hook: str) -> TypeError:
    """``publish_async`` / ``handle_async`` defined as a plain function."""
    return TypeError(
        f"middleware {name}: {hook}() is a plain function; AsyncClient awaits it, so define "
        f"it as `async def {hook}(...)`"
    )


def middleware_publish_result(name: str, result: object, count: int) -> TypeError:
    """A publish hook that did not return one message id per message."""
    return TypeError(
        f"middleware {name}: publish hook returned {result!r}, not a list of {count} message "
        "id(s); return what call_next(messages) returned (one id per message, in order)"
    )


def missing_extra(feature: str, extra: str, module: str) -> ImportError:
    """An optional feature whose extra is not installed."""
    return ImportError(
        f"{feature} needs the {module!r} package, which is not installed; "
        f"install it with: pip install 'mqkit[{extra}]'"
    )

"""How mqkit logs, and what it does to the logging of the libraries it runs on.

mqkit logs through child loggers of ``mqkit`` (``mqkit.connection``, ``mqkit.publisher``,
``mqkit.consumer``, ``mqkit.retry``, ``mqkit.dlq``, ...), at the levels of one policy for
both clients (:data:`mqkit.lifecycle.LOG_POLICY`; :func:`policy_table` prints it as the
README's table), with each record's fields also in ``extra=`` for JSON formatters.

Importing mqkit (:func:`install`, called once by ``mqkit/__init__.py``):

- adds a :class:`logging.NullHandler` to the ``mqkit`` logger: a library installs no handler
  of its own, so without logging configured nothing is printed (configure logging, e.g.
  ``logging.basicConfig(level=logging.INFO)``, to see mqkit's records);
- quiets ``pika``, ``aiormq`` and ``aio_pika`` (their level set to ``CRITICAL``), unless the
  application set a level on them first: mqkit reports what they would say (a refused
  connection, a lost link) once, in its own words, where they repeat it per attempt. To see
  them again, :func:`show_client_library_logs` (or set their level yourself).
"""

from __future__ import annotations

import logging

from mqkit.lifecycle import LOG_POLICY, DeadLettered

__all__ = ["CLIENT_LIBRARIES", "install", "policy_table", "show_client_library_logs"]

CLIENT_LIBRARIES = ("pika", "aiormq", "aio_pika")

_installed = False


def install() -> None:
    """mqkit's logging defaults (see the module's docstring); idempotent."""
    global _installed
    if _installed:
        return
    _installed = True
    root = logging.getLogger("mqkit")
    if not any(isinstance(h, logging.NullHandler) for h in root.handlers):
        root.addHandler(logging.NullHandler())
    for name in CLIENT_LIBRARIES:
        library = logging.getLogger(name)
        if library.level == logging.NOTSET:  # the application has not chosen: quiet
            library.setLevel(logging.CRITICAL)


def show_client_library_logs(level: int = logging.WARNING) -> None:
    """Let pika's, aiormq's and aio-pika's own records through again, from ``level`` up
    (they still need a handler: your logging configuration's)."""
    for name in CLIENT_LIBRARIES:
        logging.getLogger(name).setLevel(level)


def policy_table() -> str:
    """The logging policy of both clients as a Markdown table (the README's "Logging")."""
    rows = [
        "| event | logger | level | message |",
        "|---|---|---|---|",
    ]
    for event, rule in LOG_POLICY.items():
        level = logging.getLevelName(rule.level)
        if event is DeadLettered:
            level = "ERROR (WARNING for `Reject`)"
        elif event.name == "consumer_detached":
            level = "INFO (WARNING when lost)"
        message = rule.message.replace("{target}", "{exchange} ({routing_key})")
        message = message.replace(":.3f", "").replace(":g", "")
        rows.append(f"| `{event.name}` | `{rule.logger}` | {level} | {message} |")
    rows.append(
        "| (the traceback of a failed handler) | `mqkit.retry`, `mqkit.dlq` | DEBUG | "
        "traceback of {message_id}: ... (its own record, after the WARNING or ERROR) |"
    )
    return "\n".join(rows)

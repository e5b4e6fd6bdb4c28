"""The ``mqkit`` command line: look at and act on a queue's dead letters.

```
mqkit dlq list    QUEUE [--limit N]                          a table of QUEUE.dlq's dead letters
mqkit dlq peek    QUEUE [--limit N] [--json]                 full details (headers, body)
mqkit dlq replay  QUEUE [--limit N] [--error-type T] [--message-id ID] [--yes]
mqkit dlq purge   QUEUE [--yes]                              delete every dead letter
mqkit dlq export  QUEUE [--output FILE|-] [--limit N]        JSON lines, one dead letter each
mqkit --version
```

Every ``dlq`` command takes ``--url`` (else ``MQKIT_URL`` / ``MQKIT_URLS``, as for
:class:`mqkit.Settings`), ``--service`` and ``--connect-timeout``. ``list``, ``peek`` and
``export`` remove nothing. ``replay`` and ``purge`` ask first; without a terminal to ask on
they refuse unless given ``--yes``.

Exit codes:

== ==========================================================================================
0  success (also when there was nothing to do, e.g. no dead letter matched --error-type)
1  aborted at the confirmation prompt, or an unexpected mqkit error
2  usage error: bad arguments or settings, or confirmation needed but stdin is not a terminal
3  cannot connect: broker unreachable, wrong credentials, unknown vhost
4  the queue (its DLQ) does not exist, or other topology error
5  replay failed part-way: some dead letters were replayed, the rest are still in the DLQ
6  ``replay --message-id ID``: no dead letter has that id (nothing was replayed)
== ==========================================================================================

The commands read only the settings they use: a bad value of another ``MQKIT_*`` variable
(``MQKIT_PREFETCH=abc``, say) is ignored with a warning instead of stopping them. No output
ever shows a password (:func:`mqkit.settings.mask_url`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import IO, Annotated, Any, cast

import typer
from rich import box
from rich.console import Console, Group
from rich.json import JSON
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

import mqkit
from mqkit.dead_letters import TRACEBACK, DeadLetter
from mqkit.errors import ConfigError, ConnectionFailed, MqkitError, PublishError, TopologyError
from mqkit.outbox.cli import app as outbox_app
from mqkit.settings import Settings, mask_url
from mqkit.topology import dlq_name
from mqkit.urls import memory_name

__all__ = [
    "EXIT_ABORTED",
    "EXIT_CONNECT",
    "EXIT_MISSING",
    "EXIT_NO_MATCH",
    "EXIT_OK",
    "EXIT_PARTIAL",
    "EXIT_USAGE",
    "app",
    "main",
]

EXIT_OK = 0
EXIT_ABORTED = 1
EXIT_USAGE = 2
EXIT_CONNECT = 3
EXIT_MISSING = 4
EXIT_PARTIAL = 5
EXIT_NO_MATCH = 6

# Settings no dlq command uses: a bad MQKIT_* value of one of these is ignored, with a
# warning, rather than a reason to refuse to look at dead letters. (A setting not listed
# here is treated as used: a new one errs on the side of refusing.)
UNUSED_SETTINGS = (
    "prefetch",
    "drain_timeout",
    "queue_type",
    "delivery_limit",
    "events_exchange",
    "declare",
)

app = typer.Typer(
    name="mqkit",
    help="mqkit: typed RabbitMQ messaging. Command line tools.",
    no_args_is_help=True,
    add_completion=False,
    # Locals can hold settings with a password in them: never print them.
    pretty_exceptions_show_locals=False,
)
dlq_app = typer.Typer(
    help=(
        "Inspect and act on a queue's dead letters (QUEUE.dlq). Exit codes: 0 ok, 1 aborted, "
        "2 usage, 3 cannot connect, 4 queue missing, 5 replay failed part-way, "
        "6 no dead letter has the --message-id."
    ),
    no_args_is_help=True,
)
app.add_typer(dlq_app, name="dlq")
app.add_typer(
    outbox_app, name="outbox"
)  # loads without SQLAlchemy; its commands say what to install

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

QueueArg = Annotated[
    str, typer.Argument(metavar="QUEUE", help="The work queue; its dead letters are in QUEUE.dlq.")
]
UrlOpt = Annotated[
    str | None,
    typer.Option(
        "--url",
        help="Broker URL (a comma-separated list fails over). Default: $MQKIT_URL, "
        "else the guest user on localhost:5672.",
        show_default=False,
    ),
]
ServiceOpt = Annotated[
    str | None,
    typer.Option("--service", help="Service name (app_id). Default: $MQKIT_SERVICE or 'mqkit'."),
]
TimeoutOpt = Annotated[
    float | None,
    typer.Option(
        "--connect-timeout",
        min=0.1,
        help="Seconds to keep trying to connect. Default: $MQKIT_CONNECT_TIMEOUT or 10.",
    ),
]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mqkit {mqkit.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """mqkit: typed RabbitMQ messaging. Command line tools."""


def _fail(code: int, message: str) -> typer.Exit:
    err.print(Text("error: ", style="bold red") + Text(mask_url(message)))
    return typer.Exit(code)


@contextmanager
def _client(
    url: str | None, service: str | None, connect_timeout: float | None
) -> Iterator[mqkit.Client]:
    """A connected blocking client; mqkit errors become a message and an exit code."""
    overrides: dict[str, Any] = {}
    if url is not None:
        overrides.update(url=url, urls=[])  # --url wins over MQKIT_URLS too
    if service is not None:
        overrides["service"] = service
    if connect_timeout is not None:
        overrides["connect_timeout"] = connect_timeout
    try:
        settings = _settings(overrides)
        if _OWN_PROCESS and any(memory_name(u) is not None for u in settings.all_urls):
            err.print(
                Text("warning: ", style="bold yellow")
                + Text(
                    "memory:// brokers live inside one Python process: this mqkit command "
                    "has a new, empty one. Run the commands in your tests' process "
                    "(typer.testing.CliRunner on mqkit.cli.app), or give --url a RabbitMQ."
                )
            )
        with mqkit.Client(settings) as client:
            yield client
    except ConfigError as exc:
        raise _fail(EXIT_USAGE, str(exc)) from None
    except ConnectionFailed as exc:
        raise _fail(EXIT_CONNECT, f"cannot connect to the broker: {exc}") from None
    except TopologyError as exc:
        raise _fail(EXIT_MISSING, str(exc)) from None
    except PublishError as exc:
        raise _fail(EXIT_PARTIAL, str(exc)) from None
    except MqkitError as exc:
        raise _fail(EXIT_ABORTED, f"{type(exc).__name__}: {exc}") from None


def _settings(overrides: dict[str, Any]) -> Settings:
    """Settings from ``overrides`` and the environment, where a bad ``MQKIT_*`` value of a
    setting the dlq commands do not use (:data:`UNUSED_SETTINGS`) is left out, with a warning
    naming it; any other bad value raises ConfigError as usual."""
    try:
        return Settings(**overrides)
    except ConfigError:
        unused = _unused_variables()
        if not unused:
            raise
        with _hidden(unused):
            Settings(**overrides)  # still invalid without them: a setting we use is wrong
        bad: list[str] = []
        for name in sorted(unused):
            with _hidden(unused - {name}):
                try:
                    Settings(**overrides)
                except ConfigError as exc:
                    bad.append(name)
                    reason = str(exc).removeprefix("invalid mqkit settings: ")
                    setting = name.upper().removeprefix("MQKIT_").lower()
                    err.print(
                        Text("warning: ", style="bold yellow")
                        + Text(f"ignoring {reason} (mqkit dlq does not use {setting})")
                    )
        with _hidden(set(bad)):
            return Settings(**overrides)


def _unused_variables() -> set[str]:
    """The environment variables (as spelled there) of :data:`UNUSED_SETTINGS`."""
    wanted = {f"MQKIT_{name.upper()}" for name in UNUSED_SETTINGS}
    return {name for name in os.environ if name.upper() in wanted}


@contextmanager
def _hidden(names: Collection[str]) -> Iterator[None]:
    """Leave ``names`` out of the environment meanwhile (the command line is one thread)."""
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _need_terminal(yes: bool, action: str) -> None:
    """Refuse (exit 2) when confirmation is needed but there is no terminal to ask on.

    Checked before connecting: a script that forgot ``--yes`` learns it at once."""
    if not yes and not sys.stdin.isatty():
        raise _fail(
            EXIT_USAGE,
            f"refusing to {action} without confirmation: standard input is not a terminal; "
            "pass --yes to confirm",
        )


def _confirm(question: str, yes: bool, action: str) -> None:
    """Ask ``question`` unless ``yes`` (exit 1 if the answer is no)."""
    if yes:
        return
    _need_terminal(yes, action)
    if not typer.confirm(question, default=False, err=True):
        err.print("aborted; nothing was changed")
        raise typer.Exit(EXIT_ABORTED)


def _progress(*, disable: bool = False) -> Progress:
    # On stderr, and without redirecting stdout: export may be writing JSON lines there.
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        redirect_stdout=False,
        redirect_stderr=False,
        disable=disable,
    )


def _when(value: datetime | None, *, short: bool = False) -> str:
    if value is None:
        return "-"
    if value.tzinfo is not None:
        value = value.astimezone(timezone.utc)
    if short:  # a narrow table: the year only when it is not this one
        this_year = value.year == datetime.now(timezone.utc).year
        return value.strftime("%m-%d %H:%M" if this_year else "%Y-%m-%d")
    return value.strftime("%Y-%m-%d %H:%M:%S")


def _short(text: str, width: int = 60) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    if len(line) > width or line != text.strip():
        return line[: width - 1].rstrip() + "…"
    return line


def _plural(n: int, word: str = "dead letter") -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


@dlq_app.command("list")
def list_(
    queue: QueueArg,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Show at most N.")] = 50,
    url: UrlOpt = None,
    service: ServiceOpt = None,
    connect_timeout: TimeoutOpt = None,
) -> None:
    """A table of QUEUE's dead letters: id, error, attempts, original queue, when."""
    with _client(url, service, connect_timeout) as client:
        dead = client.dead_letters(queue)
        total = dead.count()
        letters: list[DeadLetter] = dead.peek(limit) if total else []
    if not letters:
        out.print(f"{dlq_name(queue)}: 0 dead letters")
        return
    table = Table(
        box=box.SIMPLE,
        title=f"{dlq_name(queue)}: {_plural(total)}",
        caption=f"showing {len(letters)} of {total}" if len(letters) < total else None,
    )
    if out.width >= _WIDE:
        _wide_rows(table, letters, queue)
    else:
        _narrow_rows(table, letters, queue)
    out.print(table)


_WIDE = 120  # columns from which list shows one line per dead letter


def _wide_rows(table: Table, letters: list[DeadLetter], queue: str) -> None:
    """One line per dead letter; long error messages are cut to one line (_short), ids
    stay whole (copyable, for ``replay --message-id``). The original queue is shown only
    when some dead letter came from another queue than ``queue``."""
    elsewhere = any(letter.original_queue not in ("", queue) for letter in letters)
    table.add_column("message id", overflow="fold", no_wrap=True, min_width=32)
    table.add_column("error type", style="red", overflow="fold", min_width=8)
    table.add_column("error message", min_width=16)
    table.add_column("attempts", justify="right", min_width=3)
    if elsewhere:
        table.add_column("original queue", overflow="fold", min_width=8)
    table.add_column("failed at (UTC)", no_wrap=True, min_width=19)
    for letter in letters:
        cells: list[Text | str] = [
            Text(letter.message_id or "-"),
            Text(letter.error_type),
            Text(_short(letter.error_message)),
            str(letter.attempts),
        ]
        if elsewhere:
            cells.append(Text(letter.original_queue))
        table.add_row(*cells, _when(letter.failed_at))


def _narrow_rows(table: Table, letters: list[DeadLetter], queue: str) -> None:
    """Two lines per dead letter, for a terminal of 80 columns: the id whole (copyable), then
    the error cut to the width left; the original queue only where it is not ``queue``."""
    table.show_lines = True
    # What the other two columns and the padding take (at 80 columns: 48 for the first).
    room = max(32, out.width - 32)
    table.add_column("message id / error", no_wrap=True, min_width=32, max_width=room)
    table.add_column("tries", justify="right", no_wrap=True, min_width=5)
    table.add_column("failed at (UTC)", no_wrap=True, min_width=15)
    for letter in letters:
        error = letter.error_type
        if letter.error_message.strip():
            error += ": " + letter.error_message
        if letter.original_queue not in ("", queue):
            error = f"(from {letter.original_queue}) {error}"
        table.add_row(
            Text(letter.message_id or "-") + Text("\n") + Text(_short(error, room), style="red"),
            str(letter.attempts),
            _when(letter.failed_at, short=True),
        )


def _body(body: bytes) -> Any:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return Text(f"({len(body)} bytes, not UTF-8) {body[:200]!r}", style="dim")
    try:
        json.loads(text)
    except ValueError:
        return Text(text)
    return JSON(text)


def _details(letter: DeadLetter, index: int, total: int) -> Panel:
    data = letter.to_json()
    fields = Table.grid(padding=(0, 2))
    fields.add_column(style="bold")
    fields.add_column()
    for name, value in (
        ("error type", letter.error_type),
        ("error message", letter.error_message),
        ("attempts", str(letter.attempts)),
        ("original queue", letter.original_queue),
        ("failed at", f"{_when(letter.failed_at)} UTC"),
        ("type", data.get("type") or "-"),
        ("correlation id", data.get("correlation_id") or "-"),
        ("app id", letter.incoming.app_id or "-"),
        ("content type", letter.incoming.content_type or "-"),
    ):
        fields.add_row(name, Text(str(value)))
    headers = Table("header", "value", box=None, show_header=True, header_style="bold")
    for key, value in data["headers"].items():
        if key == TRACEBACK:
            continue
        shown = value if isinstance(value, str) else json.dumps(value, default=str)
        headers.add_row(Text(key), Text(shown))
    parts: list[Any] = [fields, Text(""), headers, Text(""), Text("body", style="bold")]
    parts.append(_body(letter.body))
    trace = data["headers"].get(TRACEBACK)
    if trace:
        parts += [Text(""), Text("traceback", style="bold"), Text(str(trace), style="dim")]
    return Panel(
        Group(*parts),
        title=Text(f"[{index}/{total}] message {letter.message_id or '-'}"),
        title_align="left",
    )


@dlq_app.command()
def peek(
    queue: QueueArg,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Show at most N.")] = 10,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a JSON array instead of panels.")
    ] = False,
    url: UrlOpt = None,
    service: ServiceOpt = None,
    connect_timeout: TimeoutOpt = None,
) -> None:
    """Full details of the first N dead letters (headers, body); removes nothing."""
    with _client(url, service, connect_timeout) as client:
        letters: list[DeadLetter] = client.dead_letters(queue).peek(limit)
    if as_json:
        sys.stdout.write(json.dumps([letter.to_json() for letter in letters], indent=2) + "\n")
        return
    if not letters:
        out.print(f"{dlq_name(queue)} is empty")
        return
    for index, letter in enumerate(letters, 1):
        out.print(_details(letter, index, len(letters)))


@dlq_app.command()
def replay(
    queue: QueueArg,
    limit: Annotated[
        int | None, typer.Option("--limit", "-n", min=1, help="Replay at most N.")
    ] = None,
    error_type: Annotated[
        str | None, typer.Option("--error-type", help="Only dead letters with this error type.")
    ] = None,
    message_id: Annotated[
        str | None, typer.Option("--message-id", help="Only the dead letter with this id.")
    ] = None,
    yes: YesOpt = False,
    url: UrlOpt = None,
    service: ServiceOpt = None,
    connect_timeout: TimeoutOpt = None,
) -> None:
    """Send dead letters back to QUEUE (each confirmed, then removed).

    With --message-id, finding no dead letter with that id is an error (exit 6)."""
    _need_terminal(yes, "replay")
    name = dlq_name(queue)
    done = 0

    def advance(count: int) -> None:
        nonlocal done
        done = count
        progress.update(task, completed=count, total=max(count, expected))

    with _client(url, service, connect_timeout) as client:
        dead = client.dead_letters(queue)
        total = dead.count()
        if total == 0:
            if message_id is not None:
                raise _no_such_id(queue, message_id, error_type, left=0)
            out.print(f"{name} is empty: nothing to replay")
            return
        filtered = error_type is not None or message_id is not None
        # What the bar counts up to: all of them, the one with the id, or (by error type) at
        # most all of them; it ends at what was replayed.
        expected = min(total, limit or total, 1 if message_id is not None else total)
        what = "matching dead letters" if filtered else "dead letters"
        scope = f"up to {limit} " if limit is not None and limit < total else ""
        _confirm(f"Replay {scope}{what} from {name!r} ({total} in it) to {queue!r}?", yes, "replay")
        by_type_only = error_type is not None and message_id is None
        progress = _progress()
        task = progress.add_task(
            f"replaying (at most {expected})" if by_type_only else "replaying", total=expected
        )
        try:
            with progress:
                replayed = dead.replay(
                    limit, error_type=error_type, message_id=message_id, progress=advance
                )
                # Ends at what was replayed; nothing replayed: no bar (a message says why).
                progress.update(task, total=replayed, completed=replayed, visible=replayed > 0)
        except MqkitError as exc:
            remaining = _count_quietly(dead)
            raise _fail(
                EXIT_PARTIAL,
                f"replay failed after {_plural(done)} replayed ({remaining} left in {name}): "
                f"{type(exc).__name__}: {exc}",
            ) from None
        left = dead.count()
    if replayed == 0 and message_id is not None:
        raise _no_such_id(queue, message_id, error_type, left=left)
    if replayed == 0 and filtered:
        out.print(f"no dead letter in {name} matched; nothing replayed ({left} left)")
        return
    out.print(f"replayed {_plural(replayed)} from {name}; {left} left")


def _no_such_id(queue: str, message_id: str, error_type: str | None, *, left: int) -> typer.Exit:
    """``replay --message-id`` found no such dead letter: an error (exit 6), not a no-op."""
    also = f" and error type {error_type!r}" if error_type is not None else ""
    return _fail(
        EXIT_NO_MATCH,
        f"no dead letter in {dlq_name(queue)} has message id {message_id!r}{also}; nothing "
        f"replayed ({_plural(left)} in it: `mqkit dlq list {queue}` shows their ids)",
    )


def _count_quietly(dead: mqkit.DeadLetterQueue) -> str:
    try:
        return str(dead.count())
    except MqkitError:
        return "?"


@dlq_app.command()
def purge(
    queue: QueueArg,
    yes: YesOpt = False,
    url: UrlOpt = None,
    service: ServiceOpt = None,
    connect_timeout: TimeoutOpt = None,
) -> None:
    """Delete every dead letter of QUEUE (asks first; cannot be undone)."""
    _need_terminal(yes, "purge")
    name = dlq_name(queue)
    with _client(url, service, connect_timeout) as client:
        dead = client.dead_letters(queue)
        total = dead.count()
        if total == 0:
            out.print(f"{name} is empty: nothing to purge")
            return
        _confirm(f"Delete all {_plural(total)} in {name!r}? This cannot be undone.", yes, "purge")
        purged = dead.purge()
    out.print(f"purged {_plural(purged)} from {name}")


class _Counting:
    """A text stream that counts the lines written through it (to drive a progress bar)."""

    def __init__(self, target: IO[str], on_line: Callable[[int], None]) -> None:
        self._target = target
        self._on_line = on_line
        self.lines = 0

    def write(self, text: str) -> int:
        written = self._target.write(text)
        newlines = text.count("\n")
        if newlines:
            self.lines += newlines
            self._on_line(self.lines)
        return written

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._target.flush()


@dlq_app.command()
def export(
    queue: QueueArg,
    output: Annotated[
        str, typer.Option("--output", "-o", help="File to write, or '-' for standard output.")
    ] = "-",
    limit: Annotated[
        int | None, typer.Option("--limit", "-n", min=1, help="Export at most N.")
    ] = None,
    url: UrlOpt = None,
    service: ServiceOpt = None,
    connect_timeout: TimeoutOpt = None,
) -> None:
    """Write dead letters as JSON lines (one object each); removes nothing."""
    name = dlq_name(queue)
    with _client(url, service, connect_timeout) as client:
        dead = client.dead_letters(queue)
        total = dead.count()
        if limit is not None:
            total = min(total, limit)
        try:
            target: IO[str] = sys.stdout if output == "-" else open(output, "w", encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            raise _fail(EXIT_USAGE, f"cannot write {output!r}: {exc.strerror}") from None
        try:
            # JSON lines and a live bar on one terminal would garble each other.
            progress = _progress(disable=target is sys.stdout and sys.stdout.isatty())
            task = progress.add_task("exporting", total=total)
            counting = _Counting(target, lambda n: progress.update(task, completed=n))
            with progress:
                exported = dead.export(cast(IO[str], counting), limit)
        finally:
            if target is sys.stdout:
                target.flush()
            else:
                target.close()
    where = "standard output" if output == "-" else output
    err.print(f"exported {_plural(exported)} from {name} to {where}")


# Set by the console script: the commands run in a process of their own, where a memory://
# URL can only name a new, empty broker.
_OWN_PROCESS = False


def main() -> None:
    """The ``mqkit`` console script."""
    global _OWN_PROCESS
    _OWN_PROCESS = True
    app(prog_name="mqkit")


if __name__ == "__main__":
    main()

"""``mqkit outbox``: look at and act on the outbox rows a relay parked.

```
mqkit outbox list   [--limit N] [--json]         counts, and a table of the parked rows
mqkit outbox retry  ID... | --all                publish them again (attempts start over)
mqkit outbox purge  ID... | --all [--yes]        delete them
mqkit outbox ddl    [--dialect postgresql|sqlite]  CREATE statements, for migrations
```

Every command takes ``--db`` (else ``MQKIT_OUTBOX_DB``): the service's database as a
SQLAlchemy URL (``postgresql+psycopg://user@host/db``, ``sqlite:///orders.db``; asyncio
drivers such as ``+asyncpg`` or ``+aiosqlite`` work too), and ``--table-prefix`` /
``--schema`` as given to :class:`~mqkit.outbox.Outbox`. A parked row holds back the later
rows of its ordering key: ``retry`` or ``purge`` lets them go.

Exit codes: 0 ok, 1 aborted, 2 usage (bad arguments, no ``--db``, confirmation needed without
a terminal), 3 cannot connect to the database, 4 no outbox table there. Passwords are never
printed.

This module imports SQLAlchemy only when a command runs, so ``mqkit`` works without the
``mqkit[outbox]`` extra (the commands then say how to install it).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from sqlalchemy import Connection

__all__ = ["EXIT_ABORTED", "EXIT_CONNECT", "EXIT_MISSING", "EXIT_OK", "EXIT_USAGE", "app", "main"]

EXIT_OK = 0
EXIT_ABORTED = 1
EXIT_USAGE = 2
EXIT_CONNECT = 3
EXIT_MISSING = 4

R = TypeVar("R")

app = typer.Typer(
    name="outbox",
    help=(
        "Look at and act on the outbox rows a relay parked. Exit codes: 0 ok, 1 aborted, "
        "2 usage, 3 cannot connect, 4 no outbox table."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals can hold a URL with a password
)

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

DbOpt = Annotated[
    str | None,
    typer.Option(
        "--db",
        envvar="MQKIT_OUTBOX_DB",
        help="The database, as a SQLAlchemy URL. Default: $MQKIT_OUTBOX_DB.",
        show_default=False,
    ),
]
PrefixOpt = Annotated[str, typer.Option("--table-prefix", help="The Outbox's table_prefix.")]
SchemaOpt = Annotated[
    str | None, typer.Option("--schema", help="The Outbox's schema.", show_default=False)
]
IdsArg = Annotated[
    list[int] | None,
    typer.Argument(metavar="[ID]...", help="Ids of parked rows (see `list`).", show_default=False),
]
AllOpt = Annotated[bool, typer.Option("--all", help="Every parked row.")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]


def _fail(code: int, message: str) -> typer.Exit:
    err.print(Text("error: ", style="bold red") + Text(message))
    return typer.Exit(code)


def _run(
    db: str | None, prefix: str, schema: str | None, action: Callable[[Connection, Any], R]
) -> R:
    """``action(conn, table)`` in a transaction on ``db`` (committed); errors become exits."""
    if not db:
        raise _fail(
            EXIT_USAGE,
            "no database given: pass --db URL or set MQKIT_OUTBOX_DB "
            "(e.g. postgresql+psycopg://user@host/db or sqlite:///orders.db)",
        )
    try:
        from sqlalchemy import create_engine, inspect
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

        from mqkit.errors import ConfigError
        from mqkit.outbox.tables import tables
    except ImportError as exc:
        raise _fail(
            EXIT_USAGE, f"{exc}; the outbox commands need: pip install 'mqkit[outbox]'"
        ) from None
    try:
        url = make_url(db)
        table = tables(prefix, schema).outbox
        shown = url.render_as_string(hide_password=True)
        is_async = url.get_dialect().is_async
    except (ArgumentError, NoSuchModuleError, ConfigError, ValueError) as exc:
        raise _fail(EXIT_USAGE, f"cannot use --db / --table-prefix: {exc}") from None

    def work(conn: Connection) -> R:
        if not inspect(conn).has_table(table.name, schema=schema):
            raise _fail(
                EXIT_MISSING,
                f"there is no outbox table {table.fullname!r} in {shown}: no relay or migration "
                "created it yet, or --table-prefix / --schema differ from the Outbox's",
            )
        return action(conn, table)

    try:
        if is_async:
            return asyncio.run(_run_async(url, work))
        engine = create_engine(url)
        try:
            with engine.begin() as conn:
                return work(conn)
        finally:
            engine.dispose()
    except DBAPIError as exc:
        cause = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise _fail(EXIT_CONNECT, f"cannot use the database at {shown}: {cause}") from None
    except ImportError as exc:  # the URL's driver is not installed
        raise _fail(EXIT_USAGE, f"cannot use the database at {shown}: {exc}") from None


async def _run_async(url: Any, work: Callable[[Connection], R]) -> R:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            return await conn.run_sync(work)
    finally:
        await engine.dispose()


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _short(text: str | None, width: int = 70) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if len(line) <= width else line[: width - 1].rstrip() + "…"


def _which(ids: list[int] | None, every: bool, action: str) -> list[int] | None:
    """The ids to act on (``None``: all), or exit 2 when the arguments do not say."""
    if every and ids:
        raise _fail(EXIT_USAGE, f"give ids to {action}, or --all, not both")
    if not every and not ids:
        raise _fail(
            EXIT_USAGE, f"say which parked rows to {action}: their ids (see `list`), or --all"
        )
    return None if every else list(ids or [])


@app.command("list")
def list_(
    db: DbOpt = None,
    table_prefix: PrefixOpt = "mqkit_",
    schema: SchemaOpt = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Show at most N.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Counts of pending, parked and sent rows, and the parked rows with their errors."""
    from mqkit.outbox import store

    def look(conn: Connection, table: Any) -> tuple[Any, list[Any]]:
        return store.stats(conn, table), store.parked(conn, table, limit=limit)

    stats, parked = _run(db, table_prefix, schema, look)
    if as_json:
        rows = [
            {
                "id": r.id,
                "message_id": r.message_id,
                "exchange": r.exchange,
                "routing_key": r.routing_key,
                "target": r.target,
                "type": r.type,
                "ordering_key": r.ordering_key,
                "attempts": r.attempts,
                "last_error": r.last_error,
                "created_at": _when(r.created_at),
                "parked_at": _when(r.parked_at),
                "size": r.size,
            }
            for r in parked
        ]
        counts = {"pending": stats.pending, "parked": stats.parked, "sent": stats.sent}
        typer.echo(json.dumps({"counts": counts, "parked": rows}, indent=2))
        return
    summary = f"{stats.pending} pending, {stats.parked} parked, {stats.sent} sent (kept)"
    if not parked:
        out.print(f"{table_prefix}outbox: {summary}")
        return
    table = Table(
        box=box.SIMPLE,
        title=f"{table_prefix}outbox: {summary}",
        caption=f"showing {len(parked)} of {stats.parked}" if len(parked) < stats.parked else None,
    )
    table.add_column("id", justify="right")
    table.add_column("message id", overflow="fold")
    table.add_column("to", overflow="fold")
    table.add_column("type", overflow="fold")
    table.add_column("key", overflow="fold")
    table.add_column("attempts", justify="right")
    table.add_column("error", style="red", min_width=20)
    table.add_column("parked at (UTC)", no_wrap=True)
    for r in parked:
        table.add_row(
            str(r.id),
            r.message_id,
            r.target,
            r.type,
            r.ordering_key or "-",
            str(r.attempts),
            _short(r.last_error),
            _when(r.parked_at),
        )
    out.print(table)


@app.command()
def retry(
    ids: IdsArg = None,
    every: AllOpt = False,
    db: DbOpt = None,
    table_prefix: PrefixOpt = "mqkit_",
    schema: SchemaOpt = None,
) -> None:
    """Publish parked rows again (their attempts start over); the relay sends them."""
    from mqkit.outbox import store

    which = _which(ids, every, "retry")
    done = _run(db, table_prefix, schema, lambda conn, table: store.retry(conn, table, which))
    _done(done, which, "will be published again")


@app.command()
def purge(
    ids: IdsArg = None,
    every: AllOpt = False,
    yes: YesOpt = False,
    db: DbOpt = None,
    table_prefix: PrefixOpt = "mqkit_",
    schema: SchemaOpt = None,
) -> None:
    """Delete parked rows: their messages are never sent."""
    from mqkit.outbox import store

    which = _which(ids, every, "purge")
    what = "every parked row" if which is None else f"parked row(s) {', '.join(map(str, which))}"
    if not yes:
        if not sys.stdin.isatty():
            raise _fail(
                EXIT_USAGE,
                "refusing to purge without confirmation: standard input is not a terminal; "
                "pass --yes to confirm",
            )
        if not typer.confirm(f"delete {what}? their messages will never be sent", err=True):
            err.print("aborted; nothing was changed")
            raise typer.Exit(EXIT_ABORTED)
    done = _run(db, table_prefix, schema, lambda conn, table: store.purge(conn, table, which))
    _done(done, which, "deleted")


def _done(done: int, which: list[int] | None, what: str) -> None:
    out.print(f"{done} parked row{'' if done == 1 else 's'} {what}")
    if which is not None and done < len(set(which)):
        missing = len(set(which)) - done
        err.print(f"{missing} of the ids given are not parked rows (sent, pending, or unknown)")


@app.command()
def ddl(
    dialect: Annotated[
        str | None,
        typer.Option("--dialect", help="postgresql or sqlite. Default: the --db URL's."),
    ] = None,
    db: DbOpt = None,
    table_prefix: PrefixOpt = "mqkit_",
    schema: SchemaOpt = None,
) -> None:
    """Print the CREATE statements of the outbox and inbox tables (for migrations)."""
    try:
        from sqlalchemy.dialects import postgresql, sqlite
        from sqlalchemy.engine import make_url

        from mqkit.errors import ConfigError
        from mqkit.outbox.tables import ddl as make_ddl
    except ImportError as exc:
        raise _fail(
            EXIT_USAGE, f"{exc}; the outbox commands need: pip install 'mqkit[outbox]'"
        ) from None
    name = dialect or (make_url(db).get_backend_name() if db else None)
    dialects = {"postgresql": postgresql.dialect, "sqlite": sqlite.dialect}
    if name not in dialects:
        raise _fail(EXIT_USAGE, f"--dialect must be postgresql or sqlite (got {name!r})")
    try:
        typer.echo(make_ddl(dialects[name](), table_prefix, schema), nl=False)
    except ConfigError as exc:
        raise _fail(EXIT_USAGE, str(exc)) from None


def main() -> None:
    """Run ``mqkit outbox`` on its own (``python -m mqkit.outbox.cli``)."""
    app(prog_name="mqkit outbox")


if __name__ == "__main__":
    main()

"""Fixtures of the outbox and inbox tests: a real database of each kind, and each runtime.

- ``pg_url``: PostgreSQL at ``MQKIT_TEST_DB`` (a SQLAlchemy URL), else
  ``postgresql+psycopg://postgres@127.0.0.1:5432/test``. Never skipped: when none answers the
  tests fail saying to run ``scripts/postgres.sh`` (which finds, starts or installs one).
- ``db``: parametrised over ``postgresql`` and ``sqlite`` (a file in the test's tmp dir);
  every table is named with a prefix of the test's own (``db.prefix``), and all of them are
  dropped when the test ends.
- ``side``: parametrised over ``sync`` (Client, Engine, OutboxRelay, plain handlers) and
  ``async`` (AsyncClient, AsyncEngine, AsyncOutboxRelay, ``async def`` handlers), both driven
  through one blocking API (:class:`Side`), so a test body is written once and runs on both.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from outbox_helpers import Database, Loop, Side
from sqlalchemy import create_engine, text

PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
NO_PG = """no PostgreSQL could be had for the outbox tests at {url}: {why}
Do one of:
  - run `bash scripts/postgres.sh` (finds one at MQKIT_TEST_DB or 127.0.0.1:5432, else starts
    a local cluster, else installs PostgreSQL with apt-get), or
  - start PostgreSQL yourself and export MQKIT_TEST_DB=postgresql+psycopg://USER@HOST:PORT/DB"""


def _pg_problem(url: str) -> str | None:
    engine = create_engine(url, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    finally:
        engine.dispose()
    return None


@pytest.fixture(scope="session")
def pg_url() -> str:
    """A PostgreSQL URL that answers (fails, never skips, when there is none)."""
    url = os.environ.get("MQKIT_TEST_DB") or PG_DEFAULT
    problem = _pg_problem(url)
    if problem is not None:
        pytest.fail(NO_PG.format(url=url, why=problem), pytrace=False)
    return url


@pytest.fixture(scope="session")
def loop() -> Iterator[Loop]:
    made = Loop()
    yield made
    made.close()


@pytest.fixture(params=["postgresql", "sqlite"])
def db(request: pytest.FixtureRequest, tmp_path: Path, loop: Loop) -> Iterator[Database]:
    """A database of each kind, with this test's own table prefix (dropped afterwards)."""
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
        made = Database("postgresql", url, url, loop)
    else:
        path = tmp_path / "outbox.db"
        made = Database("sqlite", f"sqlite:///{path}", f"sqlite+aiosqlite:///{path}", loop)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture(params=["sync", "async"])
def side(
    request: pytest.FixtureRequest, db: Database, broker_url: str, names: Any, loop: Loop
) -> Side:
    """The runtime under test, on the database under test."""
    return Side(request.param, db, broker_url, names, loop)

"""One relay at a time on SQLite.

SQLite has no row locks to claim rows with, so the relays of one SQLite database take turns
whole: a relay works only while it holds an exclusive lock on a file beside the database
(``orders.db`` → ``orders.db-mqkit_outbox.lock``, left in place afterwards), taken without
waiting (``flock``; the operating system drops it when the process dies, so a relay killed
with SIGKILL does not block the next one). For an in-memory database, which only its own
process can see, the lock is one per process. PostgreSQL needs none of this: its relays
claim rows with ``FOR UPDATE SKIP LOCKED`` and all work at once (:mod:`mqkit.outbox.store`).
"""

from __future__ import annotations

import os
import threading
from typing import IO

from sqlalchemy.engine import URL

from mqkit import explain

__all__ = ["RelayLock", "relay_lock"]

_memory_locks: dict[str, threading.Lock] = {}
_memory_guard = threading.Lock()


class RelayLock:
    """An exclusive lock that a relay tries to take before each pass (never waiting for it),
    and keeps until :meth:`release`."""

    def __init__(self, path: str | None, name: str) -> None:
        self.path = path  # None: an in-memory database (a lock of this process)
        self.name = name
        self._file: IO[bytes] | None = None
        self._memory: threading.Lock | None = None
        self._held = False

    def __repr__(self) -> str:
        where = self.path or f"in-memory database ({self.name})"
        return f"<RelayLock {where} {'held' if self._held else 'free'}>"

    @property
    def held(self) -> bool:
        """Whether this relay holds the lock."""
        return self._held

    def acquire(self) -> bool:
        """Take the lock if it is free (or already ours); ``False`` if another relay has it."""
        if self._held:
            return True
        if self.path is None:
            with _memory_guard:
                lock = _memory_locks.setdefault(self.name, threading.Lock())
            if lock.acquire(blocking=False):
                self._memory, self._held = lock, True
            return self._held
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            raise explain.outbox_no_file_lock(self.path) from None
        handle = open(self.path, "ab")  # noqa: SIM115 - kept open while the lock is held
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        self._file, self._held = handle, True
        return True

    def release(self) -> None:
        """Let the lock go (idempotent)."""
        if not self._held:
            return
        self._held = False
        if self._memory is not None:
            self._memory.release()
            self._memory = None
        if self._file is not None:
            self._file.close()  # closing the file drops the flock
            self._file = None


def relay_lock(url: URL, table: str) -> RelayLock | None:
    """The lock the relays of ``table`` in the database at ``url`` take turns with: one for
    SQLite, ``None`` for databases whose rows can be locked (PostgreSQL)."""
    if url.get_backend_name() != "sqlite":
        return None
    database = url.database or ""
    if database.startswith("file:"):
        database = database[len("file:") :].split("?", 1)[0]
    memory = database in ("", ":memory:") or url.query.get("mode") == "memory"
    if memory:
        return RelayLock(None, f"{database or ':memory:'}/{table}")
    return RelayLock(f"{os.path.abspath(database)}-{table}.lock", table)

"""The persistent side of :class:`mr1.Memory`: one SQLite database in WAL mode per store directory.

SQLite is the embedded database here because it is in Python's standard library, its
transactions are atomic and durable across a killed process (the write-ahead log is rolled
back or replayed on the next open), and WAL lets readers run while one writer commits.
Several processes may open one store: ``BEGIN IMMEDIATE`` takes the write lock at the start of
a write, so two writers queue (``busy_timeout``) instead of interleaving, and a writer always
reads the newest committed state before it changes it.

Tables (``memory.sqlite3`` in the store directory)::

  meta      key -> value (JSON): the store's fixed settings (bank capacity, max_len, ...)
  users     user_id, step (the bank's op counter), version (+1 per committed write or reset)
  memories  id (uuid hex), user_id, slot (its row in the user's slot-tensor bank), text,
            embedding (float32 blob, unit-norm), metadata (JSON), created_at, updated_at,
            created_step, updated_step (the bank's ``created`` / ``updated``)
  history   seq, memory_id, user_id, event (ADD | UPDATE | DELETE), old_memory, new_memory,
            at, reason ("" | "evicted" | "deleted" by the API)

A user's slot-tensor bank (:class:`mr1.memory.bank.MemoryBank`) is a view of the ``memories``
rows of that user: every field of it is stored (token ids follow from the text), so the view
rebuilt in another process is the bank the writer had. ``users.version`` tells a process
whether its cached view is stale.

This module is plain ``sqlite3`` + numpy; the agents and JAX live in :mod:`mr1.memory.api`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import sqlite3
from typing import Any, Iterator

import numpy as np

DB_FILE = "memory.sqlite3"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
  user_id TEXT PRIMARY KEY, step INTEGER NOT NULL, version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS memories (
  id TEXT PRIMARY KEY, user_id TEXT NOT NULL, slot INTEGER NOT NULL, text TEXT NOT NULL,
  embedding BLOB NOT NULL, metadata TEXT NOT NULL, created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL, created_step INTEGER NOT NULL, updated_step INTEGER NOT NULL,
  UNIQUE (user_id, slot));
CREATE TABLE IF NOT EXISTS history (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, memory_id TEXT NOT NULL, user_id TEXT NOT NULL,
  event TEXT NOT NULL, old_memory TEXT, new_memory TEXT, at TEXT NOT NULL,
  reason TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS history_by_memory ON history (memory_id, seq);
CREATE INDEX IF NOT EXISTS history_by_user ON history (user_id);
"""


class MemoryNotFoundError(KeyError):
    """No memory (or no history) with this id in the store."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else "memory not found"


@dataclasses.dataclass
class Row:
    """One stored memory (a row of ``memories``)."""

    id: str
    user_id: str
    slot: int
    text: str
    embedding: np.ndarray
    metadata: dict
    created_at: str
    updated_at: str
    created_step: int
    updated_step: int

    def public(self) -> dict[str, Any]:
        """The Mem0-shaped dict the API returns (no embedding, no slot)."""
        return {"id": self.id, "memory": self.text, "user_id": self.user_id,
                "metadata": self.metadata, "created_at": self.created_at,
                "updated_at": self.updated_at}


_ROW_COLUMNS = ("id, user_id, slot, text, embedding, metadata, created_at, updated_at, "
                "created_step, updated_step")


def _row(r: tuple) -> Row:
    return Row(r[0], r[1], int(r[2]), r[3], np.frombuffer(r[4], np.float32).copy(),
               json.loads(r[5]), r[6], r[7], int(r[8]), int(r[9]))


class Store:
    """A connection to ``<directory>/memory.sqlite3`` (created on first open).

    Args:
      directory: the store directory (created if missing).
      busy_timeout_s: how long a writer waits for another process's write lock before
        ``sqlite3.OperationalError: database is locked``.
    """

    def __init__(self, directory: str | os.PathLike, busy_timeout_s: float = 600.0):
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / DB_FILE
        # isolation_level=None: no implicit transactions; BEGIN/COMMIT are ours.
        self.conn = sqlite3.connect(str(self.path), timeout=busy_timeout_s,
                                    isolation_level=None, check_same_thread=False)
        self.conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = FULL")  # a commit survives power loss too
        with self.write():
            for stmt in filter(str.strip, SCHEMA.split(";")):
                self.conn.execute(stmt)

    def close(self) -> None:
        self.conn.close()

    # -- transactions
    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``: the write lock is taken now, so the
        reads inside see the newest committed state); rolled back on any exception."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: one consistent snapshot for the reads inside."""
        self.conn.execute("BEGIN")
        try:
            yield self.conn
        finally:
            self.conn.execute("COMMIT")

    # -- meta
    def meta(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self.conn.execute("SELECT key, value FROM meta")}

    def set_meta(self, values: dict[str, Any]) -> None:
        self.conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                              [(k, json.dumps(v)) for k, v in values.items()])

    # -- users
    def user_state(self, user_id: str) -> tuple[int, int] | None:
        """``(step, version)`` of a user, None for a user who never wrote."""
        r = self.conn.execute("SELECT step, version FROM users WHERE user_id = ?",
                              (user_id,)).fetchone()
        return None if r is None else (int(r[0]), int(r[1]))

    def set_user_state(self, user_id: str, step: int, version: int) -> None:
        self.conn.execute("INSERT OR REPLACE INTO users (user_id, step, version) VALUES (?, ?, ?)",
                          (user_id, int(step), int(version)))

    def users(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT user_id FROM users ORDER BY user_id")]

    # -- memories
    def rows(self, user_id: str, order: str = "slot") -> list[Row]:
        """Every memory of ``user_id``, by ``slot`` or by ``created_step``."""
        if order not in ("slot", "created_step"):
            raise ValueError(f"order must be 'slot' or 'created_step', got {order!r}")
        return [_row(r) for r in self.conn.execute(
            f"SELECT {_ROW_COLUMNS} FROM memories WHERE user_id = ? ORDER BY {order}, slot",
            (user_id,))]

    def row(self, memory_id: str) -> Row:
        r = self.conn.execute(f"SELECT {_ROW_COLUMNS} FROM memories WHERE id = ?",
                              (str(memory_id),)).fetchone()
        if r is None:
            raise MemoryNotFoundError(f"no memory with id {memory_id!r} in {self.directory}")
        return _row(r)

    def count(self, user_id: str | None = None) -> int:
        if user_id is None:
            return int(self.conn.execute("SELECT COUNT(*) FROM memories").fetchone()[0])
        return int(self.conn.execute("SELECT COUNT(*) FROM memories WHERE user_id = ?",
                                     (user_id,)).fetchone()[0])

    def put(self, row: Row) -> None:
        """Inserts or replaces the memory ``row.id``."""
        self.conn.execute(
            f"INSERT OR REPLACE INTO memories ({_ROW_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (row.id, row.user_id, int(row.slot), row.text,
             np.ascontiguousarray(row.embedding, np.float32).tobytes(),
             json.dumps(row.metadata), row.created_at, row.updated_at, int(row.created_step),
             int(row.updated_step)))

    def remove(self, memory_id: str) -> None:
        self.conn.execute("DELETE FROM memories WHERE id = ?", (memory_id,))

    # -- history
    def log(self, memory_id: str, user_id: str, event: str, old: str | None, new: str | None,
            at: str, reason: str = "") -> None:
        self.conn.execute(
            "INSERT INTO history (memory_id, user_id, event, old_memory, new_memory, at, reason)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)", (memory_id, user_id, event, old, new, at, reason))

    def history(self, memory_id: str) -> list[dict[str, Any]]:
        """The ops that touched ``memory_id``, oldest first."""
        rows = self.conn.execute(
            "SELECT seq, memory_id, user_id, event, old_memory, new_memory, at, reason "
            "FROM history WHERE memory_id = ? ORDER BY seq", (str(memory_id),)).fetchall()
        if not rows:
            raise MemoryNotFoundError(f"no memory with id {memory_id!r} was ever stored in "
                                      f"{self.directory}")
        keys = ("seq", "memory_id", "user_id", "event", "old_memory", "new_memory", "at",
                "reason")
        return [dict(zip(keys, r)) for r in rows]

    # -- reset
    def reset(self, user_id: str | None = None) -> int:
        """Deletes the memories, history and state of ``user_id`` (None: of every user);
        returns the number of memories deleted. Call inside :meth:`write`."""
        where, args = ("", ()) if user_id is None else (" WHERE user_id = ?", (user_id,))
        n = int(self.conn.execute(f"SELECT COUNT(*) FROM memories{where}", args).fetchone()[0])
        for table in ("memories", "history"):
            self.conn.execute(f"DELETE FROM {table}{where}", args)
        # The user row stays with a new version (an empty bank at step 0), so no other
        # process's cached view of the old bank can pass for the new one.
        self.conn.execute(f"UPDATE users SET step = 0, version = version + 1{where}", args)
        return n

    def integrity_check(self) -> str:
        return self.conn.execute("PRAGMA integrity_check").fetchone()[0]

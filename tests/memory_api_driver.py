"""Subprocess driver for ``tests/test_memory_api.py``: a separate process using one store.

    python -m tests.memory_api_driver add  STORE USER TEXT [TEXT ...]   one add per text; prints ids
    python -m tests.memory_api_driver many STORE USER PREFIX N          N adds "PREFIX i"
    python -m tests.memory_api_driver hang STORE USER TEXT MARKER       an add that stops mid-way

``hang`` makes the store's history write sleep forever after the add's first history row has been
written inside the transaction, having created ``MARKER``: the test then kills the process
with SIGKILL while it holds an open write transaction. All modes use the real embedder.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time


def main(argv) -> None:
    from mr1 import Memory
    from mr1.memory import sqlite_store as S

    mode, directory, user, *rest = argv
    m = Memory.open(directory)
    if mode == "add":
        print(json.dumps([m.add(t, user_id=user)[0]["id"] for t in rest]))
    elif mode == "many":
        prefix, n = rest[0], int(rest[1])
        for i in range(n):
            m.add(f"{prefix} {i}", user_id=user)
        print(json.dumps({"done": n}))
    elif mode == "hang":
        text, marker = rest
        log = S.Store.log

        def hanging_log(self, *a, **kw):
            log(self, *a, **kw)               # a history row is written inside the transaction
            pathlib.Path(marker).write_text("in transaction")
            while True:
                time.sleep(1)

        S.Store.log = hanging_log
        m.add(text, user_id=user)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main(sys.argv[1:])

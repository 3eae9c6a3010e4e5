"""Command line of :class:`mr1.Memory`; every command prints one JSON document on stdout.

  python -m mr1.memory add      --store DIR --user ana --text "I moved to Lisbon."
  python -m mr1.memory add      --store DIR --user ana \
      --messages '[{"role": "user", "content": "..."}]'
  python -m mr1.memory search   --store DIR --user ana --query "where does Ana live?" [--limit 5]
  python -m mr1.memory get      --store DIR --id ID
  python -m mr1.memory get-all  --store DIR --user ana
  python -m mr1.memory delete   --store DIR --id ID
  python -m mr1.memory history  --store DIR --id ID
  python -m mr1.memory reset    --store DIR [--user ana]      (no --user: every user)
  python -m mr1.memory answer   --store DIR --user ana --question "..." --answer-agent base

Agents: ``--manager add_all | prompted | <run>/best`` (add), ``--answer-agent base |
<run>/best`` (answer), ``--model`` / ``--tokenizer`` as :meth:`mr1.Memory.open` takes them,
``--capacity`` for a new store. ``--text -`` reads the text from stdin. An error prints
``{"error": message, "type": exception name}`` and exits with status 1 (2 for bad usage).
"""

from __future__ import annotations

import argparse
import json
import sys

COMMANDS = ("add", "search", "get", "get-all", "delete", "history", "reset", "answer")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mr1.memory", description=__doc__.split("\n")[0])
    p.add_argument("command", choices=COMMANDS)
    p.add_argument("--store", required=True, help="the store directory")
    p.add_argument("--user", help="user id")
    p.add_argument("--id", help="memory id")
    p.add_argument("--text", help="text to add ('-': read stdin)")
    p.add_argument("--messages", help="JSON list of {role, content} messages to add")
    p.add_argument("--timestamp", help="when the messages were said (default: now)")
    p.add_argument("--query", help="search query")
    p.add_argument("--question", help="question for the Answer Agent")
    p.add_argument("--limit", type=int, default=5, help="search results")
    p.add_argument("--manager", default="add_all", help="add_all | prompted | <run>/best")
    p.add_argument("--answer-agent", default=None, help="base | <run>/best (answer)")
    p.add_argument("--model", default=None, help="load_policy name / GGUF / HF folder")
    p.add_argument("--tokenizer", default=None, help="'' | embedded | GGUF path")
    p.add_argument("--capacity", type=int, default=None, help="bank slots per user (new store)")
    return p


_NEEDS = {"add": ("user",), "search": ("user", "query"), "get": ("id",), "get-all": ("user",),
          "delete": ("id",), "history": ("id",), "reset": (), "answer": ("user", "question")}


def run(args) -> object:
    from mr1.memory.api import Memory

    missing = [f"--{k}" for k in _NEEDS[args.command] if getattr(args, k) is None]
    if missing:
        raise _Usage(f"{args.command} needs {' '.join(missing)}")
    manager = args.manager if args.command == "add" else "add_all"   # only add runs it
    answer = args.answer_agent if args.command == "answer" else None
    if args.command == "answer" and answer is None:
        answer = "base"
    with Memory.open(args.store, manager=manager, answer=answer, model=args.model,
                     capacity=args.capacity, tokenizer=args.tokenizer) as m:
        if args.command == "add":
            if (args.text is None) == (args.messages is None):
                raise _Usage("add needs exactly one of --text and --messages")
            messages = (json.loads(args.messages) if args.messages is not None
                        else sys.stdin.read() if args.text == "-" else args.text)
            return m.add(messages, user_id=args.user, timestamp=args.timestamp)
        if args.command == "search":
            return m.search(args.query, user_id=args.user, limit=args.limit)
        if args.command == "get":
            return m.get(args.id)
        if args.command == "get-all":
            return m.get_all(user_id=args.user)
        if args.command == "delete":
            return m.delete(args.id)
        if args.command == "history":
            return m.history(args.id)
        if args.command == "reset":
            return m.reset(user_id=args.user)
        return m.answer(args.question, user_id=args.user)


class _Usage(Exception):
    pass


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        out = run(args)
    except _Usage as e:
        print(json.dumps({"error": str(e), "type": "usage"}))
        return 2
    except (KeyError, ValueError, TypeError, RuntimeError, FileNotFoundError) as e:
        print(json.dumps({"error": str(e), "type": type(e).__name__}))
        return 1
    print(json.dumps(out, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

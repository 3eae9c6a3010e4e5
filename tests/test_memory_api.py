"""``mr1.Memory``: the persistent multi-user memory layer, with the real all-MiniLM embedder.

Isolation, persistence across processes (and the CLI), a SIGKILL in the middle of an add, two
concurrent writer processes, history through ADD -> UPDATE -> DELETE, evictions and refusals
reported, the bank view rebuilt exactly, bad input. LLM-manager paths use the ``tiny-smollm2``
random model (embedded tokenizer), with scripted replies where the ops must be known.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mr1 import Memory
from mr1.memory.sqlite_store import MemoryNotFoundError

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def embedder():
    from mr1.memory.embedder import load_embedder

    return load_embedder()


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def _driver(*args, timeout=300):
    out = subprocess.run([sys.executable, "-m", "tests.memory_api_driver", *map(str, args)],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cli(*args, timeout=300):
    out = subprocess.run([sys.executable, "-m", "mr1.memory", *map(str, args)], cwd=ROOT,
                         env=_env(), capture_output=True, text=True, timeout=timeout)
    return out.returncode, json.loads(out.stdout)


def _bank_arrays(m: Memory, user: str) -> dict:
    view = m._reading(user)
    return {f: np.asarray(getattr(view.mem.bank, f)) for f in
            ("tokens", "lengths", "valid", "embeddings", "speaker", "created", "updated", "step")}


def test_users_are_isolated(tmp_path, embedder):
    m = Memory.open(tmp_path / "s", embedder=embedder)
    ana = [m.add(t, user_id="ana")[0] for t in ("Ana lives in Lisbon.", "Ana plays the cello.")]
    bob = m.add("Bob lives in Oslo and plays chess.", user_id="bob")[0]
    assert [e["event"] for e in ana] == ["ADD", "ADD"] and bob["event"] == "ADD"
    hits = m.search("Where does Ana live? Lisbon", user_id="bob", limit=5)
    assert [h["id"] for h in hits] == [bob["id"]]           # only bob's memory, never ana's
    hits = m.search("Lisbon", user_id="ana", limit=5)
    assert {h["id"] for h in hits} == {e["id"] for e in ana}
    assert hits[0]["memory"] == "Ana lives in Lisbon." and hits[0]["score"] > hits[1]["score"]
    assert {r["memory"] for r in m.get_all("ana")} == {"Ana lives in Lisbon.",
                                                      "Ana plays the cello."}
    assert m.reset(user_id="bob") == {"deleted": 1}
    assert m.get_all("bob") == [] and len(m.get_all("ana")) == 2
    assert m.search("chess", user_id="bob") == []


def test_persistence_across_processes_and_cli(tmp_path, embedder):
    store = tmp_path / "s"
    ids = _driver("add", store, "ana", "Ana adopted a cat named Miso.", "Ana works as a nurse.")
    m = Memory.open(store, embedder=embedder)
    got = {r["id"]: r["memory"] for r in m.get_all("ana")}
    assert got == {ids[0]: "Ana adopted a cat named Miso.", ids[1]: "Ana works as a nurse."}
    assert m.search("What is the cat called?", user_id="ana", limit=1)[0]["id"] == ids[0]
    mine = m.add("Ana runs marathons.", user_id="ana")[0]["id"]
    # The bank a fresh process rebuilds from the rows is the writer's cached bank, field by field.
    fresh = Memory.open(store, embedder=embedder)
    for name, arr in _bank_arrays(m, "ana").items():
        np.testing.assert_array_equal(_bank_arrays(fresh, "ana")[name], arr, err_msg=name)
    # Another process (the CLI) sees this process's add.
    rc, hits = _cli("search", "--store", store, "--user", "ana", "--query", "marathon running")
    assert rc == 0 and hits[0]["id"] == mine and hits[0]["memory"] == "Ana runs marathons."
    rc, hist = _cli("history", "--store", store, "--id", ids[1])
    assert rc == 0 and [h["event"] for h in hist] == ["ADD"]
    rc, err = _cli("get", "--store", store, "--id", "nope")
    assert rc == 1 and err["type"] == "MemoryNotFoundError" and "nope" in err["error"]
    rc, err = _cli("add", "--store", store, "--user", "ana")
    assert rc == 2 and "--text" in err["error"]


def test_sigkill_during_add_leaves_the_store_as_before(tmp_path, embedder):
    store = tmp_path / "s"
    m = Memory.open(store, embedder=embedder)
    for t in ("Ana lives in Lisbon.", "Ana plays the cello."):
        m.add(t, user_id="ana")
    before = m.get_all("ana")
    hist_before = m.store.conn.execute("SELECT COUNT(*) FROM history").fetchone()[0]
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-m", "tests.memory_api_driver", "hang", str(store),
                             "ana", "Ana moved to Porto.", str(marker)], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "the driver never reached the middle of its add"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)     # mid-transaction: the row and history are written
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    after = Memory.open(store, embedder=embedder)
    assert after.store.integrity_check() == "ok"
    assert after.get_all("ana") == before
    assert after.store.conn.execute("SELECT COUNT(*) FROM history").fetchone()[0] == hist_before
    # The lock died with the process: the store takes writes again, and the bank is consistent.
    new = after.add("Ana moved to Porto.", user_id="ana")[0]
    assert after.search("Porto", user_id="ana", limit=1)[0]["id"] == new["id"]
    assert int(np.asarray(after._reading("ana").mem.bank.valid).sum()) == 3


def test_two_concurrent_writers_lose_nothing(tmp_path, embedder):
    store = tmp_path / "s"
    Memory.open(store, embedder=embedder).close()   # created first: both writers open it
    n = 200
    procs = [subprocess.Popen([sys.executable, "-m", "tests.memory_api_driver", "many",
                               str(store), "shared", f"writer {w} fact", str(n)], cwd=ROOT,
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for w in (1, 2)]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()[-3000:]
    m = Memory.open(store, embedder=embedder)
    texts = [r["memory"] for r in m.get_all("shared")]
    assert sorted(texts) == sorted(f"writer {w} fact {i}" for w in (1, 2) for i in range(n))
    assert m.store.conn.execute("SELECT COUNT(*) FROM history WHERE event = 'ADD'"
                                ).fetchone()[0] == 2 * n
    bank = _bank_arrays(m, "shared")
    assert bank["valid"].sum() == 2 * n and int(bank["step"]) == 2 * n
    # Every slot holds one memory and the bank's created steps are 0..2n-1 exactly once:
    # the writers' adds were serialised, each seeing the other's.
    assert sorted(bank["created"][bank["valid"]].tolist()) == list(range(2 * n))
    assert m.store.integrity_check() == "ok"


def _scripted(replies: list[str]):
    """A ``generate`` stand-in: fact extraction echoes the message, the manager replies come
    from ``replies`` in order. Records the manager prompts."""
    from types import SimpleNamespace

    seen = []

    def generate(policy, prompts, max_new_tokens, temperature=0.0, **kw):
        texts = []
        for p in prompts:
            if p.startswith("Extract the facts"):
                texts.append(p.split("\n\n")[1].split(": ", 1)[1])   # "<speaker>: <text>"
            else:
                seen.append(p)
                texts.append(replies.pop(0))
        return SimpleNamespace(texts=texts)

    generate.seen = seen
    return generate


def test_history_add_update_delete_with_an_llm_manager(tmp_path, embedder):
    replies = [
        '{"memory": [{"event": "ADD", "text": "Ana has a dog."}]}',
        '{"memory": [{"id": "0", "event": "UPDATE", "text": "Ana has a dog named Rex."}]}',
        '{"memory": [{"id": "0", "event": "DELETE"}]}',
        "I do not know",                                        # unusable: a NOOP with reason
    ]
    gen = _scripted(replies)
    m = Memory.open(tmp_path / "s", manager="prompted", model="tiny-smollm2",
                    tokenizer="embedded", manager_format="json", embedder=embedder,
                    generate_fn=gen)
    [add] = m.add("Ana has a dog.", user_id="ana", timestamp="1 May 2023")
    assert add["event"] == "ADD" and add["memory"] == "Ana has a dog."
    [upd] = m.add("The dog is called Rex.", user_id="ana", timestamp="2 May 2023")
    assert upd == {"id": add["id"], "memory": "Ana has a dog named Rex.", "event": "UPDATE",
                   "previous_memory": "Ana has a dog."}
    assert "[0] Ana has a dog." in gen.seen[1]          # the manager was shown the memory
    assert m.get(add["id"])["memory"] == "Ana has a dog named Rex."
    assert m.get(add["id"])["created_at"] == "1 May 2023"
    assert m.get(add["id"])["updated_at"] == "2 May 2023"
    [dele] = m.add("Ana gave Rex away.", user_id="ana", timestamp="3 May 2023")
    assert dele == {"id": add["id"], "memory": "Ana has a dog named Rex.", "event": "DELETE"}
    [noop] = m.add("Nothing new.", user_id="ana")
    assert noop["event"] == "NOOP" and noop["reason"] == "no_operation"
    hist = m.history(add["id"])
    assert [(h["event"], h["old_memory"], h["new_memory"], h["at"]) for h in hist] == [
        ("ADD", None, "Ana has a dog.", "1 May 2023"),
        ("UPDATE", "Ana has a dog.", "Ana has a dog named Rex.", "2 May 2023"),
        ("DELETE", "Ana has a dog named Rex.", None, "3 May 2023")]
    with pytest.raises(MemoryNotFoundError):
        m.get(add["id"])
    assert m.get_all("ana") == []


def test_full_bank_evictions_and_refusals_are_reported(tmp_path, embedder):
    lru = Memory.open(tmp_path / "lru", capacity=2, embedder=embedder)
    a = lru.add("first fact", user_id="u")[0]
    lru.add("second fact", user_id="u")
    events = lru.add("third fact", user_id="u")
    assert [e["event"] for e in events] == ["DELETE", "ADD"]
    assert events[0] == {"id": a["id"], "memory": "first fact", "event": "DELETE",
                         "reason": "evicted"}
    assert [h["reason"] for h in lru.history(a["id"])] == ["", "evicted"]
    assert {r["memory"] for r in lru.get_all("u")} == {"second fact", "third fact"}
    refuse = Memory.open(tmp_path / "refuse", capacity=2, full_policy="refuse",
                         embedder=embedder)
    refuse.add([{"role": "user", "content": "one"}, {"role": "user", "content": "two"}],
               user_id="u")
    [e] = refuse.add("three", user_id="u")
    assert e["event"] == "NOOP" and e["refused"] == "bank_full" and e["memory"] == "three"
    assert len(refuse.get_all("u")) == 2


def test_bad_input(tmp_path, embedder):
    m = Memory.open(tmp_path / "s", embedder=embedder, max_chars=1000)
    m.add("Ana lives in Lisbon.", user_id="ana")
    assert m.search("anything", user_id="nobody") == [] and m.get_all("nobody") == []
    for empty in ("", "   ", [], [{"role": "user", "content": " "}]):
        with pytest.raises(ValueError, match="empty"):
            m.add(empty, user_id="ana")
    with pytest.raises(ValueError, match="1001 characters; the limit is 1000"):
        m.add("x" * 1001, user_id="ana")
    with pytest.raises(ValueError, match="user_id"):
        m.add("fine", user_id="")
    with pytest.raises(TypeError):
        m.add(42, user_id="ana")
    with pytest.raises(TypeError, match="message 0"):
        m.add([{"role": "user"}], user_id="ana")
    with pytest.raises(ValueError, match="limit"):
        m.search("Lisbon", user_id="ana", limit=0)
    for call in (m.get, m.delete, m.history):
        with pytest.raises(KeyError, match="no memory with id 'missing'"):
            call("missing")
    with pytest.raises(RuntimeError, match="without an Answer Agent"):
        m.answer("Where?", user_id="ana")
    with pytest.raises(ValueError, match="capacity=1024"):
        Memory.open(tmp_path / "s", capacity=8, embedder=embedder)
    with pytest.raises(ValueError, match="neither"):
        Memory.open(tmp_path / "s", manager="no-such-manager", embedder=embedder)
    assert len(m.get_all("ana")) == 1          # nothing above changed the store


def test_tiny_llm_manager_and_answer_agent_end_to_end(tmp_path, embedder):
    """The real generate path with a random model (the default "json_op" manager form:
    constrained op word after a forced JSON prefix): every fact gets exactly one event, the
    store and the bank agree, and answer returns its parts. Fact extraction echoes the message
    (a random model rarely writes a fact line)."""
    from types import SimpleNamespace

    from mr1.sampling import generate

    calls = {"manager": 0, "answer": 0}

    def gen(policy, prompts, max_new_tokens, **kw):
        if prompts[0].startswith("Extract the facts"):
            return SimpleNamespace(texts=[p.split("\n\n")[1].split(": ", 1)[1] for p in prompts])
        calls["manager" if "allowed_tokens" in kw else "answer"] += len(prompts)
        return generate(policy, prompts, min(max_new_tokens, 8), **kw)

    m = Memory.open(tmp_path / "s", manager="prompted", answer="base", model="tiny-smollm2",
                    tokenizer="embedded", embedder=embedder, generate_fn=gen)
    assert m.manager_format == "json_op" and m.manager is m.answer_policy   # loaded once
    events = [m.add(t, user_id="ana")
              for t in ("Ana lives in Lisbon.", "Ana plays the cello.", "Ana likes tea.")]
    assert calls["manager"] == 3
    for ev in events:
        assert [e["event"] for e in ev if e.get("reason") != "evicted"] in (
            ["ADD"], ["UPDATE"], ["DELETE"], ["NOOP"])
    rows = m.get_all("ana")
    view = m._reading("ana")
    assert int(np.asarray(view.mem.bank.valid).sum()) == len(rows)
    assert int(view.mem.bank.step) == 3
    out = m.answer("Where does Ana live?", user_id="ana")
    assert calls["answer"] == 1
    assert isinstance(out["answer"], str) and isinstance(out["output"], str)
    assert [h["id"] for h in out["memories"]] == [
        h["id"] for h in m.search("Where does Ana live?", user_id="ana", limit=30)]

"""LLM judge against a tiny local OpenAI-compatible server (http.server on 127.0.0.1)."""

from __future__ import annotations

import http.server
import json
import logging
import threading

import pytest

from mr1.eval import judge as judge_mod
from mr1.eval.judge import (JUDGE_PROMPT, JudgeConfig, JudgeError, LLMJudge, judge_scores,
                            load_judge, parse_label)

SECRET = "sk-test-SECRET-do-not-leak-123"


class FakeServer:
    """Serves queued ``(status, body)`` replies to POST /v1/chat/completions and records requests."""

    def __init__(self):
        self.replies: list[tuple[int, str]] = []
        self.default: tuple[int, str] = (200, self.completion('{"label": "CORRECT"}'))
        self.requests: list[dict] = []
        self.responder = None  # optional: request json -> (status, body), overrides the queue
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server API)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                server.requests.append({"path": self.path, "headers": dict(self.headers),
                                        "json": json.loads(body)})
                if server.responder is not None:
                    status, text = server.responder(json.loads(body))
                else:
                    status, text = server.replies.pop(0) if server.replies else server.default
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    @staticmethod
    def completion(content: str) -> str:
        return json.dumps({"id": "x", "object": "chat.completion",
                           "choices": [{"index": 0, "message": {"role": "assistant",
                                                                "content": content}}]})

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


@pytest.fixture
def sleeps():
    return []


def _judge(server, sleeps, **kw) -> LLMJudge:
    config = JudgeConfig(base_url=server.base_url, model="judge-model", api_key=SECRET,
                         timeout=5, backoff=0.5, **kw)
    return LLMJudge(config, sleep=sleeps.append)


@pytest.mark.parametrize("text,want", [
    ('{"label": "CORRECT"}', True),
    ('{"label": "WRONG"}', False),
    ('{"label": "correct"}', True),
    ('{"LABEL": "Wrong"}', False),
    ('{"label": "INCORRECT"}', False),
    ('The answer names the same date. ```json\n{"label": "CORRECT"}\n```', True),
    ('Reasoning: it is a different city.\n{"label":"WRONG"}', False),
    ("CORRECT", True),
    ("The generated answer is wrong. WRONG", False),
    ("Not the same at first glance, but correct: CORRECT", True),
    ("incorrect", False),
    ('{"label": true}', True),
    ('{"verdict": "CORRECT"}', True),
    ("", None),
    ("I cannot decide.", None),
    ('{"label": "maybe"}', None),
])
def test_parse_label(text, want):
    assert parse_label(text) is want


def test_prompt_format():
    text = JUDGE_PROMPT.format(question="Q?", gold="7 May 2023", prediction="May 7th")
    assert "Q?" in text and "7 May 2023" in text and "May 7th" in text
    assert '{"label": "CORRECT"}' in text and "CORRECT" in text and "WRONG" in text


def test_judge_request_shape_and_verdicts(server, sleeps):
    j = _judge(server, sleeps)
    server.replies = [(200, server.completion('{"label": "CORRECT"}')),
                      (200, server.completion('{"label": "WRONG"}'))]
    assert j.judge("When?", "7 May 2023", "May 7, 2023") is True
    assert j.judge("Where?", "Paris", "Rome") is False
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == f"Bearer {SECRET}"
    body = req["json"]
    assert body["model"] == "judge-model" and body["temperature"] == 0.0
    assert body["response_format"] == {"type": "json_object"}
    assert body["messages"][0]["role"] == "user"
    assert "May 7, 2023" in body["messages"][0]["content"]
    assert sleeps == []


def test_no_key_no_auth_header_and_json_mode_off(server, sleeps):
    config = JudgeConfig(base_url=server.base_url + "/", model="m", json_mode=False)
    assert LLMJudge(config).judge("q", "a", "a") is True
    headers = server.requests[0]["headers"]
    assert "Authorization" not in headers
    assert "response_format" not in server.requests[0]["json"]


def test_retries_with_backoff_then_succeeds(server, sleeps):
    j = _judge(server, sleeps, max_retries=3)
    server.replies = [(503, "busy"), (429, "slow down"), (200, "not json at all"),
                      (200, server.completion("CORRECT"))]
    assert j.judge("q", "a", "a") is True
    assert len(server.requests) == 4
    assert sleeps == [0.5, 1.0, 2.0]


def test_gives_up_after_retries(server, sleeps):
    j = _judge(server, sleeps, max_retries=2)
    server.default = (500, "boom")
    with pytest.raises(JudgeError, match="failed after 3 attempts.*HTTP 500"):
        j.judge("q", "a", "a")
    assert len(server.requests) == 3


def test_client_error_is_not_retried(server, sleeps):
    j = _judge(server, sleeps)
    server.default = (401, json.dumps({"error": f"invalid key {SECRET}"}))
    with pytest.raises(JudgeError) as info:
        j.judge("q", "a", "a")
    assert len(server.requests) == 1 and sleeps == []
    assert "HTTP 401" in str(info.value)
    assert SECRET not in str(info.value)  # an endpoint echoing the key is scrubbed


def test_connection_refused_and_timeout_retry(sleeps):
    config = JudgeConfig(base_url="http://127.0.0.1:9/v1", model="m", api_key=SECRET,
                         timeout=0.5, max_retries=1, backoff=0.01)
    with pytest.raises(JudgeError, match="failed after 2 attempts") as info:
        LLMJudge(config, sleep=sleeps.append).judge("q", "a", "a")
    assert SECRET not in str(info.value) and sleeps == [0.01]


def test_unreadable_label_counts_as_wrong(server, sleeps, caplog):
    j = _judge(server, sleeps)
    server.default = (200, server.completion("I am not sure."))
    with caplog.at_level(logging.WARNING, logger=judge_mod.__name__):
        assert j.judge("q", "a", "b") is False
    assert "counted as WRONG" in caplog.text


def test_key_never_in_repr_or_logs(server, sleeps, caplog, capsys):
    j = _judge(server, sleeps, max_retries=1)
    assert SECRET not in repr(j) and SECRET not in repr(j.config) and SECRET not in str(j.config)
    server.replies = [(502, f"bad gateway {SECRET}")]
    with caplog.at_level(logging.DEBUG):
        assert j.judge("q", "a", "a") is True
        load_judge(base_url=server.base_url, model="m", api_key=SECRET)
        load_judge()  # not configured
    captured = capsys.readouterr()
    assert "retry 1/1" in caplog.text
    assert SECRET not in caplog.text and SECRET not in captured.out + captured.err


def test_config_from_env(monkeypatch, server):
    for var in ("MR1_JUDGE_BASE_URL", "MR1_JUDGE_MODEL", "MR1_JUDGE_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    assert JudgeConfig.from_env() is None
    assert load_judge() is None
    monkeypatch.setenv("MR1_JUDGE_BASE_URL", server.base_url)
    assert load_judge() is None  # model missing
    monkeypatch.setenv("MR1_JUDGE_MODEL", "env-model")
    monkeypatch.setenv("MR1_JUDGE_API_KEY", SECRET)
    j = load_judge(timeout=3)
    assert j.config.model == "env-model" and j.config.api_key == SECRET
    assert j.config.timeout == 3
    assert load_judge(model="arg-model").config.model == "arg-model"  # arguments win
    assert load_judge(api_key="").config.api_key == ""


def test_judge_scores(server, sleeps):
    items = [("q1", "Paris", "Paris"), ("q2", "Paris", "Rome"), ("q3", "7 May", "7 May"),
             ("q4", "x", "y")]
    assert judge_scores(None, items) == [None] * 4  # not computed, never faked

    def same_answer(request):
        prompt = request["messages"][0]["content"]
        gold = prompt.split("Gold answer: ")[1].split("\n")[0]
        pred = prompt.split("Generated answer: ")[1].split("\n")[0]
        label = "CORRECT" if gold == pred else "WRONG"
        return 200, FakeServer.completion(json.dumps({"label": label}))

    server.responder = same_answer
    j = _judge(server, sleeps)
    assert judge_scores(j, items, workers=1) == [1.0, 0.0, 1.0, 0.0]
    assert judge_scores(j, items, workers=4) == [1.0, 0.0, 1.0, 0.0]  # order kept

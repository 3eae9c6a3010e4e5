"""LLM-as-a-Judge (the J metric) through any OpenAI-compatible chat-completions endpoint.

The judge sees the question, the gold answer and the generated answer and labels the answer
CORRECT or WRONG, generously (same topic / same date in another format counts as correct), in
the spirit of Mem0's ``ACCURACY_PROMPT``; the prompt below is this project's own wording. The
reply is asked for as JSON ``{"label": "CORRECT" | "WRONG"}`` and parsed leniently
(:func:`parse_label`).

Configuration comes from arguments or the environment: ``MR1_JUDGE_BASE_URL`` (e.g.
``https://api.openai.com/v1`` or a local vLLM / llama.cpp server's ``http://127.0.0.1:8000/v1``),
``MR1_JUDGE_MODEL`` and ``MR1_JUDGE_API_KEY`` (optional for local servers). Requests are
``POST {base_url}/chat/completions`` with ``urllib`` (no SDK), temperature 0, a timeout, and
retries with exponential backoff on network errors, timeouts, HTTP 429 and 5xx. The API key is
sent only in the ``Authorization`` header: it is never logged, printed, put in an exception
message or shown by ``repr``. A key in the base URL's query string (``?api-key=...``) or its
userinfo is redacted the same way (:func:`redact_url`).

When no judge is configured, :func:`load_judge` returns ``None`` and :func:`judge_scores`
returns ``None`` per item: J is reported as not computed, never faked.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Iterable, Sequence

log = logging.getLogger(__name__)

ENV_BASE_URL = "MR1_JUDGE_BASE_URL"
ENV_MODEL = "MR1_JUDGE_MODEL"
ENV_API_KEY = "MR1_JUDGE_API_KEY"

JUDGE_PROMPT = """\
You are grading an answer to a question about earlier conversations between two people. \
Decide whether the generated answer is CORRECT or WRONG when compared with the gold answer.

Be generous:
- The generated answer may be longer, phrased differently or give extra detail. If it refers \
to the same thing, fact or topic as the gold answer, it is CORRECT.
- For questions about time, the gold answer is usually a date, month, year or period. If the \
generated answer points to the same date or period, it is CORRECT even in another format \
("7 May 2023", "May 7th, 2023", "2023-05-07") or as a relative reference that resolves to it \
("the week before 9 June 2023").
- It is WRONG if it names a different thing, date or period, contradicts the gold answer, or \
says the information is not available when the gold answer gives it.

Question: {question}
Gold answer: {gold}
Generated answer: {prediction}

Think briefly, then reply with only a JSON object whose key "label" is "CORRECT" or "WRONG", \
for example {{"label": "CORRECT"}}. Never use both words in the label.
"""


def redact_url(url: str) -> str:
    """``url`` with every query value and the userinfo password replaced by ``***``."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    query = "&".join(f"{k}=***" if v else k for k, v in
                     urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


class JudgeError(RuntimeError):
    """The judge endpoint failed (after retries) or answered something unusable."""


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    """Where and how to call the judge.

    Attributes:
      base_url: OpenAI-compatible API root (``.../v1``); ``/chat/completions`` is appended.
      model: model name sent in the request.
      api_key: bearer token, or "" for servers without auth. Hidden from ``repr``.
      timeout: seconds per HTTP request.
      max_retries: extra attempts after the first on retryable failures.
      backoff: first retry delay in seconds; doubles each retry.
      temperature: sampling temperature (0: deterministic judging).
      max_tokens: reply length cap.
      json_mode: send ``response_format={"type": "json_object"}`` (Mem0 does; turn off for
        servers that reject it — the reply is parsed leniently either way).
    """

    base_url: str
    model: str
    api_key: str = dataclasses.field(default="", repr=False)
    timeout: float = 60.0
    max_retries: int = 3
    backoff: float = 1.0
    temperature: float = 0.0
    max_tokens: int = 128
    json_mode: bool = True

    def __repr__(self) -> str:  # the URL redacted, the key left out
        return (f"JudgeConfig(base_url={redact_url(self.base_url)!r}, model={self.model!r}, "
                f"timeout={self.timeout}, max_retries={self.max_retries})")

    @property
    def endpoint(self) -> str:
        """``{base_url}/chat/completions``; a query string (``?api-key=...``, as some gateways
        take the key) stays after the path."""
        parts = urllib.parse.urlsplit(self.base_url)
        path = parts.path.rstrip("/") + "/chat/completions"
        return urllib.parse.urlunsplit(parts._replace(path=path))

    @property
    def display_endpoint(self) -> str:
        """:attr:`endpoint` safe to show: query values and a password as ``***``."""
        return redact_url(self.endpoint)

    def secrets(self) -> list[str]:
        """Strings never to show: the API key, query values and a password of the URL."""
        parts = urllib.parse.urlsplit(self.base_url)
        out = [self.api_key] if self.api_key else []
        out += [v for _, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=False)
                if len(v) >= 4]
        if parts.password:
            out.append(parts.password)
        return sorted(set(out), key=len, reverse=True)

    @classmethod
    def from_env(cls, base_url: str | None = None, model: str | None = None,
                 api_key: str | None = None, **kwargs: Any) -> "JudgeConfig | None":
        """Arguments first, then ``MR1_JUDGE_*``; ``None`` when base URL or model is missing."""
        base_url = base_url or os.environ.get(ENV_BASE_URL, "").strip()
        model = model or os.environ.get(ENV_MODEL, "").strip()
        if api_key is None:
            api_key = os.environ.get(ENV_API_KEY, "").strip()
        if not base_url or not model:
            return None
        return cls(base_url=base_url, model=model, api_key=api_key, **kwargs)


# --------------------------------------------------------------------------------------------
# Label parsing
# --------------------------------------------------------------------------------------------

_LABELS = {"CORRECT": True, "WRONG": False, "INCORRECT": False}
_LABEL_WORD = re.compile(r"\b(INCORRECT|CORRECT|WRONG)\b", re.IGNORECASE)
_JSON_OBJECT = re.compile(r"\{[^{}]*\}", re.DOTALL)


def _label_value(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if not isinstance(value, str):
        return None
    words = {w.upper() for w in _LABEL_WORD.findall(value)}
    verdicts = {_LABELS[w] for w in words}
    return verdicts.pop() if len(verdicts) == 1 else None


def parse_label(text: str) -> bool | None:
    """CORRECT → True, WRONG → False, unreadable → None.

    Tried in order: a JSON object anywhere in the text (code fences allowed) with a ``label``
    key (any case); otherwise the label words in free text: if only one verdict appears it
    wins, if both do the last one wins (the prompt asks for the verdict at the end).
    ``INCORRECT`` counts as WRONG.
    """
    if not text:
        return None
    for match in reversed(_JSON_OBJECT.findall(text)):
        try:
            obj = json.loads(match)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            for key, value in obj.items():
                if str(key).lower() == "label":
                    verdict = _label_value(value)
                    if verdict is not None:
                        return verdict
    words = _LABEL_WORD.findall(text)
    if not words:
        return None
    return _LABELS[words[-1].upper()]


# --------------------------------------------------------------------------------------------
# HTTP client
# --------------------------------------------------------------------------------------------

_RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


class LLMJudge:
    """Calls the judge model; ``judge(question, gold, prediction) -> bool``."""

    def __init__(self, config: JudgeConfig, *, prompt: str = JUDGE_PROMPT,
                 sleep: Callable[[float], None] = time.sleep):
        self.config = config
        self.prompt = prompt
        self._sleep = sleep

    def __repr__(self) -> str:
        c = self.config
        return f"LLMJudge(base_url={redact_url(c.base_url)!r}, model={c.model!r})"

    def _scrub(self, text: str) -> str:
        for secret in self.config.secrets():
            text = text.replace(secret, "***")
        return text

    def _request(self, payload: dict) -> urllib.request.Request:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        return urllib.request.Request(self.config.endpoint, data=json.dumps(payload).encode(),
                                      headers=headers, method="POST")

    def complete(self, messages: list[dict[str, str]]) -> str:
        """One chat completion (with retries); returns the first choice's message content."""
        c = self.config
        payload: dict[str, Any] = {"model": c.model, "messages": messages,
                                   "temperature": c.temperature, "max_tokens": c.max_tokens}
        if c.json_mode:
            payload["response_format"] = {"type": "json_object"}
        last = "no attempt"
        for attempt in range(c.max_retries + 1):
            if attempt:
                delay = c.backoff * 2 ** (attempt - 1)
                log.info("judge: retry %d/%d in %.1fs (%s)", attempt, c.max_retries, delay, last)
                self._sleep(delay)
            try:
                with urllib.request.urlopen(self._request(payload), timeout=c.timeout) as resp:
                    body = resp.read().decode("utf-8", errors="replace")
            except urllib.error.HTTPError as err:
                detail = err.read().decode("utf-8", errors="replace")[:300] if err.fp else ""
                last = self._scrub(f"HTTP {err.code} {err.reason}: {detail}")
                if err.code in _RETRY_STATUS:
                    continue
                raise JudgeError(f"judge endpoint {c.display_endpoint} refused the request: "
                                 f"{last}") from None
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as err:
                last = self._scrub(f"{type(err).__name__}: {err}")
                continue
            try:
                return json.loads(body)["choices"][0]["message"]["content"] or ""
            except (json.JSONDecodeError, KeyError, IndexError, TypeError):
                last = self._scrub(f"malformed response: {body[:300]!r}")
                continue
        raise JudgeError(f"judge endpoint {c.display_endpoint} failed after {c.max_retries + 1} "
                         f"attempts; last error: {last}")

    def judge(self, question: str, gold: str, prediction: str) -> bool:
        """True if the judge labels ``prediction`` CORRECT.

        A reply with no readable label counts as WRONG (logged as a warning), so a flaky
        judge can only lower J, never inflate it.
        """
        content = self.prompt.format(question=question, gold=gold, prediction=prediction)
        reply = self.complete([{"role": "user", "content": content}])
        verdict = parse_label(reply)
        if verdict is None:
            log.warning("judge: no CORRECT/WRONG label in reply %r; counted as WRONG",
                        reply[:200])
            return False
        return verdict


def load_judge(base_url: str | None = None, model: str | None = None,
               api_key: str | None = None, **kwargs: Any) -> LLMJudge | None:
    """An :class:`LLMJudge` from arguments / ``MR1_JUDGE_*``, or ``None`` if not configured."""
    config = JudgeConfig.from_env(base_url, model, api_key, **kwargs)
    if config is None:
        log.info("judge: not configured (set %s and %s); J will not be computed",
                 ENV_BASE_URL, ENV_MODEL)
        return None
    return LLMJudge(config)


def judge_scores(judge: LLMJudge | None, items: Iterable[Sequence[str]], *,
                 workers: int = 4) -> list[float | None]:
    """J for each ``(question, gold, prediction)``: 1.0 / 0.0, or ``None`` without a judge."""
    items = list(items)
    if judge is None:
        return [None] * len(items)

    def one(item: Sequence[str]) -> float:
        question, gold, prediction = item
        return float(judge.judge(question, gold, prediction))

    if workers <= 1:
        return [one(item) for item in items]
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, items))

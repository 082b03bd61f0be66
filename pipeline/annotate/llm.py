"""LLM annotators over any OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp, ...).

Two prompts, both asking for JSON only:

- an InsTag-style tagging prompt: the user turns of a conversation in, a list of fine-grained
  intention tags with a one-sentence explanation each out;
- a DEITA-style scoring prompt: every round (instruction, response) in, a complexity and a
  quality score on 1..6 per round out.

Requests run on a thread pool bounded by ``concurrency``; each has a timeout and is retried with
exponential backoff (and jitter) on timeouts, connection errors, 408/409/425/429 and 5xx. A reply
that arrives but cannot be parsed is recorded as ``malformed_reply`` (optionally asked again).
Nothing raises for a bad endpoint or a bad reply: every conversation gets a result, carrying an
``error`` code ("timeout", "http_500", "malformed_reply", ...) and detail when it failed.

Replies that parsed are cached in SQLite, keyed by sha256 over the model, the prompt and the
content, so a rerun (or a second stage over the same samples) asks the endpoint only for what it
has not answered yet. Failures are not cached: the next run tries them again.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from pipeline.annotate.quality import MAX_SCORE, MIN_SCORE, conversation_rounds

T = TypeVar("T")

TAG_PROMPT_VERSION = "instag-1"
QUALITY_PROMPT_VERSION = "deita-1"

TAG_SYSTEM_PROMPT = "You label user requests for a training-data curation pipeline. You answer with JSON only."

TAG_PROMPT = """Identify the intentions behind the user's request(s) below as fine-grained tags, in the \
style of InsTag. Each tag names a task, a skill, a topic domain or a required output format in a few \
lower-case words, for example "grammar correction", "python programming", "role-play", \
"math word problem", "summarization", "tool use". Give as many tags as the request needs, the most \
important first, each with a one-sentence explanation.

Reply with JSON only, no other text, in exactly this form:
{{"tags": [{{"tag": "...", "explanation": "..."}}]}}

User request(s):
<<<
{content}
>>>"""

QUALITY_SYSTEM_PROMPT = "You are a strict, consistent grader of instruction-following data. You answer with JSON only."

QUALITY_PROMPT = """Rate every round of the conversation below on two scales from 1 to 6.

complexity: how difficult and demanding the user's instruction is. 1 = a trivial one-step request; \
6 = a long, expert-level task with several constraints or steps.
quality: how helpful, correct, complete and well written the assistant's response is for that \
instruction. 1 = empty, wrong, off-topic, repetitive or cut off; 6 = excellent.

The conversation has {n} round(s). Reply with JSON only, no other text, with exactly {n} entries in order:
{{"rounds": [{{"complexity": <1-6>, "quality": <1-6>}}]}}

{content}"""


class MalformedReply(ValueError):
    """The endpoint answered, but not with the JSON the prompt asked for."""


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class LLMConfig:
    endpoint: str  # base URL (".../v1") or the full ".../chat/completions" URL
    model: str
    api_key: str | None = None
    concurrency: int = 8
    timeout_s: float = 60.0
    max_retries: int = 3  # further attempts after the first, for retryable failures
    malformed_retries: int = 0  # further attempts when a reply does not parse
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0
    temperature: float = 0.0
    max_tokens: int = 512
    max_chars: int = 4000  # each message is cut to this many characters in a prompt

    def __post_init__(self) -> None:
        if not self.endpoint.startswith(("http://", "https://")):
            raise ValueError(f"LLM endpoint must be an http(s) URL, got {self.endpoint!r}")
        if not self.model:
            raise ValueError("name the model the endpoint serves (--model)")
        if self.concurrency < 1 or self.timeout_s <= 0 or self.max_retries < 0:
            raise ValueError("concurrency must be >= 1, timeout_s > 0 and max_retries >= 0")

    @property
    def url(self) -> str:
        base = self.endpoint.rstrip("/")
        return base if base.endswith("/chat/completions") else base + "/chat/completions"

    def parameters(self) -> dict[str, Any]:
        """What determines the annotations (for a stage's skip-if-unchanged key); no secrets."""
        d = asdict(self)
        d.pop("api_key")
        for k in ("concurrency", "timeout_s", "max_retries", "malformed_retries", "backoff_s", "backoff_max_s"):
            d.pop(k)
        return d


# ---------------------------------------------------------------- cache


def cache_key(model: str, messages: Sequence[dict]) -> str:
    """sha256 over the model and the full prompt (instructions + content)."""
    h = hashlib.sha256()
    h.update(model.encode("utf-8"))
    h.update(b"\0")
    h.update(json.dumps(list(messages), ensure_ascii=False, sort_keys=True).encode("utf-8"))
    return h.hexdigest()


class ReplyCache:
    """SQLite table of replies that parsed; safe across threads and (by SQLite locking) processes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._con = sqlite3.connect(str(self.path), timeout=30.0, check_same_thread=False)
        with self._lock:
            self._con.execute("PRAGMA journal_mode=WAL")
            self._con.execute(
                "CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, model TEXT, kind TEXT, "
                "content TEXT NOT NULL, created REAL)")
            self._con.commit()

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._con.execute("SELECT content FROM replies WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def put(self, key: str, content: str, model: str, kind: str) -> None:
        with self._lock:
            self._con.execute("INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?, ?)",
                              (key, model, kind, content, time.time()))
            self._con.commit()

    def __len__(self) -> int:
        with self._lock:
            return int(self._con.execute("SELECT COUNT(*) FROM replies").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._con.close()


# ---------------------------------------------------------------- HTTP client


@dataclass
class Reply:
    value: Any = None  # the parsed reply
    error: str | None = None  # stable code: timeout, transport_error, http_<status>, malformed_reply, ...
    detail: str | None = None
    attempts: int = 0
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class ClientStats:
    requests: int = 0  # HTTP requests sent
    retries: int = 0
    cache_hits: int = 0
    errors: dict[str, int] = field(default_factory=dict)


_RETRYABLE_STATUS = {408, 409, 425, 429}


class ChatClient:
    """Chat-completions calls with timeouts, retries, backoff and the reply cache."""

    def __init__(self, config: LLMConfig, cache: ReplyCache | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        import httpx

        self.config = config
        self.cache = cache
        self.stats = ClientStats()
        self._sleep = sleep
        self._stats_lock = threading.Lock()
        headers = {"Content-Type": "application/json"}
        if config.api_key:
            headers["Authorization"] = f"Bearer {config.api_key}"
        limits = httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency)
        self._http = httpx.Client(headers=headers, timeout=httpx.Timeout(config.timeout_s), limits=limits)

    def close(self) -> None:
        self._http.close()

    def _count(self, name: str, error: str | None = None) -> None:
        with self._stats_lock:
            if name == "error":
                self.stats.errors[error or "?"] = self.stats.errors.get(error or "?", 0) + 1
            else:
                setattr(self.stats, name, getattr(self.stats, name) + 1)

    def _backoff(self, attempt: int, retry_after: str | None) -> None:
        delay = min(self.config.backoff_max_s, self.config.backoff_s * (2 ** attempt))
        if retry_after:
            try:
                delay = min(self.config.backoff_max_s, max(delay, float(retry_after)))
            except ValueError:
                pass
        self._sleep(delay * (0.5 + random.random() / 2))

    def _post_once(self, messages: Sequence[dict]) -> tuple[str | None, str | None, str | None, bool, str | None]:
        """(content, error, detail, retryable, retry_after) for one HTTP attempt."""
        import httpx

        payload = {"model": self.config.model, "messages": list(messages),
                   "temperature": self.config.temperature, "max_tokens": self.config.max_tokens}
        self._count("requests")
        try:
            r = self._http.post(self.config.url, json=payload)
        except httpx.TimeoutException as exc:
            return None, "timeout", f"no reply within {self.config.timeout_s:g} s ({type(exc).__name__})", True, None
        except httpx.TransportError as exc:
            return None, "transport_error", f"{type(exc).__name__}: {exc}", True, None
        if r.status_code != 200:
            retryable = r.status_code in _RETRYABLE_STATUS or r.status_code >= 500
            return None, f"http_{r.status_code}", r.text[:300], retryable, r.headers.get("retry-after")
        try:
            content = r.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            return None, "bad_response_body", f"not a chat-completions body ({exc}): {r.text[:200]}", False, None
        if not isinstance(content, str):
            return None, "bad_response_body", "message content is not text", False, None
        return content, None, None, False, None

    def request(self, messages: Sequence[dict], parse: Callable[[str], T], kind: str) -> Reply:
        """Ask once per attempt until a reply parses, retrying what is worth retrying."""
        key = cache_key(self.config.model, messages)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                try:
                    self._count("cache_hits")
                    return Reply(parse(hit), cached=True)
                except MalformedReply:
                    pass  # a cached reply that no longer parses (parser changed): ask again
        reply = Reply()
        malformed_left = self.config.malformed_retries
        attempt = 0
        try:
            while True:
                reply.attempts += 1
                content, error, detail, retryable, retry_after = self._post_once(messages)
                if error is None:
                    try:
                        reply.value, reply.error, reply.detail = parse(content), None, None
                    except MalformedReply as exc:
                        reply.error, reply.detail = "malformed_reply", f"{exc}; reply began {content[:200]!r}"
                        if malformed_left > 0:
                            malformed_left -= 1
                            self._count("retries")
                            continue
                        break
                    if self.cache is not None:
                        self.cache.put(key, content, self.config.model, kind)
                    break
                reply.error, reply.detail = error, detail
                if not retryable or attempt >= self.config.max_retries:
                    break
                self._backoff(attempt, retry_after)
                attempt += 1
                self._count("retries")
        except Exception as exc:  # never let one sample take the stage down
            reply.error, reply.detail = "unexpected_error", f"{type(exc).__name__}: {exc}"
        if reply.error is not None:
            self._count("error", reply.error)
        return reply

    def map(self, items: Sequence[T], fn: Callable[[T], Reply]) -> list[Reply]:
        if len(items) <= 1 or self.config.concurrency == 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(max_workers=self.config.concurrency) as pool:
            return list(pool.map(fn, items))


# ---------------------------------------------------------------- prompts and parsers


def _clip(text: str, limit: int) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit] + " [...]"


def render_user_turns(messages: Sequence[dict], max_chars: int) -> str:
    turns = [m.get("content") or "" for m in messages if m.get("role") == "user"]
    if len(turns) == 1:
        return _clip(turns[0], max_chars)
    return "\n\n".join(f"[turn {k}]\n{_clip(t, max_chars)}" for k, t in enumerate(turns, 1))


def tag_messages(messages: Sequence[dict], max_chars: int = 4000) -> list[dict]:
    return [{"role": "system", "content": TAG_SYSTEM_PROMPT},
            {"role": "user", "content": TAG_PROMPT.format(content=render_user_turns(messages, max_chars))}]


def quality_messages(messages: Sequence[dict], max_chars: int = 4000) -> tuple[list[dict], int]:
    rounds = conversation_rounds(messages)
    blocks = []
    for k, r in enumerate(rounds, 1):
        response = _clip(r.response, max_chars) if r.response is not None else "(no response)"
        blocks.append(f"### Round {k}\n[instruction]\n{_clip(r.instruction, max_chars)}\n[response]\n{response}")
    prompt = QUALITY_PROMPT.format(n=len(rounds), content="\n\n".join(blocks))
    return [{"role": "system", "content": QUALITY_SYSTEM_PROMPT}, {"role": "user", "content": prompt}], len(rounds)


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_json(content: str) -> Any:
    """The JSON value in a reply: the whole text, a fenced block, or the outermost {...} / [...]."""
    text = content.strip()
    candidates = [text]
    candidates += [m.group(1).strip() for m in _FENCE.finditer(text)]
    for open_, close in (("{", "}"), ("[", "]")):
        i, j = text.find(open_), text.rfind(close)
        if 0 <= i < j:
            candidates.append(text[i:j + 1])
    for c in candidates:
        try:
            return json.loads(c)
        except ValueError:
            continue
    raise MalformedReply("no JSON value found")


@dataclass(frozen=True)
class LLMTag:
    tag: str
    explanation: str


def parse_tag_reply(content: str) -> list[LLMTag]:
    value = extract_json(content)
    items = value.get("tags") if isinstance(value, dict) else value
    if not isinstance(items, list):
        raise MalformedReply("expected {\"tags\": [...]} or a JSON list")
    out: dict[str, LLMTag] = {}
    for item in items:
        if isinstance(item, str):
            tag, explanation = item, ""
        elif isinstance(item, dict) and isinstance(item.get("tag"), str):
            tag, explanation = item["tag"], str(item.get("explanation") or "")
        else:
            raise MalformedReply(f"a tag entry is neither a string nor {{\"tag\": ...}}: {str(item)[:80]}")
        tag = " ".join(tag.strip().lower().split())
        if tag and tag not in out:
            out[tag] = LLMTag(tag, explanation.strip())
    if not out:
        raise MalformedReply("the reply lists no tags")
    return list(out.values())


def _score(value: Any, name: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise MalformedReply(f"{name} {value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MalformedReply(f"{name} {value!r} is not a number")
    if not MIN_SCORE <= float(value) <= MAX_SCORE:
        raise MalformedReply(f"{name} {value} is outside {MIN_SCORE:g}..{MAX_SCORE:g}")
    return float(value)


def parse_quality_reply(content: str, n_rounds: int) -> tuple[list[float], list[float]]:
    """(quality per round, complexity per round) from a DEITA-style reply."""
    value = extract_json(content)
    rounds = value.get("rounds") if isinstance(value, dict) else value
    if isinstance(value, dict) and rounds is None and {"quality", "complexity"} <= set(value):
        rounds = [value]  # a single-round reply without the wrapper
    if not isinstance(rounds, list) or not all(isinstance(r, dict) for r in rounds):
        raise MalformedReply("expected {\"rounds\": [{\"complexity\": n, \"quality\": n}, ...]}")
    if len(rounds) != n_rounds:
        raise MalformedReply(f"expected {n_rounds} round(s), the reply has {len(rounds)}")
    quality = [_score(r.get("quality"), "quality") for r in rounds]
    complexity = [_score(r.get("complexity"), "complexity") for r in rounds]
    return quality, complexity


# ---------------------------------------------------------------- annotators


@dataclass
class LLMTagResult:
    tags: list[LLMTag]
    error: str | None = None
    detail: str | None = None
    cached: bool = False
    attempts: int = 0


@dataclass
class LLMQualityResult:
    quality_per_round: list[float] | None
    complexity_per_round: list[float] | None
    error: str | None = None
    detail: str | None = None
    cached: bool = False
    attempts: int = 0


class LLMAnnotator:
    """InsTag-style tags and DEITA-style scores from an OpenAI-compatible endpoint."""

    def __init__(self, config: LLMConfig, cache_path: str | Path | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.config = config
        self.cache = ReplyCache(cache_path) if cache_path is not None else None
        self.client = ChatClient(config, self.cache, sleep=sleep)

    @property
    def stats(self) -> ClientStats:
        return self.client.stats

    def close(self) -> None:
        self.client.close()
        if self.cache is not None:
            self.cache.close()

    def __enter__(self) -> "LLMAnnotator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def tag_many(self, conversations: Sequence[Sequence[dict]]) -> list[LLMTagResult]:
        def one(messages: Sequence[dict]) -> Reply:
            if not any(m.get("role") == "user" for m in messages):
                return Reply(error="no_user_turn", detail="the conversation has no user message")
            return self.client.request(tag_messages(messages, self.config.max_chars), parse_tag_reply, "tags")

        replies = self.client.map(list(conversations), one)
        return [LLMTagResult(r.value or [], r.error, r.detail, r.cached, r.attempts) for r in replies]

    def score_many(self, conversations: Sequence[Sequence[dict]]) -> list[LLMQualityResult]:
        def one(messages: Sequence[dict]) -> Reply:
            prompt, n = quality_messages(messages, self.config.max_chars)
            if n == 0:
                return Reply(error="no_user_turn", detail="the conversation has no user message")
            reply = self.client.request(prompt, lambda c: parse_quality_reply(c, n), "quality")
            if reply.ok:
                # A round without a response has nothing to learn from, whatever the grader says.
                rounds = conversation_rounds(messages)
                q, c = reply.value
                reply.value = ([MIN_SCORE if r.response is None else x for r, x in zip(rounds, q)], c)
            return reply

        out = []
        for r in self.client.map(list(conversations), one):
            q, c = r.value if r.ok else (None, None)
            out.append(LLMQualityResult(q, c, r.error, r.detail, r.cached, r.attempts))
        return out

"""How long one turn's preparation takes, as the stored history grows.

A turn, as the senders do it: append the user's message, ``build_context`` (an 8,000-token
window), serialize the request body, append the reply. It is timed on conversations of
100, 1,000, 10,000 and 100,000 stored messages, on SQLite and (given a URL) on Postgres,
next to two references measured in the same run on the same data:

floor
    The same turn written by hand against the raw driver (``sqlite3`` / ``psycopg``): a
    table of our own with each message's token count in a column, the system message read
    through a partial index, the newest rows read newest first with one indexed query
    until the budget is spent, ``json.dumps``, the reply inserted. What it costs to do the
    job with nothing in between; gilas-conv should stay within a small factor of it.

langchain
    LangChain's usual recipe: ``SQLChatMessageHistory`` for storage and ``trim_messages``
    (strategy "last", ``include_system``, ``start_on="human"``, a tiktoken counter) for the
    window. It reads and re-tokenizes the whole history every turn, so it is measured up to
    10,000 messages only.

Also reported: the tracemalloc peak of one turn (Python allocations, after warm-up), to
show that gilas-conv's memory per turn does not grow with the history.

Run ``python benchmarks/turn.py --help``; ``benchmarks/README.md`` explains the output.
Speed is measured here, never in the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import gc
import inspect
import itertools
import json
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
import tracemalloc
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

try:
    import gilas_conv  # noqa: F401
except ModuleNotFoundError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import Engine, Table, create_engine, event, insert, text, update
from sqlalchemy.engine import make_url

from gilas_conv import ConversationStore, build_context
from gilas_conv import tokens as gc_tokens
from gilas_conv._config import DEFAULT_TURN_LEASE_SECONDS
from gilas_conv.store._schema import ConversationRow, MessageRow
from gilas_conv.truncation import DEFAULT_REPLY_RESERVE

_MESSAGES = cast(Table, MessageRow.__table__)


# The sender passes the handle's model to _begin_turn where the store takes it (so the turn
# does not look the conversation up twice); older checkouts look it up themselves. Asked
# once: inspecting the signature costs more than a tenth of the floor's whole turn.
_BEGIN_TAKES_MODEL = "model" in inspect.signature(ConversationStore._begin_turn).parameters


def _model_hint(conv: Any) -> dict[str, Any]:
    return {"model": conv.model} if _BEGIN_TAKES_MODEL else {}


# The sender takes its turn with _take_turn(window=True) where the store has it: the lease
# statement may then read the start of the window too, and the sender plans from that.
_TAKE_TURN_WINDOW = (
    "window" in inspect.signature(getattr(ConversationStore, "_take_turn", _model_hint)).parameters
)


def _begin_turn(store: ConversationStore, conv: Any, content: str) -> tuple[str, list[Any], Any]:
    """The lease, the messages added, and the handle to plan the turn with, as the sender
    gets them (gilas_conv/_sender/_base.py, ``_take_turn``)."""
    messages = [{"role": "user", "content": content}]
    if not _TAKE_TURN_WINDOW:
        lease, _, added = store._begin_turn(conv.id, owner=conv.owner, messages=messages, **_model_hint(conv))
        return lease, added, conv
    lease, taken, added, _ = store._take_turn(
        conv.id,
        owner=conv.owner,
        lease_seconds=DEFAULT_TURN_LEASE_SECONDS,
        messages=messages,
        quota=None,
        model=conv.model,
        window=True,
    )
    if taken._window_start is None:
        return lease, added, conv
    window = dataclasses.replace(conv)
    window._window_start = taken._window_start
    return lease, added, window


_CONVERSATIONS = cast(Table, ConversationRow.__table__)

ENV_POSTGRES_URL = "GILAS_CONV_BENCH_POSTGRES_URL"

DEFAULT_SIZES = (100, 1_000, 10_000, 100_000)
DEFAULT_TURNS = 30
QUICK_TURNS = 10
WARMUP_TURNS = 3
QUICK_WARMUP_TURNS = 2
# Turns whose tracemalloc peak is taken (tracemalloc slows a turn down, so never timed).
MEMORY_TURNS = 3

MODEL = "gpt-4o-mini"
ENCODING = "o200k_base"
CONTEXT_LIMIT = 8000
# What build_context leaves for the prompt under this limit when max_tokens is not given;
# the floor spends the same budget.
PROMPT_BUDGET = CONTEXT_LIMIT - DEFAULT_REPLY_RESERVE - gc_tokens.REPLY_PRIMING_TOKENS

# LangChain re-reads and re-tokenizes everything each turn (~0.6 s at 10,000 messages on a
# small machine): measured up to this size, with fewer turns at it.
LANGCHAIN_MAX_SIZE = 10_000
LANGCHAIN_SLOW_TURNS = 5
QUICK_LANGCHAIN_SLOW_TURNS = 3
LANGCHAIN_SLOW_WARMUP = 1
LANGCHAIN_SLOW_MEMORY_TURNS = 1

# Targets the issue sets.
TARGET_SCALING = 1.5  # gilas at 100,000 / gilas at 1,000
TARGET_FLOOR = 3.0  # gilas / raw floor, at every size
TARGET_LANGCHAIN = 100.0  # langchain / gilas at 10,000

BUILD_BATCH = 5_000
SEED = 1403
TEXT_POOL = 400
MIN_TEXT_TOKENS = 20
MAX_TEXT_TOKENS = 80
# Floor on Postgres: newest rows are read in LIMIT batches (a plain cursor would fetch all).
FLOOR_PG_BATCH = 256

SYSTEM_PROMPT = (
    "You are a helpful, concise assistant for a Persian software team. Answer in the language "
    "of the question; keep technical terms in English. / تو دستیار یک تیم نرم‌افزاری هستی؛ "
    "کوتاه و دقیق پاسخ بده."
)

_ENGLISH = (
    "Can you explain how the retry logic decides how long to wait before the next attempt?",
    "Here is the stack trace I get when the worker starts on the staging server.",
    "Sure, the short answer is that each message is counted once and the count is stored.",
    "Let me rewrite the query so that it uses the index on conversation id and sequence number.",
    "I tried that, but the tests still fail on Postgres with a serialization error.",
    "What would be a good name for a function that trims the history to fit the window?",
    "The report is due on Thursday, so a rough draft by tomorrow evening would be great.",
    "In short: keep the system prompt, then the newest turns, and drop the oldest first.",
    "Thanks, that worked. One more question about the export format, if you have a minute.",
    "Please translate the following paragraph and keep the technical terms in English.",
    "Here is a summary of the three options, with their costs, risks and what each needs.",
    "The train leaves at 7:45 in the morning and arrives in Isfahan a little after noon.",
    "Step 2 is optional: only run the migration when the schema version is behind.",
    "If the connection drops, the client retries with exponential backoff and jitter.",
    "Could you make the example shorter and add a comment explaining the edge case?",
    "That depends on the budget; for 8,000 tokens you can keep roughly the last fifty turns.",
)
_PERSIAN = (
    "سلام، می‌خواهم درباره‌ی برنامه‌ی سفرم به اصفهان بیشتر بدانم.",
    "لطفاً این متن را به زبان ساده‌تر و در چند جمله خلاصه کن.",
    "کدام کتابخانه‌ی پایتون برای کار با پایگاه داده مناسب‌تر است؟",
    "قیمت بلیت قطار تهران به مشهد در هفته‌ی آینده چقدر است؟",
    "من در حال نوشتن یک گزارش فنی درباره‌ی مصرف انرژی در ساختمان‌ها هستم.",
    "می‌توانی یک مثال کوتاه از استفاده‌ی این تابع بنویسی؟",
    "پاسخ قبلی خیلی طولانی بود؛ لطفاً آن را در سه جمله بگو.",
    "این خطا هنگام اجرای برنامه روی سرور ظاهر می‌شود و لاگ چیز زیادی نشان نمی‌دهد.",
    "به نظرم بهتر است داده‌ها را پیش از ذخیره‌سازی اعتبارسنجی کنیم.",
    "باشه، ممنون! حالا بگو چطور می‌توانم نتیجه را در یک فایل ذخیره کنم.",
    "در این روش هر پیام فقط یک بار شمارش می‌شود و نتیجه در پایگاه داده می‌ماند.",
    "اگر اتصال اینترنت قطع شود، درخواست پس از چند ثانیه دوباره ارسال می‌شود.",
    "خلاصه‌ی جلسه‌ی امروز را برای تیم بفرست و موارد باقی‌مانده را هم بنویس.",
    "دمای هوای شیراز در اردیبهشت معمولاً معتدل و دلپذیر است.",
    "برای نسخه‌ی بعدی، پشتیبانی از Postgres و آزمون‌های بیشتر را اضافه می‌کنیم.",
    "ممنون از توضیح کاملت؛ فقط بخش دوم را کمی بیشتر باز کن.",
)


# ---------------------------------------------------------------------------------------------
# Realistic text


@dataclass(frozen=True)
class Corpus:
    """Message texts of 20-80 tokens (English, Persian, mixed), with their stored costs."""

    user: tuple[str, ...]
    assistant: tuple[str, ...]
    # (role, text) -> message_tokens, counted once per distinct text, as append would.
    tokens: dict[tuple[str, str], int]

    @classmethod
    def make(cls, rng: random.Random) -> Corpus:
        enc = gc_tokens.get_encoding(ENCODING)
        pools: dict[str, list[str]] = {"user": [], "assistant": []}
        for pool in pools.values():
            while len(pool) < TEXT_POOL:
                sentences = rng.choice((_ENGLISH, _PERSIAN, _ENGLISH + _PERSIAN))
                target = rng.randint(MIN_TEXT_TOKENS, MAX_TEXT_TOKENS)
                text_ = ""
                for _ in range(20):
                    candidate = (text_ + " " + rng.choice(sentences)).strip()
                    n = len(enc.encode_ordinary(candidate))
                    if n > MAX_TEXT_TOKENS:
                        continue
                    text_ = candidate
                    if n >= target:
                        break
                if len(enc.encode_ordinary(text_)) >= MIN_TEXT_TOKENS:
                    pool.append(text_)
        counts = {
            (role, t): gc_tokens.message_tokens({"role": role, "content": t}, ENCODING)
            for role, pool in pools.items()
            for t in pool
        }
        counts[("system", SYSTEM_PROMPT)] = gc_tokens.message_tokens(
            {"role": "system", "content": SYSTEM_PROMPT}, ENCODING
        )
        return cls(tuple(pools["user"]), tuple(pools["assistant"]), counts)

    def history(self, size: int, rng: random.Random) -> Iterator[tuple[int, str, str]]:
        """(seq, role, text) of a ``size``-message history: a system message, then
        alternating messages ending with a reply, so the next turn starts with the user."""
        yield 1, "system", SYSTEM_PROMPT
        for seq in range(2, size + 1):
            role = "assistant" if (size - seq) % 2 == 0 else "user"
            yield seq, role, rng.choice(self.user if role == "user" else self.assistant)

    def turns(self, rng: random.Random) -> Iterator[TurnInput]:
        while True:
            yield TurnInput(rng.choice(self.user), rng.choice(self.assistant), f"chatcmpl-{uuid.uuid4().hex}")


@dataclass(frozen=True)
class TurnInput:
    user: str
    reply: str
    response_id: str


def _request_body(model: str, messages: list[dict[str, Any]]) -> bytes:
    # As the senders serialize it: compact, Persian kept as UTF-8.
    body = {"model": model, "messages": messages, "stream": False}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _batches(rows: Iterator[dict[str, Any]], size: int = BUILD_BATCH) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---------------------------------------------------------------------------------------------
# The three ways of doing a turn. Each has build(size) -> a session, and turn(session, input)
# -> the number of messages sent.


class Case:
    name = ""

    def build(self, size: int, corpus: Corpus, rng: random.Random) -> Any:
        raise NotImplementedError

    def turn(self, session: Any, turn: TurnInput) -> int:
        raise NotImplementedError

    def analyze(self) -> None:
        """Refresh planner statistics after a bulk load, as autovacuum would (Postgres)."""

    def close(self) -> None:
        pass


class GilasCase(Case):
    """gilas-conv, as a sender does a turn: store.get, _begin_turn with the user message
    (the turn lease), build_context, json.dumps, the reply appended with the lease."""

    name = "gilas"

    def __init__(self, url: str) -> None:
        self.store = ConversationStore(url, auto_upgrade=True)

    def build(self, size: int, corpus: Corpus, rng: random.Random) -> str:
        # One bulk load through the store's engine, filling the columns as append does:
        # tokens/tokens_encoding precomputed per distinct text, contiguous seqs from 1,
        # the running token total where the schema has one, conversations.last_seq = size.
        conv = self.store.create(model=MODEL, system=SYSTEM_PROMPT)
        start = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=30 * size)
        running = "tokens_total" in _MESSAGES.c
        total = corpus.tokens[("system", SYSTEM_PROMPT)]

        def rows() -> Iterator[dict[str, Any]]:
            nonlocal total
            for seq, role, text_ in corpus.history(size, rng):
                if seq == 1:
                    continue  # create() stored the system message
                tokens = corpus.tokens[(role, text_)]
                total += tokens
                row = {
                    "conversation_id": conv.id,
                    "seq": seq,
                    "role": role,
                    "content": text_,
                    "status": "complete",
                    "pinned": False,
                    "tokens": tokens,
                    "tokens_encoding": ENCODING,
                    "created_at": start + dt.timedelta(seconds=30 * seq),
                }
                if running:
                    row["tokens_total"] = total
                yield row

        totals: dict[str, Any] = {"last_seq": size}
        with self.store.engine.begin() as conn:
            for batch in _batches(rows()):
                conn.execute(insert(_MESSAGES), batch)
            if "tokens_total" in _CONVERSATIONS.c:
                totals["tokens_total"] = total
            conn.execute(update(_CONVERSATIONS).where(_CONVERSATIONS.c.id == conv.id).values(**totals))
        return conv.id

    def turn(self, conversation_id: str, turn: TurnInput) -> int:
        # What a sender does per request (gilas_conv/_sender/_base.py): look the
        # conversation up, take the turn lease with the user's message, plan, and store the
        # reply with the lease (which releases it in the same transaction).
        conv = self.store.get(conversation_id)
        lease, added, window = _begin_turn(self.store, conv, turn.user)
        for message in added:
            conv._saw(message)
        ctx = build_context(window, context_limit=CONTEXT_LIMIT)
        _request_body(ctx.model, ctx.messages)
        conv.append(
            "assistant",
            turn.reply,
            response_id=turn.response_id,
            model=ctx.model,
            finish_reason="stop",
            usage={"prompt_tokens": ctx.prompt_tokens, "completion_tokens": 50, "total_tokens": 0},
            predicted_prompt_tokens=ctx.prompt_tokens,
            reply_to=added[0].seq,
            lease=lease,
        )
        return len(ctx.messages)

    def analyze(self) -> None:
        if self.store.dialect == "postgresql":
            with self.store.engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE"))

    def close(self) -> None:
        self.store.close()


class _FloorCase(Case):
    """A hand-written turn on the raw driver; subclasses supply the SQL dialect bits."""

    name = "floor"
    _p = "?"

    def __init__(self) -> None:
        self.enc = gc_tokens.get_encoding(ENCODING)

    def _count(self, role: str, content: str) -> int:
        return (
            gc_tokens.TOKENS_PER_MESSAGE
            + len(self.enc.encode_ordinary(role))
            + len(self.enc.encode_ordinary(content))
        )

    def _insert(self, session: str, role: str, content: str) -> None:
        raise NotImplementedError

    def _lookup(self, session: str) -> Any:
        raise NotImplementedError

    def _system(self, session: str) -> list[tuple[str, str, int]]:
        raise NotImplementedError

    def _newest(self, session: str) -> Iterator[tuple[str, str, int]]:
        raise NotImplementedError

    def _rows(self, size: int, corpus: Corpus, rng: random.Random, session: str) -> Iterator[tuple[Any, ...]]:
        for _seq, role, text_ in corpus.history(size, rng):
            yield session, role, text_, corpus.tokens[(role, text_)]

    def turn(self, session: str, turn: TurnInput) -> int:
        # The conversation looked up by id, as a server does per request.
        if self._lookup(session) is None:
            raise LookupError(session)
        self._insert(session, "user", turn.user)
        system = self._system(session)
        left = PROMPT_BUDGET - sum(t for _r, _c, t in system)
        picked: list[tuple[str, str]] = []
        for role, content, tokens in self._newest(session):
            if tokens > left:
                # Cut here, and start the window on a user message.
                while picked and picked[-1][0] != "user":
                    picked.pop()
                break
            left -= tokens
            picked.append((role, content))
        messages = [{"role": r, "content": c} for r, c, _t in system]
        messages.extend({"role": r, "content": c} for r, c in reversed(picked))
        _request_body(MODEL, messages)
        self._insert(session, "assistant", turn.reply)
        return len(messages)


class SqliteFloor(_FloorCase):
    def __init__(self, path: Path) -> None:
        super().__init__()
        # Autocommit: each INSERT is its own transaction, as each append is.
        self.db = sqlite3.connect(path, isolation_level=None)
        for pragma in ("journal_mode = WAL", "synchronous = NORMAL", "busy_timeout = 30000"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.executescript(
            """
            CREATE TABLE msg (
                id INTEGER PRIMARY KEY, session TEXT NOT NULL, role TEXT NOT NULL,
                content TEXT NOT NULL, tokens INTEGER NOT NULL);
            CREATE INDEX ix_msg_session ON msg (session, id);
            CREATE INDEX ix_msg_system ON msg (session, id) WHERE role = 'system';
            CREATE TABLE conv (
                id TEXT PRIMARY KEY, model TEXT NOT NULL, title TEXT, created_at TEXT NOT NULL);
            """
        )

    def build(self, size: int, corpus: Corpus, rng: random.Random) -> str:
        session = f"s{size}"
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute(
                "INSERT INTO conv (id, model, created_at) VALUES (?, ?, ?)",
                (session, MODEL, dt.datetime.now(dt.timezone.utc).isoformat()),
            )
            self.db.executemany(
                "INSERT INTO msg (session, role, content, tokens) VALUES (?, ?, ?, ?)",
                self._rows(size, corpus, rng, session),
            )
        return session

    def _insert(self, session: str, role: str, content: str) -> None:
        self.db.execute(
            "INSERT INTO msg (session, role, content, tokens) VALUES (?, ?, ?, ?)",
            (session, role, content, self._count(role, content)),
        )

    def _lookup(self, session: str) -> Any:
        return self.db.execute(
            "SELECT id, model, title, created_at FROM conv WHERE id = ?", (session,)
        ).fetchone()

    def _system(self, session: str) -> list[tuple[str, str, int]]:
        return self.db.execute(
            "SELECT role, content, tokens FROM msg WHERE session = ? AND role = 'system' ORDER BY id",
            (session,),
        ).fetchall()

    def _newest(self, session: str) -> Iterator[tuple[str, str, int]]:
        # sqlite3 steps the statement row by row: stopping early reads no more rows.
        cursor = self.db.execute(
            "SELECT role, content, tokens FROM msg WHERE session = ? AND role <> 'system' ORDER BY id DESC",
            (session,),
        )
        try:
            yield from cursor
        finally:
            cursor.close()

    def close(self) -> None:
        self.db.close()


class SqliteFloorIndexed(SqliteFloor):
    """The SQLite floor doing the writes a gilas turn does beyond it: each message also
    indexed for full-text search (an external-content FTS5 table on the raw text, the
    default tokenizer: no Persian normalization), and the reply's usage recorded in a
    ledger row, in the message's own transaction. Not a target: it shows what the turn
    costs against the same durable work written by hand."""

    name = "floor+writes"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.db.executescript(
            """
            CREATE VIRTUAL TABLE msg_fts USING fts5(content, content='msg', content_rowid='id');
            CREATE TABLE ledger (
                id INTEGER PRIMARY KEY, session TEXT NOT NULL, model TEXT NOT NULL,
                prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
                created_at TEXT NOT NULL);
            CREATE INDEX ix_ledger_session ON ledger (session, created_at);
            """
        )

    def build(self, size: int, corpus: Corpus, rng: random.Random) -> str:
        session = super().build(size, corpus, rng)
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("INSERT INTO msg_fts (msg_fts) VALUES ('rebuild')")
        return session

    def _insert(self, session: str, role: str, content: str) -> None:
        tokens = self._count(role, content)
        with self.db:
            self.db.execute("BEGIN")
            row = self.db.execute(
                "INSERT INTO msg (session, role, content, tokens) VALUES (?, ?, ?, ?)",
                (session, role, content, tokens),
            ).lastrowid
            self.db.execute("INSERT INTO msg_fts (rowid, content) VALUES (?, ?)", (row, content))
            if role == "assistant":
                self.db.execute(
                    "INSERT INTO ledger (session, model, prompt_tokens, completion_tokens, created_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (session, MODEL, PROMPT_BUDGET, tokens, dt.datetime.now(dt.timezone.utc).isoformat()),
                )


class PostgresFloor(_FloorCase):
    def __init__(self, conninfo: str) -> None:
        super().__init__()
        import psycopg

        self.db = psycopg.connect(conninfo, autocommit=True)
        # Keyed by (session, id) alone: with a separate primary key on id, the planner reads
        # "ORDER BY id DESC LIMIT n" by walking that key backwards through other sessions' rows.
        self.db.execute(
            "CREATE TABLE msg (session text NOT NULL, id bigint GENERATED ALWAYS AS IDENTITY,"
            " role text NOT NULL, content text NOT NULL, tokens integer NOT NULL, PRIMARY KEY (session, id))"
        )
        self.db.execute("CREATE INDEX ix_msg_system ON msg (session, id) WHERE role = 'system'")
        self.db.execute(
            "CREATE TABLE conv (id text PRIMARY KEY, model text NOT NULL, title text,"
            " created_at timestamptz NOT NULL DEFAULT now())"
        )

    def build(self, size: int, corpus: Corpus, rng: random.Random) -> str:
        session = f"s{size}"
        self.db.execute("INSERT INTO conv (id, model) VALUES (%s, %s)", (session, MODEL))
        with (
            self.db.cursor() as cur,
            cur.copy("COPY msg (session, role, content, tokens) FROM STDIN") as copy,
        ):
            for row in self._rows(size, corpus, rng, session):
                copy.write_row(row)
        return session

    def analyze(self) -> None:
        self.db.execute("ANALYZE msg")

    def _insert(self, session: str, role: str, content: str) -> None:
        self.db.execute(
            "INSERT INTO msg (session, role, content, tokens) VALUES (%s, %s, %s, %s)",
            (session, role, content, self._count(role, content)),
        )

    def _lookup(self, session: str) -> Any:
        return self.db.execute(
            "SELECT id, model, title, created_at FROM conv WHERE id = %s", (session,)
        ).fetchone()

    def _system(self, session: str) -> list[tuple[str, str, int]]:
        return self.db.execute(
            "SELECT role, content, tokens FROM msg WHERE session = %s AND role = 'system' ORDER BY id",
            (session,),
        ).fetchall()

    def _newest(self, session: str) -> Iterator[tuple[str, str, int]]:
        before = 2**62
        while True:
            rows = self.db.execute(
                "SELECT id, role, content, tokens FROM msg WHERE session = %s AND role <> 'system'"
                " AND id < %s ORDER BY id DESC LIMIT %s",
                (session, before, FLOOR_PG_BATCH),
            ).fetchall()
            for _id, role, content, tokens in rows:
                yield role, content, tokens
            if len(rows) < FLOOR_PG_BATCH:
                return
            before = rows[-1][0]

    def close(self) -> None:
        self.db.close()


class LangChainCase(Case):
    """SQLChatMessageHistory + trim_messages, as LangChain's docs put them together.

    ``memoize``: the token counter caches each message's count (keyed by its type, content
    and name), as a user who cares about speed would write it; LangChain still reads and
    deserializes the whole history every turn.
    """

    name = "langchain"

    def __init__(self, engine: Engine, *, memoize: bool = False) -> None:
        from langchain_core.messages import (
            AIMessage,
            BaseMessage,
            HumanMessage,
            SystemMessage,
            convert_to_openai_messages,
            message_to_dict,
            trim_messages,
        )

        self.engine = engine
        self._classes = {"user": HumanMessage, "assistant": AIMessage, "system": SystemMessage}
        self._message_to_dict = message_to_dict
        self._to_openai = convert_to_openai_messages
        self._trim = trim_messages
        enc = gc_tokens.get_encoding(ENCODING)
        roles = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool"}

        self.memoize = memoize
        if memoize:
            self.name = "langchain-memo"

        # The tiktoken counter of LangChain's trim_messages how-to, on the same encoding.
        def count_message(msg: BaseMessage) -> int:
            content = msg.content if isinstance(msg.content, str) else json.dumps(msg.content)
            n = (
                gc_tokens.TOKENS_PER_MESSAGE
                + len(enc.encode(roles.get(msg.type, msg.type)))
                + len(enc.encode(content))
            )
            if msg.name:
                n += gc_tokens.TOKENS_PER_NAME + len(enc.encode(msg.name))
            return n

        def tiktoken_counter(messages: list[BaseMessage]) -> int:
            return gc_tokens.REPLY_PRIMING_TOKENS + sum(count_message(msg) for msg in messages)

        # The same counter with each message's count cached across calls and turns.
        cache: dict[tuple[str, str, str | None], int] = {}

        def memoized_counter(messages: list[BaseMessage]) -> int:
            total = gc_tokens.REPLY_PRIMING_TOKENS
            for msg in messages:
                content = msg.content if isinstance(msg.content, str) else json.dumps(msg.content)
                key = (msg.type, content, msg.name)
                n = cache.get(key)
                if n is None:
                    n = cache[key] = count_message(msg)
                total += n
            return total

        self.counter = memoized_counter if memoize else tiktoken_counter

    def build(self, size: int, corpus: Corpus, rng: random.Random) -> Any:
        from langchain_community.chat_message_histories import SQLChatMessageHistory

        # A table per size: LangChain's table has no index on session_id, so in a shared
        # table every read would also scan the other sizes' rows.
        history = SQLChatMessageHistory(
            session_id=f"s{size}",
            connection=self.engine,
            table_name=f"message_store_{size}{'_memo' if self.memoize else ''}",
        )
        serialized: dict[tuple[str, str], str] = {}
        rows = (
            {
                "session_id": history.session_id,
                "message": serialized.setdefault(
                    (role, text_),
                    json.dumps(self._message_to_dict(self._classes[role](content=text_))),
                ),
            }
            for _seq, role, text_ in corpus.history(size, rng)
        )
        with self.engine.begin() as conn:
            for batch in _batches(rows):
                conn.execute(insert(history.sql_model_class.__table__), batch)
        return history

    def turn(self, history: Any, turn: TurnInput) -> int:
        history.add_message(self._classes["user"](content=turn.user))
        trimmed = self._trim(
            history.messages,
            max_tokens=CONTEXT_LIMIT,
            strategy="last",
            token_counter=self.counter,
            include_system=True,
            start_on="human",
        )
        _request_body(MODEL, self._to_openai(trimmed))
        history.add_message(self._classes["assistant"](content=turn.reply))
        return len(trimmed)

    def analyze(self) -> None:
        if self.engine.dialect.name == "postgresql":
            with self.engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE"))

    def close(self) -> None:
        self.engine.dispose()


# ---------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Result:
    backend: str
    case: str
    size: int
    ms: float | None = None  # median per turn
    cpu_ms: float | None = None  # median CPU time of this process per turn (time.process_time)
    turns: int = 0
    sent: int = 0  # messages in the last request
    peak_kib: float | None = None  # tracemalloc peak of one turn, median
    build_s: float | None = None
    note: str = ""


@dataclass
class Plan:
    turns: int
    warmup: int
    langchain_slow_turns: int
    langchain: bool
    sizes: tuple[int, ...]
    memory_turns: int = MEMORY_TURNS
    results: list[Result] = field(default_factory=list)


@dataclass
class _Run:
    """One case on one conversation, with the turns it is fed (the same for every case)."""

    case: Case
    session: Any
    result: Result
    warmup: int
    turns: int
    memory_turns: int
    inputs: Iterator[TurnInput]


def _timed_turns(runs: Sequence[_Run]) -> None:
    """Warm up, then time turns round-robin across every case and size, so that load from
    other processes on a shared machine falls on all of them alike and the ratios between
    them stay fair even when the absolute times do not."""
    for run in runs:
        for _ in range(run.warmup):
            run.case.turn(run.session, next(run.inputs))
    samples: list[list[float]] = [[] for _ in runs]
    cpu: list[list[float]] = [[] for _ in runs]
    gc.collect()
    for round_ in range(max((run.turns for run in runs), default=0)):
        for run, times, cpu_times in zip(runs, samples, cpu, strict=True):
            if round_ >= run.turns:
                continue
            turn = next(run.inputs)
            cpu_started = time.process_time()
            started = time.perf_counter()
            run.result.sent = run.case.turn(run.session, turn)
            times.append(time.perf_counter() - started)
            cpu_times.append(time.process_time() - cpu_started)
    for run, times, cpu_times in zip(runs, samples, cpu, strict=True):
        run.result.ms = statistics.median(times) * 1000
        run.result.cpu_ms = statistics.median(cpu_times) * 1000
        run.result.turns = len(times)


def _memory_turns(run: _Run) -> None:
    """The median tracemalloc peak of a few turns, above what was allocated before each."""
    peaks = []
    tracemalloc.start()
    try:
        for _ in range(run.memory_turns):
            turn = next(run.inputs)
            gc.collect()
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            run.case.turn(run.session, turn)
            peaks.append(tracemalloc.get_traced_memory()[1] - before)
    finally:
        tracemalloc.stop()
    run.result.peak_kib = statistics.median(peaks) / 1024


def _run_backend(
    backend: str, cases: list[Case], plan: Plan, corpus: Corpus, log: Callable[[str], None]
) -> None:
    runs: list[_Run] = []
    skipped: list[Result] = []
    for size in plan.sizes:
        # Every case gets the same history and the same turns.
        turn_inputs = list(
            itertools.islice(
                corpus.turns(random.Random(SEED + size + 1)), plan.warmup + plan.turns + plan.memory_turns
            )
        )
        built = []
        for case in cases:
            result = Result(backend, case.name, size)
            plan.results.append(result)
            is_langchain = isinstance(case, LangChainCase)
            if is_langchain and size > LANGCHAIN_MAX_SIZE:
                skipped.append(result)
                continue
            started = time.perf_counter()
            try:
                session = case.build(size, corpus, random.Random(SEED + size))
                case.analyze()
            except Exception as err:
                if not is_langchain:
                    raise
                # The comparison is optional; a LangChain that fails on this backend is reported.
                result.note = f"failed: {type(err).__name__}: {err}"
                continue
            result.build_s = time.perf_counter() - started
            built.append(f"{case.name} {result.build_s:.1f} s")
            if is_langchain and size == LANGCHAIN_MAX_SIZE:
                warmup, turns, memory = (
                    LANGCHAIN_SLOW_WARMUP,
                    plan.langchain_slow_turns,
                    LANGCHAIN_SLOW_MEMORY_TURNS,
                )
            else:
                warmup, turns, memory = plan.warmup, plan.turns, plan.memory_turns
            runs.append(_Run(case, session, result, warmup, turns, memory, iter(turn_inputs)))
        log(f"  {backend} {size:>7,} messages built ({', '.join(built)})")
    log(f"  {backend}: timing {len(runs)} cases round-robin")
    _timed_turns(runs)
    for run in runs:
        _memory_turns(run)
    # What LangChain would take where it was skipped, from its largest measured size.
    for result in skipped:
        measured = [
            r.result
            for r in runs
            if r.result.case == result.case and r.result.backend == result.backend and r.result.ms
        ]
        largest = max(measured, key=lambda r: r.size, default=None)
        guess = (
            f", ~{largest.ms * result.size / largest.size / 1000:.0f} s/turn by linear extrapolation"
            if largest and largest.ms
            else ""
        )
        result.note = f"skipped above {LANGCHAIN_MAX_SIZE:,} messages (it re-reads the whole history{guess})"


# ---------------------------------------------------------------------------------------------
# Backends


def _sqlite_engine(path: Path) -> Engine:
    """A plain engine for LangChain, with the same WAL/NORMAL settings gilas-conv uses, so
    the comparison is about the work done, not about fsyncs."""
    engine = create_engine(f"sqlite:///{path}")

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    return engine


def run_sqlite(plan: Plan, corpus: Corpus, log: Callable[[str], None]) -> None:
    with tempfile.TemporaryDirectory(prefix="gc-bench-") as tmp:
        directory = Path(tmp)
        cases: list[Case] = [
            GilasCase(f"sqlite:///{directory / 'gilas.db'}"),
            SqliteFloor(directory / "floor.db"),
            SqliteFloorIndexed(directory / "floor-writes.db"),
        ]
        if plan.langchain:
            engine = _sqlite_engine(directory / "langchain.db")
            cases += [LangChainCase(engine), LangChainCase(engine, memoize=True)]
        try:
            _run_backend("sqlite", cases, plan, corpus, log)
        finally:
            for case in cases:
                case.close()


@contextlib.contextmanager
def _scratch_database(url: str) -> Iterator[tuple[str, str]]:
    """Create a database of our own next to ``url``'s; yield (SQLAlchemy URL, libpq conninfo)."""
    import psycopg

    base = make_url(url)
    admin = base.set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"gc_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        own = base.set(database=name)
        yield (
            own.set(drivername="postgresql+psycopg").render_as_string(hide_password=False),
            own.set(drivername="postgresql").render_as_string(hide_password=False),
        )
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run_postgres(url: str, plan: Plan, corpus: Corpus, log: Callable[[str], None]) -> None:
    with _scratch_database(url) as (sa_url, conninfo):
        cases: list[Case] = [GilasCase(sa_url), PostgresFloor(conninfo)]
        if plan.langchain:
            engine = create_engine(sa_url)
            cases += [LangChainCase(engine), LangChainCase(engine, memoize=True)]
        try:
            _run_backend("postgres", cases, plan, corpus, log)
        finally:
            for case in cases:
                case.close()


# ---------------------------------------------------------------------------------------------
# Report


def _fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"


def _find(results: list[Result], backend: str, case: str, size: int) -> Result:
    for r in results:
        if (r.backend, r.case, r.size) == (backend, case, size):
            return r
    return Result(backend, case, size)  # not run


def _ratio(a: Result, b: Result) -> float | None:
    return a.ms / b.ms if a.ms and b.ms else None


_SHORT = {"gilas": "g", "floor": "f", "floor+writes": "w", "langchain": "l", "langchain-memo": "m"}


def report(plan: Plan) -> tuple[str, bool]:
    """The table and the target checks as text, and whether every target was met."""
    results = plan.results
    backends = list(dict.fromkeys(r.backend for r in results))
    cases = list(dict.fromkeys(r.case for r in results))
    lines = [
        f"Median ms per turn (look the conversation up, append the user message (gilas: with the "
        f"turn lease), build_context with context_limit={CONTEXT_LIMIT}, json.dumps, append the reply);",
        f"{plan.turns} timed turns after {plan.warmup} warm-up "
        f"(langchain at {LANGCHAIN_MAX_SIZE:,}: {plan.langchain_slow_turns} after {LANGCHAIN_SLOW_WARMUP}).",
        "cpu gilas/floor: the same ratio of this process's CPU time (time.process_time), which other",
        "processes' load hardly changes (on Postgres it leaves out the server's work, for both).",
        "",
    ]
    header = [
        "backend",
        "messages",
        *(f"{c} ms" for c in cases),
        "gilas/floor",
        "gilas/floor+writes",
        "cpu gilas/floor",
        *(f"{c} peak KiB" for c in cases),
        "sent " + "/".join(_SHORT.get(c, c) for c in cases),
    ]
    rows = []
    notes = []
    for backend in backends:
        for size in plan.sizes:
            found = [_find(results, backend, c, size) for c in cases]
            gilas = _find(results, backend, "gilas", size)
            floors = ("floor", "floor+writes")
            ratios = [_ratio(gilas, _find(results, backend, floor, size)) for floor in floors]
            floor = _find(results, backend, "floor", size)
            cpu = gilas.cpu_ms / floor.cpu_ms if gilas.cpu_ms and floor.cpu_ms else None
            rows.append(
                [
                    backend,
                    f"{size:,}",
                    *(_fmt_ms(r.ms) for r in found),
                    *(f"{ratio:.2f}x" if ratio else "-" for ratio in ratios),
                    f"{cpu:.2f}x" if cpu else "-",
                    *(f"{r.peak_kib:,.0f}" if r.peak_kib is not None else "-" for r in found),
                    "/".join(str(r.sent) if r.ms else "-" for r in found),
                ]
            )
            notes += [f"{backend} {r.case} at {size:,}: {r.note}" for r in found if r.note]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    for row in [header, ["-" * w for w in widths], *rows]:
        lines.append("  ".join(str(x).rjust(w) for x, w in zip(row, widths, strict=True)).rstrip())
    if notes:
        lines += ["", *notes]

    lines += ["", "Targets:"]
    ok = True

    def check(label: str, value: float | None, target: float, *, at_most: bool) -> None:
        nonlocal ok
        if value is None:
            lines.append(f"  {label}: not measured")
            return
        met = value <= target if at_most else value >= target
        ok &= met
        sign = "<=" if at_most else ">="
        lines.append(f"  {label}: {value:.2f}x (target {sign} {target:g}) {'ok' if met else 'MISSED'}")

    for backend in backends:
        gilas = {
            size: _find(results, backend, "gilas", size) for size in (*plan.sizes, 1_000, 10_000, 100_000)
        }
        check(
            f"{backend} gilas 100,000 / 1,000",
            _ratio(gilas[100_000], gilas[1_000]),
            TARGET_SCALING,
            at_most=True,
        )
        for size in plan.sizes:
            check(
                f"{backend} gilas / floor at {size:,}",
                _ratio(gilas[size], _find(results, backend, "floor", size)),
                TARGET_FLOOR,
                at_most=True,
            )
        if "langchain" in cases:
            check(
                f"{backend} langchain / gilas at 10,000",
                _ratio(_find(results, backend, "langchain", 10_000), gilas[10_000]),
                TARGET_LANGCHAIN,
                at_most=False,
            )
        if "langchain-memo" in cases:
            memo = _ratio(_find(results, backend, "langchain-memo", 10_000), gilas[10_000])
            lines.append(
                f"  {backend} langchain-memo / gilas at 10,000: "
                + (f"{memo:.2f}x (no target)" if memo else "not measured")
            )
    return "\n".join(lines), ok


def _load_average() -> str:
    # Other processes' load is what makes absolute times vary between runs; show it.
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:  # not available on this platform
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--postgres",
        metavar="URL",
        default=None,
        help=f"also run on Postgres (else ${ENV_POSTGRES_URL}); a scratch database is created "
        "next to the one named, and dropped at the end",
    )
    parser.add_argument(
        "--sizes",
        default=",".join(str(s) for s in DEFAULT_SIZES),
        help="stored messages per conversation, comma-separated (default: %(default)s)",
    )
    parser.add_argument(
        "--turns", type=int, default=None, help=f"timed turns per case (default {DEFAULT_TURNS})"
    )
    parser.add_argument("--quick", action="store_true", help="fewer turns, for a run under a minute")
    parser.add_argument("--no-langchain", action="store_true", help="skip the LangChain comparison")
    parser.add_argument("--no-sqlite", action="store_true", help="run on Postgres only")
    parser.add_argument("--check", action="store_true", help="exit with status 1 when a target is missed")
    args = parser.parse_args(argv)

    try:
        sizes = tuple(sorted({int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()}))
    except ValueError:
        parser.error(f"--sizes must be comma-separated integers, not {args.sizes!r}")
    if not sizes or min(sizes) < 2:
        parser.error("every size must be at least 2 (a system message and a reply)")
    turns = args.turns if args.turns is not None else QUICK_TURNS if args.quick else DEFAULT_TURNS
    if turns < 1:
        parser.error("--turns must be at least 1")
    langchain = not args.no_langchain
    if langchain:
        try:
            with warnings.catch_warnings():
                # langchain-community announces its sunset on import; the recipe still works.
                warnings.simplefilter("ignore", DeprecationWarning)
                import langchain_core  # noqa: F401
                from langchain_community.chat_message_histories import sql  # noqa: F401
        except ImportError as err:
            print(
                f"langchain unavailable ({err}); pip install 'gilas-conv[bench]'. Skipping it.",
                file=sys.stderr,
            )
            langchain = False
    plan = Plan(
        turns=turns,
        warmup=QUICK_WARMUP_TURNS if args.quick else WARMUP_TURNS,
        langchain_slow_turns=min(turns, QUICK_LANGCHAIN_SLOW_TURNS if args.quick else LANGCHAIN_SLOW_TURNS),
        langchain=langchain,
        sizes=sizes,
        memory_turns=1 if args.quick else MEMORY_TURNS,
    )
    postgres_url = args.postgres or os.environ.get(ENV_POSTGRES_URL)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if args.no_sqlite and not postgres_url:
        parser.error(f"--no-sqlite needs --postgres URL or ${ENV_POSTGRES_URL}")
    started = time.perf_counter()
    load_before = _load_average()
    corpus = Corpus.make(random.Random(SEED))
    log(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; sizes {', '.join(f'{s:,}' for s in sizes)}")
    if not args.no_sqlite:
        run_sqlite(plan, corpus, log)
    if postgres_url:
        run_postgres(postgres_url, plan, corpus, log)
    else:
        log(f"  postgres: skipped (give --postgres URL or set ${ENV_POSTGRES_URL})")
    text_, ok = report(plan)
    print(text_)
    print(
        f"\n(total run {time.perf_counter() - started:.0f} s on {os.cpu_count()} CPUs; "
        f"1-minute load average {load_before} before, {_load_average()} after)"
    )
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())

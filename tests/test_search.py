"""Full-text search: Persian-aware normalization (pure), the query language (pure), and
store.search on a real SQLite file and a real Postgres, which must find the same messages."""

from __future__ import annotations

import itertools
import sqlite3
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from gilas_conv import ConversationStore, downgrade_database, upgrade_database
from gilas_conv.search import make_snippet, normalize, parse_query, tokenize
from gilas_conv.search._normalize import (
    MAX_INDEXED_BYTES,
    MAX_INDEXED_TOKENS,
    MAX_TOKEN_CHARS,
    _fold_char,
    index_terms,
    index_text,
    words_and_parts,
)
from gilas_conv.store import _search as store_search
from gilas_conv.store._engine import create_engine_for_url

MODEL = "gpt-4o-mini"

# The three spellings of "I want" a Persian writer uses, and the Arabic-letter variant.
WANT_ZWNJ = "می\u200cخواهم"
WANT_JOINED = "میخواهم"
WANT_SPACE = "می خواهم"
WANT_ARABIC_YEH = "مي\u200cخواهم"  # ي U+064A
WANT_SPELLINGS = [WANT_ZWNJ, WANT_JOINED, WANT_SPACE, WANT_ARABIC_YEH]


def words(value: str) -> list[str]:
    return [t.text for t in tokenize(value)]


# ---------------------------------------------------------------------------------------------
# Normalization (pure)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("علي", "علی"),  # Arabic yeh
        ("موسى", "موسی"),  # alef maksura
        ("كتاب", "کتاب"),  # Arabic kaf
        ("كتــــاب", "کتاب"),  # tatweel
        ("كِتَابٌ", "کتاب"),  # harakat
        ("رحمٰن", "رحمن"),  # superscript alef
        ("أحمد إبراهيم آب", "احمد ابراهیم اب"),  # hamza and madda on alef
        ("مؤمن رئیس", "مومن رییس"),
        ("مدرسة", "مدرسه"),  # teh marbuta
        ("خانۀ", "خانه"),  # heh with yeh above
        ("۱۲۳۴۵۶۷۸۹۰", "1234567890"),  # Persian digits
        ("٠١٢٣٤٥٦٧٨٩", "0123456789"),  # Arabic-Indic digits
        ("Tehran CAFÉ", "tehran cafe"),
        ("ﻻ ﯾ", "لا ی"),  # presentation forms (NFKC/NFKD)
        ("\u200fسلام\u200e", "سلام"),  # bidi marks
    ],
)
def test_normalize_folds_spellings(raw: str, expected: str) -> None:
    assert normalize(raw) == expected


@pytest.mark.parametrize("spelling", WANT_SPELLINGS)
def test_every_spelling_of_a_word_has_one_canonical_token(spelling: str) -> None:
    assert words(spelling) == [WANT_JOINED]


def test_zwnj_words_keep_their_parts_with_offsets() -> None:
    text_ = "این کتاب‌ها را"
    (_, books, _) = tokenize(text_)
    assert books.text == "کتابها"
    assert [(p, text_[s:e]) for p, s, e in books.parts] == [("کتاب", "کتاب"), ("ها", "ها")]
    assert text_[books.start : books.end] == "کتاب‌ها"


def test_affixes_join_across_spaces_only_within_a_line() -> None:
    assert words("کتاب ها") == ["کتابها"]
    assert words("نمی خواهم") == ["نمیخواهم"]
    assert words("می\nخواهم") == ["می", "خواهم"]
    assert words("می، خواهم") == ["می", "خواهم"]
    assert words("می test") == ["می", "test"]


def test_indexed_terms_are_bounded() -> None:
    long_word = "x" * (MAX_TOKEN_CHARS + 1)
    assert index_terms(f"a {long_word} b")[0] == ["a", "b"]
    indexed, _ = index_terms("w " * (MAX_INDEXED_TOKENS + 10))
    assert len(indexed) == MAX_INDEXED_TOKENS


_persian = st.text(
    alphabet=st.sampled_from(
        [*"ابپتثجچحخدذرزژسشصضطظعغفقکگلمنوهیيكىةۀأإآؤئء٠١٢۳۴ـًٌٍَُِّْٰ \u200c\u200d.،؛!؟", "\u200f", "A", "é"]
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=40), _persian))
def test_normalize_is_idempotent(value: str) -> None:
    once = normalize(value)
    assert normalize(once) == once


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=40), _persian))
def test_tokens_of_normalized_text_are_the_tokens_of_the_text(value: str) -> None:
    """Normalizing first changes nothing: the index and the query may see either."""
    assert words(normalize(value)) == words(value)
    for token in tokenize(value):
        assert 0 <= token.start < token.end <= len(value)
        assert token.text and all(ch.isalnum() for ch in token.text)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=40), _persian))
def test_the_fast_indexing_path_agrees_with_tokenize(value: str) -> None:
    expected = [(t.text, tuple(p for p, _, _ in t.parts)) for t in tokenize(value)]
    assert words_and_parts(value) == expected


# Words and affixes that join or do not, between spaces, joiners, line breaks and punctuation.
_affixed = st.lists(
    st.sampled_from(
        ["می", "نمی", "ها", "های", "کتاب", "خواهم", "x", "_", " ", "  ", "\n", "\u200c", "\u200d", "،"]
    ),
    max_size=12,
).map("".join)


def _indexed_by_tokenize(value: str) -> tuple[list[str], list[tuple[int, str]]]:
    """The index's terms as the module docstring defines them, from tokenize(): the words in
    order and their parts, within the bounds."""
    indexed: list[str] = []
    parts: list[tuple[int, str]] = []
    budget = MAX_INDEXED_BYTES
    for token in tokenize(value):
        if len(indexed) >= MAX_INDEXED_TOKENS:
            break
        if len(token.text) > MAX_TOKEN_CHARS:
            continue
        pieces = [part for part, _, _ in token.parts]
        budget -= len(token.text.encode()) + sum(len(part.encode()) for part in pieces)
        if budget < 0:
            break
        parts.extend((len(indexed), part) for part in pieces)
        indexed.append(token.text)
    return indexed, parts


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=40), _persian))
def test_normalize_folds_each_character_on_its_own(value: str) -> None:
    assert normalize(value) == "".join(_fold_char(ch) for ch in value)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=60), _persian, _affixed))
# A joiner at the edge of a word, after a space: no affix joins across it (found by this test).
@example("می \u200cؠ")
@example("کتاب\u200c ها")
def test_what_is_indexed_is_what_tokenize_finds(value: str) -> None:
    expected = _indexed_by_tokenize(value)
    assert index_terms(value) == expected
    assert index_text(value) == (" ".join(expected[0]), " ".join(part for _, part in expected[1]))


@pytest.mark.parametrize(
    "value",
    [
        "کتاب‌ها " * 9000,  # over the byte budget before the token limit
        "w " * (MAX_INDEXED_TOKENS + 10),
        "می خواهم " * 5000,
        "ﷺ " * 2000,  # one character that normalizes to 18
        "x" * (MAX_TOKEN_CHARS + 1) + " ‌ a_b",
    ],
)
def test_what_is_indexed_is_bounded_like_tokenize(value: str) -> None:
    expected = _indexed_by_tokenize(value)
    assert index_terms(value) == expected
    assert index_text(value) == (" ".join(expected[0]), " ".join(part for _, part in expected[1]))


# ---------------------------------------------------------------------------------------------
# The query language (pure)


def test_query_terms() -> None:
    query = parse_query('تهر* "می خواهم بروم" «کتاب ها» Python')
    assert [(t.kind, t.words) for t in query.terms] == [
        ("prefix", ("تهر",)),
        ("phrase", ("میخواهم", "بروم")),
        ("word", ("کتابها",)),
        ("word", ("python",)),
    ]


@pytest.mark.parametrize("query", ["", "   ", "*", '""', "«»", "?! ... ،؛", "* * *", '"***"'])
def test_a_query_without_words_is_a_clear_error(query: str) -> None:
    with pytest.raises(ValueError, match="no word to look for"):
        parse_query(query)


def test_engine_syntax_in_a_query_is_only_words() -> None:
    query = parse_query('NEAR(a b) OR x:y AND "unclosed -z ^col')
    assert "NEAR" not in query.fts5() and "near" in query.fts5()
    assert all(ch not in query.tsquery() for ch in "|!")


# ---------------------------------------------------------------------------------------------
# store.search, on both backends


def _conversation(store: ConversationStore, *texts: str, owner: str | None = None, title: str = "t") -> str:
    conv = store.create(model=MODEL, owner=owner, title=title)
    for index, value in enumerate(texts):
        conv.append("user" if index % 2 == 0 else "assistant", value)
    return conv.id


@pytest.mark.parametrize(("stored", "asked"), list(itertools.product(WANT_SPELLINGS, WANT_SPELLINGS)))
def test_every_spelling_finds_every_spelling(store: ConversationStore, stored: str, asked: str) -> None:
    cid = _conversation(store, f"من {stored} به خانه بروم", "باشه")
    hits = store.search(asked)
    assert [(h.conversation_id, h.seq) for h in hits] == [(cid, 1)]
    # The snippet is the original text, the match marked as it was written.
    assert hits[0].snippet == f"من [{stored}] به خانه بروم"


def test_done_means_example(store: ConversationStore) -> None:
    """The issue's example: "میخواهم" finds a message stored as "مي‌خواهم"."""
    cid = _conversation(store, "مي\u200cخواهم")
    assert [h.conversation_id for h in store.search("میخواهم")] == [cid]


def test_what_is_searched(store: ConversationStore) -> None:
    conv = store.create(model=MODEL, system="سیستم zebra", title="همه")
    conv.append(
        "user",
        [
            {"type": "text", "text": "zebra in a part"},
            {"type": "image_url", "image_url": {"url": "https://zebra.example/x.png"}},
        ],
    )
    conv.append(
        "assistant",
        None,
        tool_calls=[
            {"id": "c1", "type": "function", "function": {"name": "zebra", "arguments": '{"q": "zebra"}'}}
        ],
    )
    conv.append("tool", "tool said zebra", tool_call_id="c1")
    conv.append("assistant", "a zebra reply cut off", status="incomplete")
    conv.append("developer", "zebra developer note")
    hits = store.search("zebra")
    assert sorted(h.seq for h in hits) == [2, 4, 5]
    by_seq = {h.seq: h for h in hits}
    assert by_seq[5].incomplete and by_seq[5].status == "incomplete"
    assert not by_seq[2].incomplete
    assert by_seq[2].title == "همه" and by_seq[4].role == "tool"


def test_words_are_anded_phrases_are_ordered_prefixes_extend(store: ConversationStore) -> None:
    a = _conversation(store, "سفر به تهران در بهار")
    b = _conversation(store, "بهار در تهران")
    c = _conversation(store, "تهرانی ها")
    assert {h.conversation_id for h in store.search("تهران بهار")} == {a, b}
    assert {h.conversation_id for h in store.search('"در تهران"')} == {b}
    assert {h.conversation_id for h in store.search('"تهران در"')} == {a}
    assert {h.conversation_id for h in store.search("تهر*")} == {a, b, c}
    assert {h.conversation_id for h in store.search("تهرانی")} == {c}
    assert store.search("تهران پاییز") == []


def test_digits_and_case_match_across_scripts(store: ConversationStore) -> None:
    cid = _conversation(store, "Flight IR۷۱۲ at ١٠:٣٠")
    assert [h.conversation_id for h in store.search("ir712 10")] == [cid]
    assert [h.conversation_id for h in store.search("FLIGHT")] == [cid]


def test_search_is_owner_scoped_and_limited(store: ConversationStore) -> None:
    alice = _conversation(store, "secret alpha", owner="alice")
    bob = _conversation(store, "alpha of bob", owner="bob")
    nobody = _conversation(store, "alpha for nobody")
    assert [h.conversation_id for h in store.search("alpha", owner="alice")] == [alice]
    assert [h.conversation_id for h in store.search("alpha", owner="bob")] == [bob]
    assert [h.conversation_id for h in store.search("alpha")] == [nobody]
    assert store.search("alpha", owner="carol") == []
    assert store.search("alpha", owner="alice", conversation=bob) == []
    many = store.create(model=MODEL)
    for index in range(30):
        many.append("user", f"alpha {index}")
    assert len(store.search("alpha")) == 20
    assert len(store.search("alpha", limit=5)) == 5
    assert {h.conversation_id for h in store.search("alpha", conversation=nobody)} == {nobody}
    with pytest.raises(ValueError):
        store.search("alpha", limit=0)
    with pytest.raises(ValueError, match="no word"):
        store.search("**")


def test_hits_are_best_first(store: ConversationStore) -> None:
    _conversation(store, "a long message that mentions kiwi once among very many other words here")
    best = _conversation(store, "kiwi kiwi kiwi")
    hits = store.search("kiwi")
    assert hits[0].conversation_id == best
    assert hits[0].rank >= hits[1].rank


@pytest.fixture
def small_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bounds on ranking, small enough to cross with a handful of messages."""
    monkeypatch.setattr(store_search, "SEARCH_CANDIDATES", 4)
    monkeypatch.setattr(store_search, "PG_RECENT_WINDOW", 4)
    monkeypatch.setattr(store_search, "PG_FREQUENT_MATCHES", 2)


@pytest.mark.usefixtures("small_bounds")
def test_a_frequent_word_ranks_only_its_newest_matches(store: ConversationStore) -> None:
    """More matches than the bounds: the newest ones are ranked (SQLite: the newest
    SEARCH_CANDIDATES matches; Postgres: the matches among the newest PG_RECENT_WINDOW
    messages, enough of them to call the word frequent), so an old better match is left out
    and both backends give the same hits. (A page no larger than PG_FREQUENT_MATCHES, as the
    default page of 20 is to the real bound of 500.)"""
    best_but_old = _conversation(store, "kiwi kiwi kiwi kiwi")
    newer = [_conversation(store, f"kiwi and other words {n}") for n in range(6)]
    hits = store.search("kiwi", limit=2)
    assert len(hits) == 2 and {h.conversation_id for h in hits} <= set(newer[-4:])
    assert best_but_old not in {h.conversation_id for h in hits}


@pytest.mark.usefixtures("small_bounds")
def test_a_rare_word_in_old_history_is_found_and_ranked(store: ConversationStore) -> None:
    old_best = _conversation(store, "walrus walrus here")
    old = _conversation(store, "a walrus among many other words in this message")
    for n in range(6):
        _conversation(store, f"nothing to see {n}")
    hits = store.search("walrus")
    assert [h.conversation_id for h in hits] == [old_best, old]


@pytest.mark.usefixtures("small_bounds")
def test_few_recent_matches_of_a_frequent_word_are_ranked_with_older_ones(store: ConversationStore) -> None:
    """Postgres: more matches than SEARCH_CANDIDATES but few recent ones: the recent
    matches and those the index finds are ranked together, so the page fills up."""
    old = [_conversation(store, "emu " * (n + 1)) for n in range(6)]
    recent = _conversation(store, "an emu")
    for n in range(3):
        _conversation(store, f"nothing to see {n}")
    found = {h.conversation_id for h in store.search("emu")}
    assert recent in found
    if store.dialect == "postgresql":
        assert len(found) >= 5 and found <= {*old, recent}
    else:
        assert found == {recent, *old[-3:]}


def test_snippet_is_cut_from_the_original_text_around_the_match(store: ConversationStore) -> None:
    before = " ".join(f"w{i}" for i in range(60))
    after = " ".join(f"z{i}" for i in range(60))
    _conversation(store, f"{before} Mي\u200cخواهم\x1b[2J KIWI {after}")
    (hit,) = store.search("kiwi")
    assert hit.snippet.startswith("…") and hit.snippet.endswith("…")
    assert "[KIWI]" in hit.snippet
    assert "\x1b" not in hit.snippet  # no control characters reach a terminal
    assert len(hit.snippet) < 200
    assert ("KIWI", True) in hit.fragments


def test_fork_is_searchable_and_delete_leaves_nothing(store: ConversationStore) -> None:
    conv = store.get(_conversation(store, "quokka one", "quokka two", "quokka three"))
    fork = conv.fork(2)
    assert sorted((h.conversation_id, h.seq) for h in store.search("quokka")) == sorted(
        [(conv.id, 1), (conv.id, 2), (conv.id, 3), (fork.id, 1), (fork.id, 2)]
    )
    store.delete(conv.id)
    assert {h.conversation_id for h in store.search("quokka")} == {fork.id}
    store.delete(fork.id)
    assert store.search("quokka") == []
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM message_search")).scalar() == 0
        if store.dialect == "sqlite":
            # Nothing of the words is left in the FTS5 index either.
            conn.exec_driver_sql(
                "CREATE VIRTUAL TABLE temp.vocab USING fts5vocab(main, message_search_fts, 'row')"
            )
            assert conn.exec_driver_sql("SELECT term FROM temp.vocab WHERE term = 'quokka'").all() == []


def test_delete_leaves_no_word_in_the_fts5_index_bytes(tmp_path: Path) -> None:
    """FTS5 deletes by adding a delete marker (before SQLite 3.44 here, where its
    secure-delete option is not used): the deleted words stay in older segments until
    merged, so delete merges the index, as erasure does."""
    url = f"sqlite:///{tmp_path / 'erased.db'}"
    with ConversationStore(url) as store:
        # Written before the kept messages, so its words sit in segments older than theirs.
        gone = _conversation(store, "quokkasecret", *(f"another quokkasecret{n}" for n in range(20)))
        kept = _conversation(store, *(f"kept words {n}" for n in range(30)))
        untouched = _conversation(store)  # no search rows: nothing to merge
        # Into FTS5 now (fewer rows than a batch would stay pending, never in its segments:
        # tests/test_search_batches.py deletes pending rows).
        with store._write() as conn:
            store_search.index_pending(conn)
        store.delete(untouched)
        store.delete(gone)
        assert {h.conversation_id for h in store.search("kept")} == {kept}
    raw = sqlite3.connect(tmp_path / "erased.db")
    try:
        blocks = [bytes(row[0]) for row in raw.execute("SELECT block FROM message_search_fts_data")]
    finally:
        raw.close()
    assert not any(b"quokkasecret" in block for block in blocks)
    assert b"quokkasecret" not in (tmp_path / "erased.db").read_bytes()
    assert any(b"kept" in block for block in blocks)  # the scan sees what is kept


def test_import_indexes_in_the_same_transaction(store: ConversationStore) -> None:
    (conv,) = store.import_conversations(
        [
            {
                "title": "واردشده",
                "messages": [
                    {"role": "user", "content": "كتاب‌هاي من"},
                    {"role": "assistant", "content": "x"},
                ],
            }
        ]
    )
    hits = store.search("کتابهای")
    assert [(h.conversation_id, h.seq, h.title) for h in hits] == [(conv.id, 1, "واردشده")]
    with pytest.raises(ValueError):
        store.import_conversations(
            [{"messages": [{"role": "user", "content": "walrus"}]}, {"messages": [{"role": "nobody"}]}]
        )
    assert store.search("walrus") == []


def test_same_results_on_both_backends(tmp_path: Path, postgres_server: object) -> None:
    """The same data gives the same set of hits on SQLite and Postgres."""
    if postgres_server is None:
        pytest.skip("needs Postgres")
    corpus = [
        "مي‌خواهم به تهران بروم",
        "کتاب ها را آوردم",
        "The Tehran flight at ۱۰",
        "نمی خواهم",
        "كتاب‌هاي قديمي در تهران",
    ]
    queries = ["میخواهم", "کتاب", "کتابها", "تهران", "تهر*", '"به تهران"', "flight 10", "نمیخواهم", "خواهم"]
    results = []
    for url in (f"sqlite:///{tmp_path / 'same.db'}", postgres_server.shared()):  # type: ignore[attr-defined]
        with ConversationStore(url, auto_upgrade=True) as opened:
            ids = [_conversation(opened, value) for value in corpus]
            results.append(
                {q: sorted(ids.index(h.conversation_id) for h in opened.search(q)) for q in queries}
            )
    assert results[0] == results[1]
    assert results[0]["خواهم"] == [0, 3]  # parts of the ZWNJ and spaced spellings


def test_migration_indexes_existing_messages(empty_db_url: str) -> None:
    """A database with messages from before search gets them indexed by the upgrade."""
    upgrade_database(empty_db_url, "0001")
    engine = create_engine_for_url(empty_db_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO conversations (id, model, title, last_seq, created_at, updated_at)"
                    " VALUES ('c1', 'm', 'old', 2, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                )
            )
            for seq, role, content in ((1, "system", '"پنهان"'), (2, "user", '"سلام دنيا"')):
                conn.execute(
                    text(
                        "INSERT INTO messages"
                        " (conversation_id, seq, role, content, status, pinned, created_at)"
                        " VALUES ('c1', :seq, :role, :content, 'complete', false, CURRENT_TIMESTAMP)"
                    ),
                    {"seq": seq, "role": role, "content": content},
                )
    finally:
        engine.dispose()
    upgrade_database(empty_db_url)
    with ConversationStore(empty_db_url) as store:
        assert [(h.conversation_id, h.seq) for h in store.search("دنیا")] == [("c1", 2)]
        assert store.search("پنهان") == []
    downgrade_database(empty_db_url, "0001")
    upgrade_database(empty_db_url)
    with ConversationStore(empty_db_url) as store:
        assert [h.seq for h in store.search("سلام")] == [2]


def test_sqlite_query_plan_starts_from_the_index(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'plan.db'}"
    with ConversationStore(url) as store:
        _conversation(store, "plan me")
    raw = sqlite3.connect(tmp_path / "plan.db")
    try:
        plan = " ".join(
            row[-1]
            for row in raw.execute(
                "EXPLAIN QUERY PLAN SELECT d.seq FROM message_search_fts JOIN message_search d"
                " ON d.id = message_search_fts.rowid WHERE message_search_fts MATCH '\"plan\"'"
            )
        )
    finally:
        raw.close()
    assert "VIRTUAL TABLE INDEX" in plan and "INTEGER PRIMARY KEY" in plan


def test_make_snippet_without_a_match_shows_the_start() -> None:
    fragments = make_snippet("hello world", parse_query("nothing"))
    assert fragments == (("hello world", False),)


def test_a_page_larger_than_the_frequent_bound_is_full(
    store: ConversationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Postgres answered a frequent word from its recent matches once it had
    # PG_FREQUENT_MATCHES (500) of them, though a page may ask for up to 1,000: the page came
    # back short. Scaled down: frequent bound 2 < limit 4 <= candidates 4.
    monkeypatch.setattr(store_search, "SEARCH_CANDIDATES", 4)
    monkeypatch.setattr(store_search, "PG_RECENT_WINDOW", 4)
    monkeypatch.setattr(store_search, "PG_FREQUENT_MATCHES", 2)
    older = [_conversation(store, f"emu number {n}") for n in range(3)]
    recent = [_conversation(store, f"emu again {n}") for n in range(2)]
    for n in range(2):
        _conversation(store, f"nothing to see {n}")
    hits = store.search("emu", limit=4)
    # Five messages match, all ranked alike: any four of them make the page.
    assert len(hits) == 4, [h.conversation_id for h in hits]
    assert {h.conversation_id for h in hits} <= {*older, *recent}

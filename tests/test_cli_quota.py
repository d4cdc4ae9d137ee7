"""The operator's commands: usage, quota set/show/rm, prune and rm --owner X --all, and the
exit status 3 of a call refused by a quota. In-process, against the stub server, on SQLite
and Postgres."""

from __future__ import annotations

import json

import pytest
from stub_server import StubServer
from test_cli import API_KEY, CLI, error_line, new_conversation  # noqa: F401 (the stub's key)

from gilas_conv import ConversationStore
from gilas_conv.cli import EXIT_QUOTA


@pytest.fixture
def cli(db_url: str, stub: StubServer) -> CLI:
    return CLI(db_url, stub)


def test_a_call_over_the_quota_exits_3_and_stores_nothing(cli: CLI) -> None:
    cli("quota", "set", "alice", "--daily-tokens", "60", "--timezone", "Asia/Tehran")
    cid = new_conversation(cli, "--owner", "alice", "--max-tokens", "5", "hi")
    used = json.loads(cli("quota", "show", "alice", "--json").stdout)[0]["used"]
    assert used > 0
    result = cli("send", "--owner", "alice", "--cid", cid, "--max-tokens", "50", "more", code=EXIT_QUOTA)
    assert EXIT_QUOTA == 3
    assert "daily quota of owner 'alice' reached" in error_line(result)
    with ConversationStore(cli.url) as store:
        assert store.get(cid, owner="alice").message_count == 2
    shown = cli("quota", "show").stdout
    assert "alice" in shown and "Asia/Tehran" in shown


def test_usage_reports_json_rows(cli: CLI) -> None:
    new_conversation(cli, "--owner", "bob", "hello")
    new_conversation(cli, "--owner", "carol", "hello there")
    rows = json.loads(cli("usage", "--by", "owner", "--json").stdout)
    assert sorted(r["owner"] for r in rows) == ["bob", "carol"]
    for row in rows:
        assert row["requests"] == 1 and row["cost"] is None
        assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"] > 0
    [only] = json.loads(cli("usage", "--owner", "bob", "--by", "month", "--json").stdout)
    assert set(only) >= {"month", "requests", "prompt_tokens", "completion_tokens", "total_tokens", "cost"}
    assert "bob" in cli("usage", "--by", "owner").stdout
    error_line(cli("usage", "--since", "yesterday", code=2))


def test_quota_commands_refuse_bad_input(cli: CLI) -> None:
    cli("quota", "set", "--default", "--monthly-tokens", "1000")
    assert "(default)" in cli("quota", "show").stdout
    assert "unknown time zone" in error_line(cli("quota", "set", "--timezone", "Mars/Base", code=1))
    cli("quota", "set", "dave", code=2)
    cli("quota", "rm", "--default")
    assert "has no limits" in error_line(cli("quota", "rm", "dave", code=1))


def test_prune_and_erase_print_what_they_deleted(cli: CLI) -> None:
    new_conversation(cli, "--owner", "erin", "first")
    new_conversation(cli, "--owner", "erin", "second")
    keep = new_conversation(cli, "--owner", "frank", "kept")
    assert "would delete 0 conversations" in cli("prune", "--inactive-for", "90d", "--dry-run").stderr
    error_line(cli("prune", "--inactive-for", "ninety", code=2))
    error_line(cli("rm", "--all", code=2))  # --all needs --owner
    declined = cli("rm", "--owner", "erin", "--all", input="n\n", code=1)
    assert "2 conversations, 4 messages" in declined.stderr
    done = cli("rm", "--owner", "erin", "--all", "--yes")
    assert "deleted 2 conversations and 4 messages" in done.stderr
    with ConversationStore(cli.url) as store:
        assert store.count(owner="erin") == 0
        assert store.get(keep, owner="frank").message_count == 2
        assert {r.key for r in store.usage(by="owner")} == {"erin", "frank"}

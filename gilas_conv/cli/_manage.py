"""The commands that read and change stored conversations without asking the API:
``list``, ``show``, ``export``, ``import``, ``fork``, ``rm`` (and ``rm --owner X --all``),
``pin``, ``rename``, ``tokens`` and ``db upgrade``."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import click

from .. import portable
from .._config import DEFAULT_MODEL, redact_url
from ..portable import parse_import
from ..store import Conversation, upgrade_database
from ..truncation import DEFAULT_REPLY_RESERVE, build_context, conversation_tokens
from ._app import (
    Settings,
    conversation_options,
    dumps,
    fail,
    local_time,
    main,
    owner_options,
    pass_settings,
    pick_conversation,
    plural,
    store_options,
    title_from,
)
from ._quota import confirm_deletion, report_deletion
from ._render import Output, content_text, terminal_json, visible

__all__ = ["DRIFT_ROWS", "parse_import", "token_lines", "token_report"]

# `tokens` lists the drift of this many most recent replies (all of them with --json).
DRIFT_ROWS = 10
# `list` shows this many conversations unless --limit says otherwise.
LIST_LIMIT = 20


# ---------------------------------------------------------------------------------------------
# list, show, export


@main.command("list")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=LIST_LIMIT,
    show_default=True,
    metavar="N",
    help="Show at most N.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@owner_options
@pass_settings
def list_(settings: Settings, limit: int, as_json: bool) -> None:
    """List conversations, most recently active first."""
    conversations = settings.store().list(limit=limit, owner=settings.owner)
    output = Output()
    if as_json:
        output.json(dumps([_summary_json(conv) for conv in conversations], pretty=True))
        return
    if not conversations:
        output.note("No conversations yet: start one with `gilas-conv chat` or `gilas-conv send TEXT`.")
        return
    rows = [
        [conv.id, local_time(conv.updated_at), str(conv.message_count), conv.model, describe(conv)]
        for conv in conversations
    ]
    output.table(["id", "updated", "messages", "model", "title"], rows)


def describe(conv: Conversation) -> str:
    """The title, else the start of the first user message."""
    if conv.title:
        return conv.title
    for message in conv.messages(limit=5):
        if message.role == "user":
            return title_from(content_text(message.content)) or ""
    return ""


def _summary_json(conv: Conversation) -> dict[str, Any]:
    return {
        "id": conv.id,
        "title": conv.title,
        "model": conv.model,
        "created_at": conv.created_at.isoformat(),
        "updated_at": conv.updated_at.isoformat(),
        "message_count": conv.message_count,
        "forked_from": conv.forked_from,
    }


@main.command()
@click.argument("conversation_id", metavar="[ID]", required=False)
@conversation_options
@click.option("--json", "as_json", is_flag=True, help="Print it in the export format.")
@owner_options
@pass_settings
def show(
    settings: Settings, conversation_id: str | None, continue_latest: bool, cid: str | None, as_json: bool
) -> None:
    """Show a conversation, message by message.

    The conversation is ID, --cid ID, or -c for the most recent one. On a terminal replies
    are rendered as Markdown; piped, each message's text is printed exactly as stored, under
    a "[SEQ] ROLE" line.
    """
    conv = pick_conversation(settings, positional=conversation_id, cid=cid, continue_latest=continue_latest)
    assert conv is not None
    output = Output()
    if as_json:
        output.json(dumps(conv.export(), pretty=True))
        return
    _print_header(output, conv)
    for message in conv.iter_messages():
        output.message(message)


def _print_header(output: Output, conv: Conversation) -> None:
    output.line(f"conversation {conv.id}", style="bold")
    if conv.title:
        output.line(f"title: {conv.title}")
    output.line(f"model: {conv.model}; {conv.message_count} messages; started {local_time(conv.created_at)}")
    if conv.forked_from:
        output.line(f"forked from {conv.forked_from} at message {conv.forked_at}")
    output.line()


@main.command()
@click.argument("conversation_id", metavar="[ID]", required=False)
@conversation_options
@click.option(
    "--all", "export_all", is_flag=True, help="Every conversation (JSON Lines unless --format says)."
)
@click.option(
    "--format",
    "out_format",
    type=click.Choice(["json", "jsonl", "markdown"]),
    help="json (indented; the default for one conversation), jsonl (one line per conversation; "
    "the default for --all) or markdown (a readable document).",
)
@owner_options
@pass_settings
def export(
    settings: Settings,
    conversation_id: str | None,
    continue_latest: bool,
    cid: str | None,
    export_all: bool,
    out_format: str | None,
) -> None:
    """Print a conversation as JSON or Markdown, or all of them.

    The conversation is ID, --cid ID, or -c for the most recent one; --all prints every
    conversation, one per line. The format: {"id", "title", "model", "created_at", "updated_at", "metadata",
    "messages": [{"role", "content", "name"?, "tool_calls"?, "tool_call_id"?,
    "created_at", "status", "usage"?, "finish_reason"?, ...}]}. `gilas-conv import` reads it.
    --format markdown gives a document: title, model, each message under its role and time.
    """
    named = bool(conversation_id or cid or continue_latest)
    if export_all == named:
        raise click.UsageError("give a conversation (ID, --cid ID or -c) or --all (not both)")
    out_format = out_format or ("jsonl" if export_all else "json")
    if export_all and out_format == "json":
        raise click.UsageError("--all prints jsonl or markdown")
    output = Output()
    if named:
        conv = pick_conversation(
            settings, positional=conversation_id, cid=cid, continue_latest=continue_latest
        )
        assert conv is not None
        if out_format == "markdown":
            document = portable.to_markdown(conv.export())
            output.write_exact(visible(document) if output.rich else document)
        else:
            output.json(dumps(conv.export(), pretty=out_format == "json"))
        return
    store = settings.store()
    total = store.count(owner=settings.owner)
    conversations = store.list(limit=total, owner=settings.owner) if total else []
    stdout = sys.stdout
    rich = output.rich
    with output.progress("exporting", len(conversations)) as advance:
        for index, conv in enumerate(conversations):
            if out_format == "markdown":
                document = portable.to_markdown(conv.export())
                stdout.write(("\n" if index else "") + (visible(document) if rich else document))
            else:
                line = dumps(conv.export())
                stdout.write((terminal_json(line) if rich else line) + "\n")
            advance()
    stdout.flush()


# ---------------------------------------------------------------------------------------------
# import


@main.command("import")
@click.argument("file", type=click.File("rb"))
@click.option(
    "-m",
    "--model",
    help=f"Store the conversations under this model (default: the file's, else {DEFAULT_MODEL}).",
)
@click.option(
    "--format",
    "file_format",
    type=click.Choice(["chatgpt", "openai-items", "gilas"]),
    help="Read FILE as this format (default: recognized by its content).",
)
@owner_options
@pass_settings
def import_(settings: Settings, file: Any, model: str | None, file_format: str | None) -> None:
    """Import conversations from a file and print their new ids, one a line.

    FILE (- reads stdin) holds one conversation in the export format, JSON Lines of them
    (`export --all`), a plain OpenAI messages array, a ChatGPT data export
    (conversations.json, or the ZIP ChatGPT sends: the branch last seen of each
    conversation; images, files and tool output kept as placeholders; hidden messages
    skipped and reported), or OpenAI conversation items (the JSON of
    `client.conversations.items.list`, listed oldest first). Every conversation is checked
    before any is stored: a bad file is refused whole, naming the line, conversation or
    item and the reason. Importing a file twice makes new conversations each time. With
    --owner they belong to that owner.
    """
    try:
        found, converted = portable.load(file.read(), format=file_format or "auto")
    except ValueError as err:
        raise ValueError(f"{err}; nothing was imported") from None
    output = Output()
    store = settings.store()
    # Every conversation is checked before the one transaction that stores them all.
    with output.progress("importing", len(converted.conversations)) as advance:
        try:
            imported = store.import_conversations(
                converted.conversations,
                model=model,
                owner=settings.owner,
                labels=converted.labels,
                progress=advance,
            )
        except ValueError as err:
            raise ValueError(f"{err}; nothing was imported") from err
    for conv in imported:
        click.echo(conv.id)
    for where, reason in converted.skipped:
        output.note(f"skipped {where}: {reason}")
    output.note(
        f"imported {plural(len(imported), 'conversation', 'conversations')} ({found} format)"
        + (f"; skipped {len(converted.skipped)} item(s), listed above" if converted.skipped else "")
    )


# ---------------------------------------------------------------------------------------------
# fork, rm, pin, rename


@main.command()
@click.argument("conversation_id", metavar="[ID]", required=False)
@conversation_options
@click.option("--at", type=click.IntRange(min=0), metavar="SEQ", help="Copy messages 1..SEQ (default: all).")
@click.option("--title", help="Title of the copy (default: the original's).")
@owner_options
@pass_settings
def fork(
    settings: Settings,
    conversation_id: str | None,
    continue_latest: bool,
    cid: str | None,
    at: int | None,
    title: str | None,
) -> None:
    """Copy a conversation into a new one and print its id.

    The conversation is ID, --cid ID, or -c for the most recent one. With --at SEQ only
    messages 1..SEQ are copied. The copy can then go its own way (`gilas-conv chat NEW_ID`);
    the original is untouched.
    """
    conv = pick_conversation(settings, positional=conversation_id, cid=cid, continue_latest=continue_latest)
    assert conv is not None
    click.echo(conv.fork(at, title=title).id)


@main.command()
@click.argument("conversation_ids", metavar="[ID...]", nargs=-1)
@click.option("--all", "erase_all", is_flag=True, help="Every conversation of --owner (an erasure request).")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@owner_options
@pass_settings
def rm(settings: Settings, conversation_ids: tuple[str, ...], erase_all: bool, yes: bool) -> None:
    """Delete conversations and all their messages.

    Asks first, unless --yes; if any ID is unknown, nothing is deleted. `rm --owner X --all`
    erases every conversation of owner X (messages, summaries, and on SQLite the text in
    the file too; the usage ledger keeps the spending) and prints what it deleted.
    """
    store = settings.store()
    if erase_all:
        if conversation_ids:
            raise click.UsageError("give IDs or --all, not both")
        if settings.owner is None:
            raise click.UsageError("--all needs --owner NAME (whose conversations to erase)")
        found = store.erase_owner(settings.owner, dry_run=True)
        if found.conversations and not yes:
            confirm_deletion(found, f"everything of owner {settings.owner!r}")
        report_deletion(store.erase_owner(settings.owner), dry_run=False)
        return
    if not conversation_ids:
        raise click.UsageError("give the IDs to delete, or --owner NAME --all")
    conversations = [settings.get(cid) for cid in conversation_ids]  # all exist, or nothing is deleted
    if not yes:
        output = Output(out=sys.stderr)
        for conv in conversations:
            output.line(f"{conv.id}  {conv.message_count} messages  {describe(conv)}")
        count = len(conversations)
        question = "Delete this conversation?" if count == 1 else f"Delete these {count} conversations?"
        try:
            confirmed = click.confirm(question, default=False, err=True)
        except click.Abort:  # end of input: no answer is a no
            confirmed = False
        if not sys.stdin.isatty():
            click.echo(err=True)  # the answer read from a pipe was not echoed
        if not confirmed:
            fail("nothing was deleted (pass --yes to delete without asking)")
    messages = 0
    for conv in conversations:
        store.delete(conv.id, owner=settings.owner)
        messages += conv.message_count
    Output().note(
        f"deleted {plural(len(conversations), 'conversation', 'conversations')} and "
        f"{plural(messages, 'message', 'messages')}"
    )


@main.command()
@click.argument("conversation_id", metavar="ID")
@click.argument("seqs", metavar="SEQ...", nargs=-1, required=True, type=click.IntRange(min=1))
@click.option("--unpin", is_flag=True, help="Unpin the messages instead.")
@owner_options
@pass_settings
def pin(settings: Settings, conversation_id: str, seqs: tuple[int, ...], unpin: bool) -> None:
    """Pin messages, so every later turn sends them.

    A pinned message is sent however long the conversation grows. SEQ is a message's number,
    as `gilas-conv show` lists it; --unpin takes the pin off. A pinned message is marked
    "pinned" in `show`.
    """
    conv = settings.get(conversation_id)
    for seq in seqs:
        conv.message(seq)  # every SEQ exists, or nothing changes
    for seq in seqs:
        conv.pin(seq, not unpin)
    done = "unpinned" if unpin else "pinned"
    Output().note(f"{done} {plural(len(seqs), 'message', 'messages')} of {conv.id}")


@main.command()
@click.argument("conversation_id", metavar="ID")
@click.argument("title", nargs=-1, required=True)
@owner_options
@pass_settings
def rename(settings: Settings, conversation_id: str, title: tuple[str, ...]) -> None:
    """Give a conversation a new title.

    Several words are joined with spaces. The title is what `gilas-conv list` shows; a
    conversation started here is titled after its first message until renamed.
    """
    text = " ".join(title).strip()
    if not text:
        raise click.UsageError("TITLE is empty")
    settings.get(conversation_id).update(title=text)


# ---------------------------------------------------------------------------------------------
# tokens


def token_report(
    conv: Conversation,
    *,
    model: str | None = None,
    context_limit: int | None = None,
    max_tokens: int | None = None,
) -> dict[str, Any]:
    """The numbers `tokens` prints: the whole history, the window the next request would
    send, and how far our predicted prompt tokens were from those the API reported."""
    model = model or conv.model
    context = build_context(conv, model=model, context_limit=context_limit, max_tokens=max_tokens)
    drift = []
    for message in conv.iter_messages():
        reported = (message.usage or {}).get("prompt_tokens")
        if message.predicted_prompt_tokens is None or not isinstance(reported, int):
            continue
        drift.append(
            {
                "seq": message.seq,
                "predicted": message.predicted_prompt_tokens,
                "reported": reported,
                "error": reported - message.predicted_prompt_tokens,
            }
        )
    errors = [abs(row["error"]) for row in drift]
    return {
        "conversation_id": conv.id,
        "model": context.model,
        "encoding": context.encoding,
        "messages": conv.message_count,
        "history_tokens": conversation_tokens(conv, model=model),
        "window": {
            "context_limit": context.context_limit,
            "reserved_for_reply": context.reserved,
            "tools_tokens": context.tools_tokens,
            "available": context.available,
            "prompt_tokens": context.prompt_tokens,
            "free": context.free,
            "kept": len(context.seqs),
            "dropped": context.dropped,
        },
        "drift": {
            "replies": len(drift),
            "mean_abs_error": sum(errors) / len(errors) if errors else None,
            "max_abs_error": max(errors) if errors else None,
            "per_reply": drift,
        },
    }


def token_lines(report: dict[str, Any], *, drift_rows: int | None = DRIFT_ROWS) -> Iterator[str]:
    window, drift = report["window"], report["drift"]
    yield f"model {report['model']} ({report['encoding']}), {report['messages']} messages"
    yield f"full history      {report['history_tokens']:>9,} tokens"
    yield (
        f"next request      {window['prompt_tokens']:>9,} prompt tokens: {window['kept']} messages kept, "
        f"{window['dropped']} dropped"
    )
    yield (
        f"window            {window['context_limit']:>9,} = {window['available']:,} for the prompt"
        f" + {window['reserved_for_reply']:,} reserved for the reply"
        + (f" + {window['tools_tokens']:,} for tools" if window["tools_tokens"] else "")
        + " + priming"
    )
    if not drift["replies"]:
        yield "drift             no reply with both a predicted and a reported prompt count yet"
        return
    yield (
        f"drift             {plural(drift['replies'], 'reply', 'replies')}: mean |reported - predicted| "
        f"{drift['mean_abs_error']:.1f}, max {drift['max_abs_error']}"
    )
    rows = drift["per_reply"]
    if drift_rows == 0:
        return
    if drift_rows is not None and len(rows) > drift_rows:
        yield f"  (the last {drift_rows}; --json lists all {len(rows)})"
        rows = rows[-drift_rows:]
    yield "  seq  predicted  reported  error"
    for row in rows:
        yield f"  {row['seq']:>3}  {row['predicted']:>9}  {row['reported']:>8}  {row['error']:>+5}"


@main.command()
@click.argument("conversation_id", metavar="[ID]", required=False)
@conversation_options
@click.option("-m", "--model", help="Count for this model (default: the conversation's); nothing is changed.")
@click.option(
    "--context-limit",
    type=click.IntRange(min=1),
    metavar="N",
    help="The window to fit (default: the model's).",
)
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    metavar="N",
    help=f"Tokens reserved for the reply (default: {DEFAULT_REPLY_RESERVE}).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@owner_options
@pass_settings
def tokens(
    settings: Settings,
    conversation_id: str | None,
    continue_latest: bool,
    cid: str | None,
    model: str | None,
    context_limit: int | None,
    max_tokens: int | None,
    as_json: bool,
) -> None:
    """Show the token budget of a conversation.

    The conversation is ID, --cid ID, or -c for the most recent one. The full history's
    tokens; the window the next request would send (prompt tokens, the room reserved for the
    reply, messages kept and dropped); and the drift between the prompt tokens predicted
    before each past reply and those the API reported.
    """
    conv = pick_conversation(settings, positional=conversation_id, cid=cid, continue_latest=continue_latest)
    assert conv is not None
    report = token_report(conv, model=model, context_limit=context_limit, max_tokens=max_tokens)
    output = Output()
    if as_json:
        output.json(dumps(report, pretty=True))
        return
    for line in token_lines(report):
        output.line(line)


# ---------------------------------------------------------------------------------------------
# db


@main.group()
def db() -> None:
    """Manage the database schema."""


@db.command()
@store_options
@pass_settings
def upgrade(settings: Settings) -> None:
    """Create or upgrade the database schema (safe to repeat).

    Needed once for Postgres, and after upgrading gilas-conv; SQLite files are upgraded
    automatically.
    """
    url = settings.database_url()
    revision = upgrade_database(url)
    click.echo(f"{redact_url(url)}: schema at revision {revision} (up to date)")

"""``gilas-conv search``: find messages by what they said (see :mod:`gilas_conv.search`)."""

from __future__ import annotations

import json
import shlex
import unicodedata

import click
from rich.text import Text

from ._render import Output
from .search import SearchHit

__all__ = ["print_hits", "search"]

DEFAULT_LIMIT = 20
MAX_LIMIT = 1000


def _safe(text: str) -> str:
    """A title on one line, control characters shown as nothing (a title came from outside)."""
    return "".join(
        " " if ch.isspace() else ch
        for ch in text
        if not unicodedata.category(ch).startswith("C") or ch in "\u200c\u200d"
    )


def resume_command(hit: SearchHit, owner: str | None) -> str:
    owner_flag = f" --owner {shlex.quote(owner)}" if owner is not None else ""
    return f"gilas-conv chat{owner_flag} {hit.conversation_id}"


def print_hits(output: Output, hits: list[SearchHit], *, owner: str | None) -> None:
    """Each hit as three lines: where it is, the snippet with the matches highlighted (on a
    terminal; in [brackets] when piped), and the command that resumes its conversation."""
    for hit in hits:
        where = f"{hit.conversation_id}  #{hit.seq} {hit.role}"
        if hit.incomplete:
            where += " (incomplete)"
        if hit.title:
            where += f"  {_safe(hit.title)}"
        output.line(where, style="bold")
        if output.rich:
            snippet = Text("  ")
            for fragment, matched in hit.fragments:
                snippet.append(fragment, style="bold yellow" if matched else None)
            output.console.print(snippet, soft_wrap=True)
        else:
            output.line(f"  {hit.snippet}")
        output.line(f"  {resume_command(hit, owner)}", style="dim")


@click.command("search")
@click.argument("query", nargs=-1, required=True)
@click.option("--owner", metavar="NAME", help="Search this owner's conversations (default: no owner).")
@click.option(
    "-n",
    "--limit",
    type=click.IntRange(1, MAX_LIMIT),
    default=DEFAULT_LIMIT,
    show_default=True,
    help="Show at most this many messages.",
)
@click.option(
    "--cid", "--conversation", "conversation_id", metavar="ID", help="Search only this conversation."
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of hits.")
@click.pass_context
def search(
    ctx: click.Context,
    query: tuple[str, ...],
    owner: str | None,
    limit: int,
    conversation_id: str | None,
    as_json: bool,
) -> None:
    """Find messages by their words, best match first, and say how to resume each.

    All words must occur; "a phrase" must occur as written; a word ending in * matches its
    beginning (تهر* finds تهران). Persian and Arabic spellings match each other: ي and ی,
    ك and ک, with or without diacritics or tatweel, and می‌خواهم, میخواهم and می خواهم are
    one word; Persian digits match ASCII ones. System prompts and tool-call arguments are
    not searched. --json prints objects with conversation_id, title, seq, role, status,
    created_at, rank and snippet (matches in [brackets]).
    """
    from .cli import _settings  # the command group's settings (the module imports this one)

    store = _settings(ctx).store()
    hits = store.search(" ".join(query), owner=owner, limit=limit, conversation=conversation_id)
    if as_json:
        click.echo(json.dumps([hit.to_json() for hit in hits], ensure_ascii=False, indent=2))
        return
    output = Output()
    if not hits:
        output.note("no message matches")
        return
    print_hits(output, hits, owner=owner)

"""The layout shows the architecture, and stays that way (issue 10): checks of the source.

Read with :mod:`ast` from the files, never by importing them, so a check sees every import
whatever runs.

1. **No import cycles** between gilas_conv's modules. An edge is any import that runs: at
   module level, and inside a function (an import deferred into a function to dodge a
   cycle is still a cycle: the two modules cannot be understood or tested apart). Imports
   under ``if TYPE_CHECKING:`` never run, so they cannot break an import; they still count
   unless both ends are in the same package (a private module of a package may name, for
   its annotations, the class of that package that uses it). ``from pkg import name`` is an
   edge to ``pkg.name`` when that is a module, else to ``pkg`` (its ``__init__``). The
   implicit import of a parent package is not an edge (every module would depend on the
   front door). And no module imports the package's front door, ``gilas_conv``
   itself: it only re-exports, for users.
2. **The store's insides are its own.** Outside ``gilas_conv/store/`` no module imports
   SQLAlchemy, imports one of the store's private modules (``store._x``), or uses a private
   attribute of a store (``store._x``, ``self._store._x``), except the names in
   :data:`STORE_PRIVATE_ALLOWED`, each with its reason.
3. **SQL only in the store**: the issue's grep, ``grep -rn "select(\\|insert(\\|update(\\|
   delete(\\|text(" gilas_conv``, finds outside the store only calls that are not SQL, each
   explained: part of a longer name (``content_text(``), a function the module defines
   itself, or a method call listed in :data:`NOT_SQL` with its reason. No string outside
   the store spells a SQL statement either.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "gilas_conv"
STORE = PACKAGE / "store"


# ---------------------------------------------------------------------------------------------
# Reading the source


@dataclass(frozen=True)
class Module:
    name: str  # gilas_conv.store._store
    path: Path
    is_package: bool
    tree: ast.Module

    @property
    def package(self) -> str:
        return self.name if self.is_package else self.name.rpartition(".")[0]

    @property
    def relative(self) -> str:
        return self.path.relative_to(PACKAGE.parent).as_posix()


def _modules() -> dict[str, Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        name = ".".join(parts)
        found[name] = Module(name, path, is_package, ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return found


MODULES = _modules()


@dataclass(frozen=True)
class Import:
    source: str
    target: str
    line: int
    type_only: bool


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(
    node: ast.AST, type_only: bool = False
) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import under ``node``, at any depth, and whether it is under TYPE_CHECKING."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, type_only
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for inner in child.body:
                if isinstance(inner, ast.Import | ast.ImportFrom):
                    yield inner, True
                else:
                    yield from _import_nodes(inner, True)
            for inner in child.orelse:
                yield from _import_nodes(inner, type_only)
        else:
            yield from _import_nodes(child, type_only)


def _targets(module: Module, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules ``node`` imports (absolute names; outside gilas_conv too)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = module.package.split(".")
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names]


def imports() -> list[Import]:
    out = []
    for module in MODULES.values():
        for node, type_only in _import_nodes(module.tree):
            for target in _targets(module, node):
                out.append(Import(module.name, target, node.lineno, type_only))
    return out


IMPORTS = imports()


# ---------------------------------------------------------------------------------------------
# 1. No cycles


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _same_package(a: str, b: str) -> bool:
    return MODULES[a].package == MODULES[b].package


def _graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {name: set() for name in MODULES}
    for found in IMPORTS:
        if found.target not in MODULES or found.target == found.source:
            continue
        if found.type_only and _same_package(found.source, found.target):
            continue
        edges[found.source].add(found.target)
    return edges


def test_the_import_graph_has_no_cycles() -> None:
    edges = _graph()
    described = []
    for cycle in _cycles(edges):
        members = set(cycle)
        lines = sorted(
            {
                f"  {f.source} -> {f.target} (line {f.line}{', TYPE_CHECKING' if f.type_only else ''})"
                for f in IMPORTS
                if f.source in members and f.target in members and f.target in edges[f.source]
            }
        )
        described.append("cycle among " + ", ".join(cycle) + ":\n" + "\n".join(lines))
    assert not described, "import cycles:\n" + "\n".join(described)


def test_no_module_imports_the_front_door() -> None:
    found = [f"{f.source} (line {f.line})" for f in IMPORTS if f.target == "gilas_conv"]
    assert not found, f"these import gilas_conv/__init__.py; import the module that defines the name: {found}"


def test_the_cycle_check_sees_cycles() -> None:
    # The check itself: a deferred import closing a loop is found, a type-only one inside a
    # package is not.
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    source = "import os\ndef f():\n    from . import b\nif TYPE_CHECKING:\n    from .c import C\n"
    found = [(node.lineno, type_only) for node, type_only in _import_nodes(ast.parse(source))]
    assert found == [(1, False), (3, False), (5, True)]


# ---------------------------------------------------------------------------------------------
# 2. The store's insides


# Private store names other modules may use, with the reason.
STORE_PRIVATE_ALLOWED = {
    ("gilas_conv/_sender/_base.py", "_take_turn"): "the turn lease API, documented in store/_store.py "
    "for the senders: it takes the lease, the owner's quota and stores the turn's messages in one "
    "transaction (_begin_turn without the quota)",
    ("gilas_conv/_sender/_base.py", "_grow_reservation"): "the turn's quota: a window larger than "
    "the one reserved for grows the reservation, checked against the limits",
    ("gilas_conv/_sender/_base.py", "_end_turn"): "the turn lease API: releases the lease of a failed turn",
    ("gilas_conv/_sender/_base.py", "_renew_turn"): "the turn lease API: a long stream extends its lease",
    ("gilas_conv/server/_app.py", "_begin_turn"): "the turn lease API, for the gateway's item edits: "
    "appended items and deletions take the lease, so they never land inside a turn (409 while one runs)",
    ("gilas_conv/server/_app.py", "_end_turn"): "the turn lease API: an item edit releases the lease at once",
    ("gilas_conv/server/_app.py", "_with_last_messages"): "a completion's checks: the conversation "
    "for the key's owner and its last messages, in one statement",
}


def _outside_store() -> list[Module]:
    return [m for m in MODULES.values() if not m.path.is_relative_to(STORE)]


def _names_a_store(node: ast.expr) -> bool:
    """Whether ``node`` reads as a store: ``store``, ``self._store``, ``settings.store``."""
    if isinstance(node, ast.Name):
        return node.id in ("store", "_store")
    if isinstance(node, ast.Attribute):
        return node.attr in ("store", "_store")
    if isinstance(node, ast.Call):  # settings.store()
        return _names_a_store(node.func)
    return False


def test_only_the_store_imports_sqlalchemy_or_its_private_modules() -> None:
    outside = {m.name for m in _outside_store()}
    found = []
    for f in IMPORTS:
        if f.source not in outside:
            continue
        if f.target.split(".")[0] == "sqlalchemy":
            found.append(f"{f.source} (line {f.line}) imports {f.target}")
        parts = f.target.split(".")
        if f.target.startswith("gilas_conv.store.") and any(p.startswith("_") for p in parts[2:]):
            found.append(f"{f.source} (line {f.line}) imports the store's private {f.target}")
    assert not found, "\n".join(found)


def test_no_module_outside_the_store_uses_a_stores_private_attributes() -> None:
    found = []
    used = set()
    for module in _outside_store():
        for node in ast.walk(module.tree):
            if (
                not isinstance(node, ast.Attribute)
                or not node.attr.startswith("_")
                or node.attr.startswith("__")
            ):
                continue
            if not _names_a_store(node.value):
                continue
            key = (module.relative, node.attr)
            if key in STORE_PRIVATE_ALLOWED:
                used.add(key)
                continue
            found.append(f"{module.relative}:{node.lineno} {ast.unparse(node)}")
    assert not found, "private store names used outside the store:\n" + "\n".join(found)
    assert used == set(STORE_PRIVATE_ALLOWED), (
        f"allowed but no longer used: {set(STORE_PRIVATE_ALLOWED) - used}"
    )


# ---------------------------------------------------------------------------------------------
# 3. SQL only in the store


ISSUE_GREP = re.compile(r"select\(|insert\(|update\(|delete\(|text\(")
# Method calls the grep finds outside the store that are not SQL: (file, the call before
# its parenthesis) -> why.
NOT_SQL = {
    ("gilas_conv/_api.py", "body.update"): "a dict: the request body",
    ("gilas_conv/truncation.py", "messages.insert"): "a list: the summary put into the context",
    ("gilas_conv/search/_snippet.py", "fragments.insert"): "a list: a snippet's fragments",
    ("gilas_conv/cli/_chat.py", "self.conv.update"): "Conversation.update, the store's public API",
    ("gilas_conv/cli/_turns.py", "conv.update"): "Conversation.update, the store's public API",
    ("gilas_conv/cli/_manage.py", "store.delete"): "ConversationStore.delete, the store's public API",
    ("gilas_conv/cli/_manage.py", "settings.get(conversation_id).update"): "Conversation.update",
    ("gilas_conv/cli/_render.py", "self._live.update"): "rich's Live display",
    ("gilas_conv/server/_app.py", "conv.update"): "Conversation.update, the store's public API",
}
# A string spelling a SQL statement (upper case, as SQL is written; prose is not).
SQL_STRING = re.compile(r"\b(SELECT\s.*\bFROM\b|INSERT\s+INTO\b|UPDATE\s+\w+\s+SET\b|DELETE\s+FROM\b)")


def _defined_functions(tree: ast.Module) -> set[str]:
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}


def _method_calls(tree: ast.Module) -> dict[tuple[int, str], set[str]]:
    """(line of the method name, method) -> the receivers, as source text."""
    calls: dict[tuple[int, str], set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            key = (node.func.end_lineno or node.lineno, node.func.attr)
            calls.setdefault(key, set()).add(ast.unparse(node.func.value))
    return calls


def test_sql_is_issued_only_inside_the_store() -> None:
    unexplained = []
    used = set()
    for module in _outside_store():
        defined = _defined_functions(module.tree)
        calls = _method_calls(module.tree)
        for number, line in enumerate(module.path.read_text(encoding="utf-8").splitlines(), start=1):
            for match in ISSUE_GREP.finditer(line):
                before = line[: match.start()]
                name = match.group(0)[:-1]
                if before and (before[-1].isalnum() or before[-1] == "_"):
                    continue  # part of a longer name: content_text(, plan_context(, _update(
                if before.endswith("."):
                    receivers = calls.get((number, name), set())
                    explained = {r for r in receivers if (module.relative, f"{r}.{name}") in NOT_SQL}
                    if receivers and explained == receivers:
                        used.update((module.relative, f"{r}.{name}") for r in explained)
                        continue
                elif name in defined:
                    continue  # the module's own function of that name
                unexplained.append(f"{module.relative}:{number}: {line.strip()}")
    assert not unexplained, "SQL-like calls outside gilas_conv/store/:\n" + "\n".join(unexplained)
    assert used == set(NOT_SQL), f"explained but no longer found: {set(NOT_SQL) - used}"


def test_no_string_outside_the_store_spells_sql() -> None:
    found = []
    for module in _outside_store():
        for node in ast.walk(module.tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and SQL_STRING.search(node.value)
            ):
                found.append(f"{module.relative}:{node.lineno}: {node.value[:80]!r}")
    assert not found, "\n".join(found)


def test_the_sql_checks_see_sql() -> None:
    assert SQL_STRING.search("SELECT id FROM messages") and SQL_STRING.search("DELETE FROM x")
    assert not SQL_STRING.search("select a conversation from the list")
    assert [m.group(0) for m in ISSUE_GREP.finditer("conn.execute(text('x')); select(Row)")] == [
        "text(",
        "select(",
    ]

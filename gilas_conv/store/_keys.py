"""The gateway's client keys: which owner a presented key speaks for.

A key is ``gc-`` followed by 43 URL-safe characters (256 random bits). It is shown once,
when created; the database keeps only its SHA-256 (``key_hash``) and a short prefix for
people to tell keys apart (``gc-AbCdEfGh``). A lookup hashes the presented key and finds it
by that hash: with 256 random bits there is nothing to learn from timing, so no
constant-time comparison is needed. A revoked key is never found again; revoking takes
effect for the next lookup on every process sharing the database.
"""

from __future__ import annotations

import builtins
import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Table, insert, select, update

from ._schema import APIKeyRow
from ._validate import _check_field
from ._values import now as _now

if TYPE_CHECKING:
    from ._store import ConversationStore

__all__ = ["KEY_PREFIX", "APIKey", "APIKeys"]

KEY_PREFIX = "gc-"
_KEY_RANDOM_BYTES = 32
# Characters of the key kept for display: "gc-" and 8 of the random part (48 bits: enough to
# tell keys apart, far too few to guess the rest).
_DISPLAY_LENGTH = len(KEY_PREFIX) + 8
# Longer than any key we issue: a longer string is not looked up at all.
_MAX_KEY_LENGTH = 256

_keys = cast(Table, APIKeyRow.__table__)


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class APIKey:
    """A stored key, without the key itself: ``prefix`` is its first characters."""

    id: str
    owner: str
    prefix: str
    created_at: dt.datetime
    revoked_at: dt.datetime | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "owner": self.owner,
            "prefix": self.prefix,
            "created_at": self.created_at.isoformat(),
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
        }


def _from_row(row: Any) -> APIKey:
    return APIKey(
        id=row.id, owner=row.owner, prefix=row.prefix, created_at=row.created_at, revoked_at=row.revoked_at
    )


class APIKeys:
    """The client keys kept in a :class:`~gilas_conv.ConversationStore`'s database."""

    def __init__(self, store: ConversationStore) -> None:
        self._store = store

    def create(self, *, owner: str) -> tuple[str, APIKey]:
        """A new key for ``owner``: ``(key, record)``. The key is returned here only."""
        _check_field(owner, "owner", allow_empty=False)
        if not owner.strip():
            raise ValueError("owner must not be blank")
        key = KEY_PREFIX + secrets.token_urlsafe(_KEY_RANDOM_BYTES)
        record = APIKey(
            id="key_" + secrets.token_hex(8), owner=owner, prefix=key[:_DISPLAY_LENGTH], created_at=_now()
        )
        with self._store._write() as conn:
            conn.execute(
                insert(_keys).values(
                    id=record.id,
                    owner=owner,
                    key_hash=_hash(key),
                    prefix=record.prefix,
                    created_at=record.created_at,
                )
            )
        return key, record

    def list(self, *, include_revoked: bool = True) -> builtins.list[APIKey]:
        """Every key, oldest first."""
        query = select(_keys).order_by(_keys.c.created_at, _keys.c.id)
        if not include_revoked:
            query = query.where(_keys.c.revoked_at.is_(None))
        with self._store._read() as conn:
            return [_from_row(row) for row in conn.execute(query)]

    def revoke(self, key_or_id: str) -> APIKey:
        """Revoke a key given whole or by id; ValueError if there is no such key.

        Revoking a revoked key changes nothing and returns it.
        """
        if not isinstance(key_or_id, str) or not key_or_id or len(key_or_id) > _MAX_KEY_LENGTH:
            raise ValueError("no such key")
        if key_or_id.startswith(KEY_PREFIX):
            match = _keys.c.key_hash == _hash(key_or_id)
        else:
            match = _keys.c.id == key_or_id
        with self._store._write() as conn:
            conn.execute(update(_keys).where(match, _keys.c.revoked_at.is_(None)).values(revoked_at=_now()))
            row = conn.execute(select(_keys).where(match)).first()
        if row is None:
            # Never echo what was given: it may be a (mistyped) key.
            raise ValueError("no such key (give the whole key or its id, as `gilas-conv keys list` shows)")
        return _from_row(row)

    def owner_of(self, key: str) -> str | None:
        """The owner a key speaks for, or None (unknown, revoked, or not a key at all)."""
        if not isinstance(key, str) or not key.startswith(KEY_PREFIX) or len(key) > _MAX_KEY_LENGTH:
            return None
        try:
            digest = _hash(key)
        except UnicodeEncodeError:  # a lone surrogate: not a key we issued
            return None
        with self._store._read() as conn:
            owner = conn.execute(
                select(_keys.c.owner).where(_keys.c.key_hash == digest, _keys.c.revoked_at.is_(None))
            ).scalar()
        return cast("str | None", owner)

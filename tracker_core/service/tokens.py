"""API tokens: made once, stored as a hash, checked in constant time.

A token is ``tct_`` and 43 URL-safe characters (256 random bits). Only its SHA-256 is kept, in
the task database, so every API host sees the same tokens; with it a *name* (who: what a task
records as ``created_by`` / ``canceled_by``), a :class:`Scope`, an optional expiry and, once
revoked, when. The ``tracker-core token`` commands (:mod:`tracker_core.service.cli_tokens`)
create, list and revoke them; the API (:mod:`tracker_core.service.auth`) checks them.
"""

from __future__ import annotations

import builtins
import datetime as dt
import enum
import hashlib
import hmac
import re
import secrets
from typing import Any

import attrs

from tracker_core.service.errors import ServiceConfigurationError
from tracker_core.service.models import iso, new_id
from tracker_core.service.schema import TOKEN_TABLE

__all__ = [
    "TOKEN_PREFIX",
    "Principal",
    "Scope",
    "TokenInfo",
    "TokenStore",
    "check_token_name",
    "new_token",
    "parse_duration",
    "token_hash",
]

TOKEN_PREFIX = "tct_"
#: longer than any token we make: refused without a database lookup
_MAX_TOKEN_LENGTH = 256
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_T = TOKEN_TABLE
#: a token is active while neither revoked nor expired (by the database's clock: one clock
#: for every API host)
_ACTIVE = "revoked_at IS NULL AND (expires_at IS NULL OR expires_at > clock_timestamp())"


class Scope(enum.StrEnum):
    """What a token may do; each scope grants the ones before it."""

    #: read tasks and methods
    READ = "tasks:read"
    #: also create and cancel tasks
    WRITE = "tasks:write"
    #: also list the API tokens
    ADMIN = "admin"

    def grants(self, needed: Scope) -> bool:
        """Whether a token of this scope may do what ``needed`` allows."""
        order = list(Scope)
        return order.index(self) >= order.index(needed)


@attrs.frozen
class Principal:
    """Who makes a request: a token's name and scope; ``name`` None when auth is off (or, on
    loopback, no token exists yet)."""

    name: str | None
    scope: Scope


def new_token() -> str:
    """A new random token (shown once, never stored)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> bytes:
    """What is stored of a token: its SHA-256."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def check_token_name(name: str) -> str:
    """A token name: 1-64 characters, letters, digits and ``._@-``, starting alphanumeric."""
    if not _NAME.match(name):
        raise ServiceConfigurationError(
            f"invalid token name {name!r}: use 1-64 letters, digits and '._@-', starting with "
            "a letter or digit (e.g. alice, ci-bot)"
        )
    return name


def parse_duration(text: str) -> dt.timedelta:
    """``90d``, ``12h``, ``30m``, ``45s`` or ``2w`` as a duration."""
    match = _DURATION.match(text.strip())
    if match is None or int(match.group(1)) == 0:
        raise ServiceConfigurationError(
            f"invalid duration {text!r}: a positive number and a unit, s, m, h, d or w (e.g. 90d)"
        )
    return dt.timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])


@attrs.frozen
class TokenInfo:
    """A token as listed: everything but the token (and its hash)."""

    id: str
    name: str
    scope: Scope = attrs.field(converter=Scope)
    created_at: dt.datetime
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    active: bool

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> TokenInfo:
        fields = attrs.fields_dict(cls)
        return cls(**{k: v for k, v in row.items() if k in fields})

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "scope": self.scope.value,
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "revoked_at": iso(self.revoked_at),
            "active": self.active,
        }


_COLUMNS = f"id, name, scope, created_at, expires_at, revoked_at, ({_ACTIVE}) AS active"


class TokenStore:
    """The token table, over a psycopg async connection pool."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    async def _rows(self, query: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        from psycopg.rows import dict_row

        async with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(query, params)
            return list(await cur.fetchall()) if cur.description else []

    async def create(
        self, name: str, scope: Scope, expires_in: dt.timedelta | None = None
    ) -> tuple[str, TokenInfo]:
        """A new token for ``name``: ``(token, info)``. Refused while ``name`` has a token
        that is not revoked (revoke it first)."""
        from psycopg import errors

        check_token_name(name)
        token = new_token()
        try:
            (row,) = await self._rows(
                f"INSERT INTO {_T} (id, name, scope, hash, expires_at) VALUES (%s, %s, %s, %s, "
                "clock_timestamp() + %s::interval) RETURNING " + _COLUMNS,
                (new_id(), name, scope.value, token_hash(token), expires_in),
            )
        except errors.UniqueViolation:
            raise ServiceConfigurationError(
                f"a token named {name!r} exists already (tracker-core token list); revoke it "
                f"first (tracker-core token revoke {name}) or choose another name"
            ) from None
        return token, TokenInfo.from_row(row)

    async def list(self, *, everything: bool = False) -> builtins.list[TokenInfo]:
        """The active tokens by name (``everything``: revoked and expired ones too)."""
        where = "" if everything else f"WHERE {_ACTIVE}"
        rows = await self._rows(f"SELECT {_COLUMNS} FROM {_T} {where} ORDER BY name, created_at")
        return [TokenInfo.from_row(r) for r in rows]

    async def revoke(self, name: str) -> TokenInfo | None:
        """Revoke the token of ``name`` (from now on it is refused); None if it has none."""
        rows = await self._rows(
            f"UPDATE {_T} SET revoked_at = clock_timestamp() WHERE name = %s "
            f"AND revoked_at IS NULL RETURNING {_COLUMNS}",
            (name,),
        )
        return TokenInfo.from_row(rows[0]) if rows else None

    async def any_active(self) -> bool:
        """Whether at least one token is active."""
        rows = await self._rows(f"SELECT EXISTS (SELECT 1 FROM {_T} WHERE {_ACTIVE}) AS any")
        return bool(rows[0]["any"])

    async def authenticate(self, token: str) -> Principal | None:
        """The principal of an active token; None for an unknown, revoked or expired one."""
        if not token or len(token) > _MAX_TOKEN_LENGTH:
            return None
        digest = token_hash(token)
        rows = await self._rows(
            f"SELECT name, scope, hash FROM {_T} WHERE hash = %s AND {_ACTIVE}", (digest,)
        )
        for row in rows:
            if hmac.compare_digest(bytes(row["hash"]), digest):
                return Principal(str(row["name"]), Scope(row["scope"]))
        return None


async def count_active(conninfo: str) -> int:
    """Active tokens in the task database at ``conninfo`` (0 before its schema exists)."""
    import psycopg
    from psycopg import errors

    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        try:
            cur = await conn.execute(f"SELECT count(*) FROM {_T} WHERE {_ACTIVE}")  # type: ignore[arg-type]
        except errors.UndefinedTable:
            return 0
        row = await cur.fetchone()
    return int(row[0]) if row else 0

"""The ``tracker-core token`` commands, and where the service's commands find their secrets.

::

    tracker-core token create --name NAME [--scope tasks:read|tasks:write|admin] [--expires 90d]
    tracker-core token list [--all]
    tracker-core token revoke NAME

They work on the task database itself, as ``serve`` and ``worker`` do: ``--database URL``,
``--database-file FILE`` (the URL read from a file), ``$TRACKER_CORE_DATABASE_URL``, else the
embedded database of ``--data-dir``. ``create`` prints the token once; only its hash is kept.

No secret needs to be on a command line (where ``ps`` shows it): the database URL comes from
``--database-file`` or the environment, and the ``task`` commands read their token from
``--token-file`` or ``$TRACKER_CORE_TOKEN`` (:func:`token_from`).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from tracker_core.cli_common import Output, UsageError, _table

__all__ = ["add_database_args", "add_token_commands", "database_url", "token_from"]

_SCOPES = ("tasks:read", "tasks:write", "admin")
T = TypeVar("T")


# ---------------------------------------------------------------------- secrets from files
def _read_secret(path: str, option: str) -> str:
    try:
        value = Path(path).read_text().strip()
    except OSError as exc:
        raise UsageError(f"{option} {path}: {exc.strerror or exc}") from None
    if not value:
        raise UsageError(f"{option} {path}: the file is empty")
    return value


def database_url(args: argparse.Namespace) -> str | None:
    """The task database's URL: ``--database``, else ``--database-file``, else
    ``$TRACKER_CORE_DATABASE_URL``; None: the embedded database."""
    if args.database and args.database_file:
        raise UsageError("give --database or --database-file, not both")
    if args.database_file:
        return _read_secret(args.database_file, "--database-file")
    return args.database or os.environ.get("TRACKER_CORE_DATABASE_URL") or None


def token_from(args: argparse.Namespace) -> str | None:
    """The API token of a ``task`` command: ``--token-file``, else ``$TRACKER_CORE_TOKEN``."""
    if getattr(args, "token_file", None):
        return _read_secret(args.token_file, "--token-file")
    return os.environ.get("TRACKER_CORE_TOKEN") or None


def add_database_args(
    p: argparse.ArgumentParser, data_dir_default: str, data_dir_help: str
) -> None:
    """``--database``, ``--database-file`` and ``--data-dir``: where the task database is, for
    ``serve``, ``worker`` and ``token`` alike (``data_dir_help``: what the folder is)."""
    p.add_argument(
        "--database",
        metavar="URL",
        help="the task database, postgresql://... shared by API hosts and workers (default: "
        "$TRACKER_CORE_DATABASE_URL, else an embedded PostgreSQL in the data folder); a URL "
        "with a password shows in `ps`: prefer --database-file or the variable",
    )
    p.add_argument(
        "--database-file",
        metavar="FILE",
        help="read the task database's URL from this file (keeps its password out of `ps`)",
    )
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        default=os.environ.get("TRACKER_CORE_DATA") or data_dir_default,
        help=f"{data_dir_help} (default: $TRACKER_CORE_DATA, else ./%(default)s)",
    )


# ---------------------------------------------------------------------- token commands
def _with_tokens(args: argparse.Namespace, action: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``action(TokenStore)`` on the task database (its schema created if missing)."""
    import asyncio

    from tracker_core.service.embedded import EmbeddedPostgres
    from tracker_core.service.extra import require_service_extra
    from tracker_core.service.queue import build_app
    from tracker_core.service.schema import ensure_schema
    from tracker_core.service.settings import ServiceSettings
    from tracker_core.service.tokens import TokenStore

    require_service_extra()
    settings = ServiceSettings(
        database_url=database_url(args), data_dir=args.data_dir, allow_root=args.allow_root
    )

    async def run(conninfo: str) -> T:
        app = build_app(settings, conninfo, max_pool=2)
        async with app.open_async():
            await ensure_schema(app)
            return await action(TokenStore(app.connector.pool))  # type: ignore[attr-defined]

    if settings.database_url is not None:
        return asyncio.run(run(settings.database_url))
    embedded = EmbeddedPostgres(settings)  # the data folder's (a running serve's, if any)
    try:
        return asyncio.run(run(embedded.start()))
    finally:
        embedded.stop()


def _token_rows(infos: list[Any]) -> Iterator[str]:
    if not infos:
        yield "no tokens"
        return
    yield from _table(
        ["name", "scope", "created", "expires", "revoked", "active"],
        [
            [t["name"], t["scope"], t["created_at"], t["expires_at"] or "never",
             t["revoked_at"] or "", "yes" if t["active"] else "no"]
            for t in infos
        ],
    )  # fmt: skip


def cmd_token_create(args: argparse.Namespace, out: Output) -> int:
    from tracker_core.service.tokens import Scope, check_token_name, parse_duration

    check_token_name(args.name)
    expires = parse_duration(args.expires) if args.expires else None
    token, info = _with_tokens(args, lambda s: s.create(args.name, Scope(args.scope), expires))
    shown = {"token": token, **info.as_json()}

    def lines() -> Iterator[str]:
        yield (
            f"token {info.name} (scope {info.scope.value}, expires "
            f"{shown['expires_at'] or 'never'}):"
        )
        yield token
        yield (
            "It is shown this once (only its hash is kept): store it now, e.g. in a file only "
            "you can read, and give it to the task commands with --token-file FILE or "
            "$TRACKER_CORE_TOKEN."
        )

    out.emit(shown, lines)
    return 0


def cmd_token_list(args: argparse.Namespace, out: Output) -> int:
    infos = [t.as_json() for t in _with_tokens(args, lambda s: s.list(everything=args.all))]
    out.emit(infos, lambda: _token_rows(infos))
    return 0


def cmd_token_revoke(args: argparse.Namespace, out: Output) -> int:
    from tracker_core.service.errors import ServiceError

    info = _with_tokens(args, lambda s: s.revoke(args.name))
    if info is None:
        raise ServiceError(f"no token named {args.name!r} to revoke (tracker-core token list)")
    shown = info.as_json()
    out.emit(shown, lambda: iter([f"token {info.name} revoked at {shown['revoked_at']}"]))
    return 0


def add_token_commands(sub: Any, data_dir_default: str) -> None:
    """Register ``token create|list|revoke`` on the main parser's subparsers."""
    p = sub.add_parser(
        "token",
        help="create, list and revoke the task API's tokens",
        description="API tokens live in the task database (hashed), so every API host sees "
        "them. Give the same --database / --database-file / --data-dir as serve.",
    )
    tokens = p.add_subparsers(dest="token_command", required=True, metavar="ACTION")

    def common(q: argparse.ArgumentParser) -> None:
        add_database_args(q, data_dir_default, "the embedded layout's folder")
        q.add_argument(
            "--allow-root", action="store_true", help="as for serve (the embedded database)"
        )
        q.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                       help=argparse.SUPPRESS)  # fmt: skip

    q = tokens.add_parser("create", help="create a token and print it (once)")
    q.add_argument("--name", required=True, help="who uses it (tasks record it): alice, ci-bot")
    q.add_argument(
        "--scope",
        choices=_SCOPES,
        default="tasks:write",
        help="tasks:read (read tasks), tasks:write (also create and cancel them), admin "
        "(also list tokens over the API); default %(default)s",
    )
    q.add_argument("--expires", metavar="DURATION", help="e.g. 90d, 12h, 2w (default: never)")
    common(q)
    q.set_defaults(func=cmd_token_create)

    q = tokens.add_parser("list", help="list the active tokens (never the tokens themselves)")
    q.add_argument("--all", action="store_true", help="revoked and expired ones too")
    common(q)
    q.set_defaults(func=cmd_token_list)

    q = tokens.add_parser("revoke", help="revoke a token: every API host refuses it at once")
    q.add_argument("name")
    common(q)
    q.set_defaults(func=cmd_token_revoke)

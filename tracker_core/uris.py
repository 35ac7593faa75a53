"""Credentials in URIs: found whatever characters they hold, refused in storage URIs, and
redacted from anything shown (logs, errors, ``repr``, JSON).

A *userinfo-like part* is what stands between ``scheme://`` and an ``@`` that is not inside
the path: ``s3://KEY:SECRET@bucket``, but also ``s3://KEY:abc/def@bucket`` (AWS secret keys
often hold ``/``, and ``urlsplit`` then sees no user at all) and ``gs://TOKEN@bucket``. A
query value whose key looks secret (``password=``, ``secret=``, ``token=``, ``key=``...) is
one too. Nothing here imports the rest of tracker-core.
"""

from __future__ import annotations

import re

__all__ = ["has_secret_query", "has_userinfo", "redact_text", "redact_uri"]

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
#: a URI inside free text: a scheme, ``://``, then anything up to whitespace or a quote
_URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s\"'<>`]+")
#: query keys whose values are secrets
_SECRET_KEY = re.compile(
    r"(?i)(?:pass(?:word|wd)?|secret|token|key|signature|credential|auth|sig|session)"
)
_QUERY_PAIR = re.compile(r"([?&;])([^=&;#]*)=([^&;#]*)")


def _split_userinfo(uri: str) -> tuple[str, str, str] | None:
    """``(scheme://, userinfo, rest after the @)`` when ``uri`` has a userinfo-like part."""
    match = _SCHEME.match(uri)
    if match is None:
        return None
    head, tail = uri[: match.end()], uri[match.end() :]
    if tail.startswith("/"):
        return None  # no authority (file:///...): nothing can be userinfo
    end = len(tail)
    for mark in "?#":
        if mark in tail:
            end = min(end, tail.index(mark))
    body = tail[:end]
    first_at = body.find("@")
    if first_at < 0:
        return None
    before = body[:first_at]
    if "/" in before and ":" not in before:
        return None  # an "@" inside the path (s3://bucket/models@v2)
    # the secret may itself hold "@": everything up to the last "@" of the authority-ish part
    last_at = body.rfind("@")
    return head, body[:last_at], tail[last_at + 1 :]


def has_userinfo(uri: str) -> bool:
    """Whether ``uri`` carries a user or password before its host, whatever it holds."""
    return _split_userinfo(uri) is not None


def has_secret_query(uri: str) -> bool:
    """Whether ``uri``'s query holds a value under a secret-looking key."""
    query = uri.split("?", 1)[1] if "?" in uri else ""
    return any(_SECRET_KEY.search(key) for _, key, _ in _QUERY_PAIR.findall("?" + query))


def redact_uri(uri: str, *, keep_user: bool = True) -> str:
    """``uri`` with its password (``user:***@``; ``***@`` when the userinfo has no ``:`` or
    ``keep_user`` is False) and secret-looking query values (``password=***``) replaced."""
    parts = _split_userinfo(uri)
    if parts is not None:
        head, userinfo, rest = parts
        user, colon, _ = userinfo.partition(":")
        shown = f"{user}:***" if keep_user and colon and "/" not in user else "***"
        uri = f"{head}{shown}@{rest}"
    if "?" in uri:
        base, _, query = uri.partition("?")

        def hide(m: re.Match[str]) -> str:
            sep, key, value = m.groups()
            return f"{sep}{key}={'***' if _SECRET_KEY.search(key) and value else value}"

        uri = base + _QUERY_PAIR.sub(hide, "?" + query)
    return uri


def redact_text(text: str) -> str:
    """``text`` with every URI in it passed through :func:`redact_uri`."""
    return _URI_IN_TEXT.sub(lambda m: redact_uri(m.group(0)), text)

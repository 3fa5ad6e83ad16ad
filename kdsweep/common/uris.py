"""Store URIs: relative SQLite paths made absolute, and the secrets a URI carries redacted before
anything is printed or logged.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote, unquote, unquote_plus


def absolute_sqlite(uri: str) -> str:
    """sqlite:///relative/path -> sqlite:////absolute/path, resolved against the current directory now.

    MLflow caches one database engine per URI string: a relative URI would keep
    pointing at the first directory's file after a chdir.
    """
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + Path(uri[len(prefix):]).resolve().as_posix()
    return uri


SECRET_KEYS = ("password", "passwd", "pwd", "sslpassword", "token", "secret", "api_key", "apikey", "access_key")
# Schemes SQLAlchemy parses (Optuna's and MLflow's database stores): their passwords may hold '#', '?' and '/'
# unescaped, and the driver still connects, so a URL parser that stops at those characters misses them.
DATABASE_SCHEMES = ("postgresql", "postgres", "mysql", "mariadb", "mssql", "oracle", "sqlite", "cockroachdb")
MASK = "***"


def _is_database(scheme: str) -> bool:
    return scheme.split("+", 1)[0].lower() in DATABASE_SCHEMES


def _split(uri: str) -> tuple[str, str | None, str]:
    """(scheme, userinfo or None, the rest), the userinfo ending at the LAST '@' that can close it.

    A database URL's password may hold any character, '@' too, so its userinfo ends at the last '@'
    anywhere; an HTTP URL's ends at the last '@' before its path, query or fragment (RFC 3986 escapes
    those characters inside a userinfo).
    """
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return "", None, uri
    if _is_database(scheme):
        at = rest.rfind("@")
    else:
        ends = [i for i in (rest.find(c) for c in "/?#") if i >= 0]
        at = rest.rfind("@", 0, min(ends) if ends else len(rest))
    return (scheme, rest[:at], rest[at + 1:]) if at >= 0 else (scheme, None, rest)


def _query_secrets(rest: str) -> tuple[str, list[str]]:
    """`rest` with the values of secret query keys masked, and those values."""
    head, q, query = rest.partition("?")
    if not q:
        return rest, []
    query, hash_, fragment = query.partition("#")
    items, found = [], []
    for item in query.split("&"):
        key, eq, value = item.partition("=")
        if eq and value and unquote_plus(key).lower() in SECRET_KEYS:
            found.append(value)
            item = f"{key}={MASK}"
        items.append(item)
    return f"{head}?{'&'.join(items)}{hash_}{fragment}", found


def _parse(uri: str) -> tuple[str, list[str]]:
    """The one reading of a store URI: (the URI with its secrets masked, the secrets as written in it)."""
    scheme, userinfo, rest = _split(uri)
    rest, found = _query_secrets(rest)
    if userinfo is None:
        return f"{scheme}://{rest}" if scheme else rest, found
    user, colon, password = userinfo.partition(":")
    if colon and password:
        found.append(password)
        userinfo = f"{user}:{MASK}"
    return f"{scheme}://{userinfo}@{rest}", found


def _driver_secrets(uri: str) -> list[str]:
    """What SQLAlchemy hands the database driver as the password and query secrets (they may reach its errors)."""
    if not _is_database(uri.partition("://")[0]):
        return []
    try:
        from sqlalchemy.engine import make_url

        url = make_url(uri)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy reads: _parse's reading is all there is
        return []
    found = [url.password] if url.password else []
    return found + [str(v) for k, v in url.query.items() if k.lower() in SECRET_KEYS and v]


def redact(uri: str) -> str:
    """A URI with any password (in the userinfo or the query string) replaced by ***, safe to print or log."""
    return _parse(uri)[0]


def secrets_of(uri: str | None) -> list[str]:
    """The secret strings a URI carries (password, secret query values), as written, percent-decoded and as
    the database driver receives them; longest first, so a secret holding another is replaced whole."""
    if not uri:
        return []
    written = _parse(uri)[1]
    # SQLAlchemy ends a password at the FIRST '@': its part of 'a@b' is 'a', which would blank every 'a' of a message.
    raw = written + [s for s in _driver_secrets(uri) if not any(s in w and s != w for w in written)]
    return sorted({s for v in raw for s in (v, unquote(v), unquote_plus(v), quote(v, safe="")) if s},
                  key=len, reverse=True)


def scrub(text: str, *uris: str | None) -> str:
    """`text` (an error message, say) with the secrets of `uris` blanked out."""
    for uri in uris:
        for secret in secrets_of(uri):
            text = text.replace(secret, MASK)
    return text

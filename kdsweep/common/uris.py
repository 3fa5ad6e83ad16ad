"""Store URIs: relative SQLite paths made absolute, and the secrets a URI carries redacted before
anything is printed or logged.
"""

from __future__ import annotations

import re  # noqa: E402
from pathlib import Path


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


def redact(uri: str) -> str:
    """A URI with any password (in the userinfo or the query string) replaced, safe to print or log."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    try:
        parts = urlsplit(uri)
        password = parts.password
    except ValueError:
        return "<unparseable uri>"
    if password is None and not any(k.lower() in SECRET_KEYS for k, _ in parse_qsl(parts.query, keep_blank_values=True)):
        return uri
    if password is not None:
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        try:
            if parts.port:
                host += f":{parts.port}"
        except ValueError:
            host += ":<bad port>"
        parts = parts._replace(netloc=f"{parts.username}:***@{host}")
    if parts.query:
        query = [(k, "***" if k.lower() in SECRET_KEYS else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
        parts = parts._replace(query=urlencode(query, safe="*"))
    return urlunsplit(parts)


def secrets_of(uri: str | None) -> list[str]:
    """The secret strings a URI carries (password, secret query values), raw and percent-decoded."""
    from urllib.parse import parse_qsl, unquote, urlsplit

    if not uri:
        return []
    found: list[str] = []
    try:
        parts = urlsplit(uri)
        if parts.password:
            found.append(parts.password)
        found += [v for k, v in parse_qsl(parts.query) if k.lower() in SECRET_KEYS and v]
    except ValueError:
        # Not parseable as a URL: fall back to "scheme://user:PASSWORD@" by hand.
        m = re.search(r"://[^/:@]*:([^@/]*)@", uri)
        if m and m.group(1):
            found.append(m.group(1))
    return sorted({s for v in found for s in (v, unquote(v)) if s}, key=len, reverse=True)


def scrub(text: str, *uris: str | None) -> str:
    """`text` (an error message, say) with the secrets of `uris` blanked out."""
    for uri in uris:
        for secret in secrets_of(uri):
            text = text.replace(secret, "***")
    return text

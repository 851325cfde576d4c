"""Credentials in a tracking URI: redacted wherever dcml writes or logs the URI
(:func:`dcml.config.to_dict`), split off for the connection (``tasks.tracking``)."""

from __future__ import annotations


def redact_uri(uri: str) -> str:
    """``scheme://user:password@host/...`` → ``scheme://***@host/...``; other URIs unchanged."""
    user, host = _authority(uri)
    return uri if user is None else uri.replace(f"{user}@{host}", f"***@{host}", 1)


def split_uri_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """``(uri without user info, user, password)``, both percent-decoded; ``None`` when absent."""
    from urllib.parse import unquote

    user, host = _authority(uri)
    if user is None:
        return uri, None, None
    name, colon, password = user.partition(":")
    return uri.replace(f"{user}@{host}", host, 1), unquote(name), unquote(password) if colon else None


def _authority(uri: str) -> tuple[str | None, str]:
    """``(user info or None, host)`` of a ``scheme://[user@]host/...`` URI."""
    _, sep, rest = uri.partition("://")
    authority = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    if not sep or "@" not in authority:
        return None, authority
    user, _, host = authority.rpartition("@")
    return user, host

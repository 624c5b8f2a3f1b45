"""What may leave the process: configured secrets, URL passwords, credential-looking assignments,
tracebacks and secret paths masked in logs, errors and messages; text cut to a byte limit on a
character boundary."""

from __future__ import annotations

import re
import urllib.parse
from functools import lru_cache
from typing import Iterable

MAX_ERROR_MESSAGE_BYTES = 500
_TRUNCATED = "...[truncated]"

_SECRET_ASSIGNMENT_RE = re.compile(
    r"""(?i)\b([\w-]*(?:password|passwd|token|key|secret|authorization))(["']?\s*[=:]\s*)("[^"]*"|'[^']*'|[^\s,;&"'}]+)""")
_BEARER_RE = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+")
_SECRET_PATH_RE = re.compile(r"""(?:[A-Za-z]:)?(?:[/\\][^\s/\\'"]+)*[/\\](?:secrets|\.ssh|\.aws|\.config)"""
                             r"""(?:[/\\][^\s'"]*)?""")
_TRACEBACK_RE = re.compile(r"Traceback \(most recent call last\):.*", re.DOTALL)
REDACTED = "[REDACTED]"
URL_PASSWORD_MASK = "********"
# user:password@ in anything URL-like, whatever its shape: after a scheme (mqtt://, ftp://, a broken
# mqtt:/), at the start of a value (u:pw@host:1883) or after a delimiter. A user name may hold '@'
# (me@corp:pw@host), a password ':', '/' and '@' (the last '@' of the token ends it): better a path
# masked than a password shown.
_URL_USERINFO_RE = re.compile(r"""(?<![^\s=,;'"(<\[/])((?:[A-Za-z][\w+.-]*:/{1,2})?[^\s:/'"=,;(<\[]*)"""
                              r""":(?!//)[^\s'"]*@""")


_CREDENTIAL_WORDS = ("password", "passwd", "token", "key", "secret", "authorization")


@lru_cache(maxsize=16)
def _longest_first(secrets: tuple) -> tuple:
    return tuple(sorted((s for s in secrets if s and len(s) >= 4), key=len, reverse=True))


def mask_url_credentials(text: str) -> str:
    """`text` with the password of every URL-like value in it masked (the user name stays, to
    tell accounts apart); never raises, however broken the URL."""
    if "@" not in text:
        return text
    return _URL_USERINFO_RE.sub(lambda m: f"{m.group(1)}:{URL_PASSWORD_MASK}@", text)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Mask configured secret values, URL passwords and credential-looking assignments anywhere
    in `text`."""
    text = mask_url_credentials(text)
    for secret in _longest_first(tuple(secrets)):
        if secret in text:
            text = text.replace(secret, REDACTED)
    lowered = text.lower()  # the regexes are slow; most text contains none of their words
    if "bearer" in lowered or "basic" in lowered:
        text = _BEARER_RE.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    if any(word in lowered for word in _CREDENTIAL_WORDS):
        text = _SECRET_ASSIGNMENT_RE.sub(lambda m: m.group(1) + m.group(2) + REDACTED, text)
    return text


def sanitize_error_message(message: str, secrets: Iterable[str] = ()) -> str:
    """What an error message may hold (docs/protocol.md): no traces, credentials or secret paths; at most
    500 UTF-8 bytes."""
    text = _TRACEBACK_RE.sub("", message).strip()
    text = redact(text, secrets)
    text = _SECRET_PATH_RE.sub("[REDACTED_PATH]", text)
    return truncate_utf8(text, MAX_ERROR_MESSAGE_BYTES)


def truncate_utf8(text: str, limit: int, marker: str = _TRUNCATED) -> str:
    """Cut to at most `limit` bytes on a character boundary, ending with `marker` when cut."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    room = limit - len(marker.encode("utf-8"))
    return data[:room].decode("utf-8", errors="ignore") + marker


def public_url(url: str) -> str:
    """`url` without its user name and password, fit for a log line or an error."""
    try:
        parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    except ValueError:  # too broken to split (http://[bad)
        return mask_url_credentials(url)
    if parts.username is None and parts.password is None:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))

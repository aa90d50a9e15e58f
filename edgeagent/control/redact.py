"""Secret redaction for everything a command returns (and anything else that leaves the device).

Pure functions over values: dict keys that name secrets lose their values, and strings lose
what looks like a secret wherever it appears (SDP `a=ice-pwd`, SDES keys, compact JWS/JWT,
PEM private keys, JWK private parts, URL and TURN credentials, `password=...` in log lines),
plus any exact secret value the device knows from its config (TURN and broker passwords).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

__all__ = ["MASK", "Redactor", "is_secret_key", "redact", "redact_text"]

MASK: Final = "[REDACTED]"
_MIN_KNOWN_SECRET: Final = 4  # shorter "secrets" would blank out ordinary words

_SECRET_KEY_RE: Final = re.compile(
    r"(?i)(pass(word|wd|phrase)?|secret|token|credential|private[_-]?key|api[_-]?key|"
    r"authori[sz]ation|ice[_-]?pwd|psk|cookie|session[_-]?key|signature)"
)
_JWK_PRIVATE_FIELDS: Final = frozenset({"d", "p", "q", "dp", "dq", "qi", "k"})

_TEXT_RULES: Final[tuple[tuple[re.Pattern[str], str], ...]] = (
    # PEM private keys, whole block.
    (
        re.compile(
            r"-----BEGIN ([A-Z ]*)PRIVATE KEY-----.*?(-----END \1PRIVATE KEY-----|\Z)", re.S
        ),
        "[REDACTED PRIVATE KEY]",
    ),
    # SDP ICE password and SDES crypto keys.
    (re.compile(r"(a=ice-pwd:)[^\s\r\n]+"), r"\1" + MASK),
    (re.compile(r"(a=crypto:\d+ \S+ inline:)[^\s|\r\n]+"), r"\1" + MASK),
    # Compact JWS / JWT (base64url JSON header "eyJ...").
    (
        re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*"),
        "[REDACTED-TOKEN]",
    ),
    # Private JWK members in JSON text.
    (re.compile(r'("(?:d|p|q|dp|dq|qi|k)"\s*:\s*")[^"]*(")'), r"\1" + MASK + r"\2"),
    # user:password@ in URLs, and turn:user:password@host.
    (re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s:/@]+:)[^\s@/]+(@)", re.I), r"\1" + MASK + r"\2"),
    (re.compile(r"(\bturns?:[^\s:@]+:)[^\s@]+(@)", re.I), r"\1" + MASK + r"\2"),
    # Authorization headers.
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"), r"\1 " + MASK),
    # key=value / key: value in free text (logs, exception messages).
    (
        re.compile(
            r"(?i)\b((?:[a-z0-9_-]*?)(?:password|passwd|secret|token|credential|api[_-]?key|"
            r"private[_-]?key|ice[_-]?pwd)[a-z0-9_-]*"
            r"[\"']?\s*[=:]\s*)(?!\[REDACTED)(\"[^\"]*\"|'[^']*'|[^\s,;&\"'}\]]+)"
        ),
        r"\1" + MASK,
    ),
)


def is_secret_key(key: str) -> bool:
    """Whether a mapping key names a secret (its value is masked when it is text)."""
    return bool(_SECRET_KEY_RE.search(key))


def redact_text(text: str, known: Iterable[str] = ()) -> str:
    """`text` with every secret-looking part and every `known` secret value masked."""
    for secret in known:
        if len(secret) >= _MIN_KNOWN_SECRET and secret in text:
            text = text.replace(secret, MASK)
    for pattern, replacement in _TEXT_RULES:
        text = pattern.sub(replacement, text)
    return text


def _mask_value(value: Any) -> Any:
    """Numbers, booleans and None say nothing secret (`tokens: 3.0`, `max_token_lifetime_s`)."""
    if value is None or isinstance(value, bool | int | float):
        return value
    return MASK


def redact(value: Any, known: Iterable[str] = ()) -> Any:
    """A copy of a JSON-like value with secrets masked; containers are rebuilt, never mutated."""
    secrets = tuple(s for s in known if len(s) >= _MIN_KNOWN_SECRET)
    return _redact(value, secrets, 0)


def _redact(value: Any, known: tuple[str, ...], depth: int) -> Any:
    if depth > 64:  # deeper than any payload we build; do not recurse without bound
        return MASK
    if isinstance(value, str):
        return redact_text(value, known)
    if isinstance(value, bytes | bytearray):
        return redact_text(bytes(value).decode("utf-8", "replace"), known)
    if isinstance(value, Mapping):
        jwk = value.get("kty") is not None
        out: dict[str, Any] = {}
        for k, v in value.items():
            key = str(k)
            if is_secret_key(key) or (jwk and key in _JWK_PRIVATE_FIELDS):
                out[key] = _mask_value(v)
            else:
                out[key] = _redact(v, known, depth + 1)
        return out
    if isinstance(value, list | tuple):
        return [_redact(v, known, depth + 1) for v in value]
    return value


class Redactor:
    """`redact` bound to the secret values this device knows (from its config)."""

    def __init__(self, known: Iterable[str | None] = ()) -> None:
        self.known = tuple(s for s in known if s and len(s) >= _MIN_KNOWN_SECRET)

    def __call__(self, value: Any) -> Any:
        return _redact(value, self.known, 0)

    def text(self, text: str) -> str:
        return redact_text(text, self.known)

"""Operator keys: the trusted Ed25519 public keys, what each may run, and signing for ctl.

Roles are ordered: `debug` implies `operate`, which implies `read`. A key may also name
extra commands it may run whatever its role (`commands`), e.g. a read key allowed `hangup`.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import json
import re
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from joserfc import jws
from joserfc.errors import JoseError, UnsupportedAlgorithmError
from joserfc.jwa import EdDSAAlgorithm, JWSAlgModel
from joserfc.jwk import OKPKey
from joserfc.jws import JWSRegistry

from edgeagent.control.catalog import CALL_ROLE, CATALOG, Role

__all__ = [
    "ALG",
    "EDDSA_REGISTRY",
    "KID_PATTERN",
    "KeyConfigError",
    "TrustedKey",
    "call_claims",
    "command_claims",
    "expand_roles",
    "generate_keypair",
    "load_keys_file",
    "load_private_key",
    "load_signing_key",
    "load_trusted_keys",
    "parse_public_key",
    "sign_command",
]

ALG: Final = "EdDSA"
KID_PATTERN: Final = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_RANK: Final = {Role.READ: 1, Role.OPERATE: 2, Role.DEBUG: 3}
# "call" is not a catalog command but a key may be allowed it explicitly (signed offers).
_ALLOWABLE: Final = frozenset(CATALOG) | {"call"}
_ENTRY_FIELDS: Final = ("kid", "public_key", "roles", "commands", "may_force")


class _EdDSARegistry(JWSRegistry):
    """A JWS registry that knows exactly one algorithm, EdDSA.

    joserfc warns that "EdDSA" is deprecated by RFC 9864 in favour of "Ed25519"; protocol v1
    fixes "EdDSA", so the warning is noise here, and every other algorithm is refused.
    """

    def get_alg(self, name: str) -> JWSAlgModel:
        if name != ALG:
            raise UnsupportedAlgorithmError(f"algorithm {name!r} is not allowed")
        return _EDDSA


_EDDSA: Final = EdDSAAlgorithm()
EDDSA_REGISTRY: Final = _EdDSARegistry()


class KeyConfigError(ValueError):
    """The trusted-key configuration is wrong; `errors` lists every problem with its path."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


def expand_roles(roles: Iterable[str]) -> frozenset[str]:
    """The roles implied by `roles` (debug -> operate -> read)."""
    top = max((_RANK[Role(r)] for r in roles), default=0)
    return frozenset(r.value for r, rank in _RANK.items() if rank <= top)


@dataclass(frozen=True, slots=True)
class TrustedKey:
    """An operator key the device trusts, with what it may do."""

    kid: str
    public_key: OKPKey
    roles: frozenset[str]
    commands: frozenset[str] = frozenset()
    may_force: bool = False

    @property
    def effective_roles(self) -> frozenset[str]:
        return expand_roles(self.roles)

    def allows(self, command: str) -> bool:
        """Whether this key may run `command` (a catalog name, or "call" for signed offers)."""
        if command in self.commands:
            return True
        if command == "call":
            required = CALL_ROLE
        elif command in CATALOG:
            required = CATALOG[command].role
        else:
            return False
        return required.value in self.effective_roles


def _b64url_decode(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def parse_public_key(value: object) -> OKPKey:
    """An Ed25519 public key from an OKP JWK (dict) or a raw 32-byte base64url string."""
    if isinstance(value, str):
        try:
            raw = _b64url_decode(value.strip())
        except (ValueError, binascii.Error) as exc:
            raise ValueError("not base64url") from exc
        if len(raw) != 32:
            raise ValueError(f"an Ed25519 public key is 32 bytes, got {len(raw)}")
        value = {"kty": "OKP", "crv": "Ed25519", "x": value.strip()}
    if not isinstance(value, Mapping):
        raise ValueError("expected a base64url string or an OKP JWK object")
    if "d" in value:
        raise ValueError("contains private key material ('d'); give only the public part")
    if value.get("kty") != "OKP" or value.get("crv") != "Ed25519":
        raise ValueError("expected kty 'OKP' with crv 'Ed25519'")
    try:
        key = OKPKey.import_key({k: v for k, v in value.items() if k in ("kty", "crv", "x")})
    except (JoseError, ValueError, TypeError) as exc:
        raise ValueError(f"not a usable Ed25519 key: {exc}") from exc
    x = value.get("x")
    if not isinstance(x, str) or len(_b64url_decode(x)) != 32:
        raise ValueError("'x' must be a 32-byte base64url Ed25519 public key")
    return key


def _str_set(value: object, path: str, allowed: Iterable[str], errors: list[str]) -> set[str]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        errors.append(f"{path}: expected a list of strings")
        return set()
    allowed_set = set(allowed)
    for v in value:
        if v not in allowed_set:
            hint = difflib.get_close_matches(v, sorted(allowed_set), n=1)
            more = f" (did you mean {hint[0]!r}?)" if hint else ""
            errors.append(f"{path}: unknown {v!r}{more}")
    return set(value) & allowed_set


def load_trusted_keys(
    entries: list[dict[str, Any]], *, path: str = "security.keys"
) -> dict[str, TrustedKey]:
    """Trusted keys by kid from config entries; KeyConfigError listing every problem at once.

    Entry: {"kid", "public_key" (base64url or OKP JWK), "roles": [...], "commands": [...],
    "may_force": bool}. A key must have at least one role or one command.
    """
    errors: list[str] = []
    keys: dict[str, TrustedKey] = {}
    if not isinstance(entries, list):
        raise KeyConfigError([f"{path}: expected a list of key entries"])
    for i, entry in enumerate(entries):
        at = f"{path}[{i}]"
        if not isinstance(entry, Mapping):
            errors.append(f"{at}: expected a table")
            continue
        for name in entry:
            if name not in _ENTRY_FIELDS:
                hint = difflib.get_close_matches(str(name), _ENTRY_FIELDS, n=1)
                more = f" (did you mean {hint[0]!r}?)" if hint else ""
                errors.append(f"{at}.{name}: unknown field{more}")
        kid = entry.get("kid")
        if not isinstance(kid, str) or not KID_PATTERN.fullmatch(kid):
            errors.append(f"{at}.kid: required, 1-64 of A-Z a-z 0-9 . _ : -")
            kid = None
        elif kid in keys:
            errors.append(f"{at}.kid: duplicate kid {kid!r}")
        public: OKPKey | None = None
        if "public_key" not in entry:
            errors.append(f"{at}.public_key: required")
        else:
            try:
                public = parse_public_key(entry["public_key"])
            except ValueError as exc:
                errors.append(f"{at}.public_key: {exc}")
        roles = _str_set(entry.get("roles", []), f"{at}.roles", [r.value for r in Role], errors)
        commands = _str_set(entry.get("commands", []), f"{at}.commands", _ALLOWABLE, errors)
        may_force = entry.get("may_force", False)
        if not isinstance(may_force, bool):
            errors.append(f"{at}.may_force: expected true or false")
            may_force = False
        if not entry.get("roles") and not entry.get("commands"):
            errors.append(f"{at}: give 'roles' and/or 'commands' (this key may do nothing)")
        if kid is not None and public is not None and kid not in keys:
            keys[kid] = TrustedKey(kid, public, frozenset(roles), frozenset(commands), may_force)
    if errors:
        raise KeyConfigError(errors)
    return keys


def load_keys_file(path: Path) -> dict[str, TrustedKey]:
    """Trusted keys from a JSON file: a list of entries, or {"keys": [...]}; KeyConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise KeyConfigError([f"cannot read {path}: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise KeyConfigError([f"{path} is not UTF-8 text (expected JSON)"]) from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise KeyConfigError([f"{path} is not JSON: {exc}"]) from None
    entries: Any = data.get("keys") if isinstance(data, dict) else data
    return load_trusted_keys(entries, path=f"{path}:keys")


def generate_keypair(kid: str | None = None) -> tuple[str, str, str]:
    """A fresh Ed25519 key: (private JWK as JSON, public key base64url, kid).

    The default kid is the first 16 characters of the RFC 7638 thumbprint.
    """
    key = OKPKey.generate_key("Ed25519")
    if kid is None:
        kid = key.thumbprint()[:16]
    elif not KID_PATTERN.fullmatch(kid):
        raise ValueError("kid: 1-64 of A-Z a-z 0-9 . _ : -")
    private = dict(key.as_dict(private=True))
    private["kid"] = kid
    return json.dumps(private, sort_keys=True), str(private["x"]), kid


def load_private_key(value: str | Mapping[str, Any] | OKPKey) -> OKPKey:
    """An Ed25519 private key from a JWK (JSON text or dict) or an OKPKey."""
    if isinstance(value, OKPKey):
        key = value
    else:
        data = json.loads(value) if isinstance(value, str) else dict(value)
        if not isinstance(data, dict) or data.get("kty") != "OKP" or data.get("crv") != "Ed25519":
            raise ValueError("expected an OKP Ed25519 private JWK")
        key = OKPKey.import_key(data)
    if not key.is_private:
        raise ValueError("a public key cannot sign")
    return key


def load_signing_key(path: Path, kid: str | None = None) -> tuple[OKPKey, str]:
    """(private key, kid) from an Ed25519 private JWK file, as `edgeagent-ctl keygen` writes.

    The kid is `kid` if given, else the file's own. ValueError says what is wrong, never
    quoting the file (it holds the private key).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text (expected an Ed25519 private JWK)") from None
    try:
        data = json.loads(text)
    except ValueError:
        raise ValueError(f"{path} is not JSON (expected an Ed25519 private JWK)") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object (expected an Ed25519 private JWK)")
    try:
        key = load_private_key(data)
    except (JoseError, ValueError, TypeError) as exc:
        reason = exc if isinstance(exc, ValueError) else "not a usable key"
        raise ValueError(f"{path}: {reason}") from None
    if kid is None:
        kid = data.get("kid")
        if not isinstance(kid, str):
            raise ValueError(f"{path} has no 'kid'; name it in the file or configure one")
    if not KID_PATTERN.fullmatch(kid):
        raise ValueError(f"kid {kid[:64]!r}: expected 1-64 of A-Z a-z 0-9 . _ : -")
    return key, kid


def command_claims(
    device_id: str,
    cmd: str,
    args: Mapping[str, Any] | None = None,
    *,
    lifetime_s: int = 60,
    now: float | None = None,
    jti: str | None = None,
) -> dict[str, Any]:
    """The claims of a command request (protocol section 3), with a random jti by default."""
    iat = int(time.time() if now is None else now)
    return {
        "jti": jti or str(uuid.uuid4()),
        "sub": device_id,
        "cmd": cmd,
        "args": dict(args or {}),
        "iat": iat,
        "exp": iat + lifetime_s,
    }


def call_claims(
    callee_id: str, call_id: str, *, lifetime_s: int = 60, now: float | None = None
) -> dict[str, Any]:
    """The claims of a signed offer's token (protocol section 4): cmd "call", sub the
    callee, jti the call_id."""
    return command_claims(callee_id, "call", lifetime_s=lifetime_s, now=now, jti=call_id)


def sign_command(
    private_key: str | Mapping[str, Any] | OKPKey, kid: str, claims: Mapping[str, Any]
) -> str:
    """A compact JWS (alg EdDSA, header kid) over the JSON claims."""
    key = load_private_key(private_key)
    payload = json.dumps(dict(claims), separators=(",", ":"), ensure_ascii=False).encode()
    return jws.serialize_compact({"alg": ALG, "kid": kid}, payload, key, registry=EDDSA_REGISTRY)

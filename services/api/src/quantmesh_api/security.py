"""Passwords, JWT access tokens, opaque refresh tokens and API keys: pure functions, no I/O."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from enum import StrEnum

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from quantmesh_common.ids import new_id

ISSUER = "quantmesh"
ALGORITHM = "HS256"
NS = 1_000_000_000


class Role(StrEnum):
    """What a route needs; ADMIN holds every other role too."""

    READ_PORTFOLIO = "READ_PORTFOLIO"
    EXECUTE_TRADES = "EXECUTE_TRADES"
    MANAGE_STRATEGIES = "MANAGE_STRATEGIES"
    ADMIN = "ADMIN"


def grants(held: frozenset[Role], needed: Role) -> bool:
    """Return True if the roles `held` allow a route that needs `needed`."""
    return needed in held or Role.ADMIN in held


_hasher = PasswordHasher()
#: Verified against when the user does not exist, so a login costs the same either way.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


def hash_password(password: str) -> str:
    """Return the argon2id PHC string of `password`."""
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """Return True if `password` matches; constant work when the user is unknown (hash None)."""
    try:
        return _hasher.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (VerificationError, InvalidHashError):
        return False


class TokenError(ValueError):
    """An access token that is missing, malformed, tampered with, expired or revoked."""


@dataclass(frozen=True, slots=True)
class AccessClaims:
    """What a valid access token says."""

    user_id: str
    username: str
    roles: frozenset[Role]
    jti: str
    expires_s: int


def issue_access_token(
    key: str, *, user_id: str, username: str, roles: frozenset[Role], now_s: int, ttl_s: int
) -> tuple[str, AccessClaims]:
    """Return a signed access token and its claims."""
    claims = AccessClaims(user_id, username, roles, new_id(), now_s + ttl_s)
    token = jwt.encode(
        {
            "iss": ISSUER,
            "sub": user_id,
            "name": username,
            "roles": sorted(roles),
            "jti": claims.jti,
            "typ": "access",
            "iat": now_s,
            "exp": claims.expires_s,
        },
        key,
        algorithm=ALGORITHM,
    )
    return token, claims


def decode_access_token(key: str, token: str, *, now_s: int) -> AccessClaims:
    """Verify signature, issuer, type and expiry; raise TokenError saying which failed."""
    try:
        data = jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            issuer=ISSUER,
            options={"require": ["exp", "sub", "jti", "iss"], "verify_exp": False},
        )
    except jwt.InvalidTokenError as exc:
        raise TokenError(f"invalid token: {exc}") from None
    if data.get("typ") != "access":
        raise TokenError("invalid token: not an access token")
    expires = int(data["exp"])
    # Expiry checked against the service clock, not the library's, so tests can move time.
    if expires <= now_s:
        raise TokenError("token expired")
    try:
        roles = frozenset(Role(r) for r in data.get("roles", []))
    except ValueError:
        raise TokenError("invalid token: unknown role") from None
    return AccessClaims(
        str(data["sub"]), str(data.get("name", "")), roles, str(data["jti"]), expires
    )


def sha256_hex(secret: str) -> str:
    """Return the SHA-256 of a high-entropy secret (API keys, refresh tokens)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_opaque_token(prefix: str) -> tuple[str, str, str]:
    """Return (token, id, secret): the token `<prefix>_<id>_<secret>` is shown once."""
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return f"{prefix}_{token_id}_{secret}", token_id, secret


def split_opaque_token(token: str, prefix: str) -> tuple[str, str] | None:
    """Return (id, secret) of a `<prefix>_<id>_<secret>` token, None if it is not one."""
    head, sep, rest = token.partition("_")
    if head != prefix or not sep:
        return None
    token_id, sep, secret = rest.partition("_")
    if not sep or len(token_id) != 16 or not secret:
        return None
    return token_id, secret


def secret_matches(secret: str, expected_sha256: str) -> bool:
    """Compare a presented secret with a stored hash in constant time."""
    return hmac.compare_digest(sha256_hex(secret), expected_sha256)

"""Who is calling: bearer JWTs and API keys, role checks, rate limits, and the auth routes."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.security import (
    APIKeyHeader,
    HTTPAuthorizationCredentials,
    HTTPBearer,
    OAuth2PasswordRequestForm,
)
from pydantic import BaseModel, Field

from quantmesh_api.guard import DenyListUnavailableError
from quantmesh_api.security import (
    Role,
    TokenError,
    grants,
    issue_access_token,
    new_opaque_token,
    secret_matches,
    sha256_hex,
    split_opaque_token,
    verify_password,
)
from quantmesh_api.state import NS, ApiState
from quantmesh_api.store import RefreshToken, User

REFRESH_PREFIX = "qmr"
API_KEY_PREFIX = "qmk"

_bearer = HTTPBearer(auto_error=False, description="access token from /api/v1/auth/token")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="an API key")


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller."""

    user_id: str
    username: str
    roles: frozenset[Role]
    jti: str | None  # None for API keys
    expires_s: int | None

    def can(self, role: Role) -> bool:
        """Return True if the caller holds `role` (ADMIN holds all)."""
        return grants(self.roles, role)


def get_state(request: Request) -> ApiState:
    """The ApiState of the app."""
    state: ApiState = request.app.state.api
    return state


StateDep = Annotated[ApiState, Depends(get_state)]


def _unauthorized(reason: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail=reason, headers={"WWW-Authenticate": "Bearer"}
    )


async def check_ip_limit(state: ApiState, host: str | None) -> None:
    """Refuse with 429 when the client IP exceeds QM_RATE_LIMIT_IP_PER_MIN."""
    retry = await state.limiter.hit(f"ip:{host or 'unknown'}", state.settings.rate_limit_ip_per_min)
    if retry:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            detail="RATE_LIMITED: too many requests from this address",
            headers={"Retry-After": str(retry)},
        )


async def check_user_limit(state: ApiState, principal: Principal) -> None:
    """Refuse with 429 when the caller exceeds QM_RATE_LIMIT_USER_PER_MIN."""
    retry = await state.limiter.hit(
        f"user:{principal.user_id}", state.settings.rate_limit_user_per_min
    )
    if retry:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            detail="RATE_LIMITED: too many requests for this user",
            headers={"Retry-After": str(retry)},
        )


def check_role(principal: Principal, role: Role) -> None:
    """Refuse with 403 unless the caller holds `role`."""
    if not principal.can(role):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, detail=f"FORBIDDEN: this route needs role {role}"
        )


async def limit_ip(request: Request, state: StateDep) -> None:
    """Refuse with 429 when the client IP exceeds QM_RATE_LIMIT_IP_PER_MIN."""
    await check_ip_limit(state, request.client.host if request.client else None)


async def authenticate(state: ApiState, token: str | None, api_key: str | None) -> Principal:
    """Resolve a bearer token or an API key to a Principal; 401 with the reason otherwise."""
    if token:
        try:
            claims = state.tokens.decode(token, state.now_s())
        except TokenError as exc:
            raise _unauthorized(str(exc)) from None
        try:
            denied = await state.deny_list.is_denied(claims.jti)
        except DenyListUnavailableError:
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                detail="DENY_LIST_UNAVAILABLE: cannot check token revocation",
            ) from None
        if denied:
            raise _unauthorized("token revoked")
        return Principal(
            claims.user_id, claims.username, claims.roles, claims.jti, claims.expires_s
        )
    if api_key:
        parts = split_opaque_token(api_key, API_KEY_PREFIX)
        key = await state.store.get_api_key(parts[0]) if parts else None
        if (
            parts is None
            or key is None
            or key.revoked
            or not secret_matches(parts[1], key.secret_sha256)
        ):
            raise _unauthorized("invalid API key")
        user = await state.store.get_user(key.user_id)
        if user is None or not user.active:
            raise _unauthorized("invalid API key")
        # A key never holds more than its owner holds today.
        held = frozenset(r for r in key.scopes if grants(user.roles, r))
        return Principal(user.user_id, user.username, held, None, None)
    raise _unauthorized("not authenticated: send a bearer token or an X-API-Key header")


async def current_principal(
    state: StateDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    api_key: Annotated[str | None, Depends(_api_key)],
) -> Principal:
    """The caller of this request, rate-limited per user."""
    principal = await authenticate(state, credentials.credentials if credentials else None, api_key)
    await check_user_limit(state, principal)
    return principal


PrincipalDep = Annotated[Principal, Depends(current_principal)]


def require(role: Role) -> Any:
    """A dependency that lets a route run only for callers holding `role`."""

    async def check(principal: PrincipalDep) -> Principal:
        check_role(principal, role)
        return principal

    check.__name__ = f"require_{role.lower()}"
    return Depends(check)


# ------------------------------------------------------------------------------- routes --


class TokenPair(BaseModel):
    """An access token and the refresh token that renews it."""

    access_token: str
    token_type: str = "bearer"
    expires_in: int = Field(description="Seconds until the access token expires.")
    refresh_token: str


class RefreshRequest(BaseModel):
    """A refresh token to rotate."""

    refresh_token: str = Field(min_length=1, max_length=256)


class LogoutRequest(BaseModel):
    """Optionally the refresh token whose family logout also revokes."""

    refresh_token: str | None = Field(default=None, max_length=256)


router = APIRouter(prefix="/auth", tags=["auth"])


async def issue_tokens(
    state: ApiState, user: User, family_id: str | None = None
) -> tuple[TokenPair, RefreshToken]:
    """Issue an access token and a new refresh token (of `family_id`, or a new family)."""
    settings = state.settings
    now_s = state.now_s()
    access, _ = issue_access_token(
        settings.jwt_key(),
        user_id=user.user_id,
        username=user.username,
        roles=user.roles,
        now_s=now_s,
        ttl_s=settings.access_token_ttl_s,
    )
    refresh, token_id, secret = new_opaque_token(REFRESH_PREFIX)
    record = RefreshToken(
        token_id=token_id,
        family_id=family_id or secrets.token_hex(8),
        user_id=user.user_id,
        secret_sha256=sha256_hex(secret),
        ts_expires=(now_s + settings.refresh_token_ttl_s) * NS,
    )
    pair = TokenPair(
        access_token=access, expires_in=settings.access_token_ttl_s, refresh_token=refresh
    )
    return pair, record


@router.post("/token", response_model=TokenPair, dependencies=[Depends(limit_ip)])
async def login(
    state: StateDep, form: Annotated[OAuth2PasswordRequestForm, Depends()]
) -> TokenPair:
    """OAuth2 password flow: a short-lived access token and a rotating refresh token."""
    user = await state.store.get_user_by_name(form.username)
    ok = verify_password(user.password_hash if user else None, form.password)
    if user is None or not ok or not user.active:
        raise _unauthorized("invalid username or password")
    pair, record = await issue_tokens(state, user)
    await state.store.add_refresh_token(record)
    return pair


@router.post("/refresh", response_model=TokenPair, dependencies=[Depends(limit_ip)])
async def refresh(state: StateDep, body: RefreshRequest) -> TokenPair:
    """Rotate a refresh token; presenting an already-rotated one revokes its whole family."""
    parts = split_opaque_token(body.refresh_token, REFRESH_PREFIX)
    stored = await state.store.get_refresh_token(parts[0]) if parts else None
    if parts is None or stored is None or not secret_matches(parts[1], stored.secret_sha256):
        raise _unauthorized("invalid refresh token")
    if stored.revoked:
        raise _unauthorized("refresh token revoked")
    if stored.replaced_by is not None:
        await state.store.revoke_refresh_family(stored.family_id)
        raise _unauthorized("refresh token reused: every token of its session is revoked")
    if stored.ts_expires <= state.clock.now_ns():
        raise _unauthorized("refresh token expired")
    user = await state.store.get_user(stored.user_id)
    if user is None or not user.active:
        raise _unauthorized("invalid refresh token")
    pair, record = await issue_tokens(state, user, stored.family_id)
    if not await state.store.rotate_refresh_token(stored.token_id, record):
        # Lost a race with another use of the same token: that is a reuse too.
        await state.store.revoke_refresh_family(stored.family_id)
        raise _unauthorized("refresh token reused: every token of its session is revoked")
    return pair


@router.post("/logout", status_code=status.HTTP_204_NO_CONTENT)
async def logout(state: StateDep, principal: PrincipalDep, body: LogoutRequest) -> None:
    """Revoke the access token used (deny-list until it expires) and the refresh family."""
    if principal.jti is not None and principal.expires_s is not None:
        await state.deny_list.deny(principal.jti, principal.expires_s - state.now_s() + 1)
    if body.refresh_token:
        parts = split_opaque_token(body.refresh_token, REFRESH_PREFIX)
        stored = await state.store.get_refresh_token(parts[0]) if parts else None
        if (
            parts is not None
            and stored is not None
            and stored.user_id == principal.user_id
            and secret_matches(parts[1], stored.secret_sha256)
        ):
            await state.store.revoke_refresh_family(stored.family_id)

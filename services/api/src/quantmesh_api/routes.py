"""The REST routes under /api/v1: users, keys, accounts, orders, market data, strategies, risk."""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from decimal import ROUND_DOWN, Decimal
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, HTTPException, Path, Query, Response, status
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from quantmesh_api import oco
from quantmesh_api.auth import API_KEY_PREFIX, Principal, PrincipalDep, StateDep, require
from quantmesh_api.collector import CollectorConfig, CollectorJob
from quantmesh_api.security import Role, grants, hash_password, new_opaque_token, sha256_hex
from quantmesh_api.state import ApiState, PublishError
from quantmesh_api.store import Account, ApiKey, ConflictError, User
from quantmesh_api.strategies import check_params
from quantmesh_common.ids import new_id
from quantmesh_common.messages import (
    AccountOpened,
    BarInterval,
    ControlAction,
    ControlCommand,
    Currency,
    Identifier,
    InstrumentId,
    InstrumentIdStr,
    OrderIntent,
    OrderRequestAction,
    OrderType,
    PerformanceReport,
    Price,
    RiskLimitsStatus,
    RoundTripRecord,
    Side,
    StrategyState,
    StrategyStatus,
    TimeInForce,
    Venue,
)
from quantmesh_common.messages import OrderRequest as OrderRequestEvent
from quantmesh_common.performance import summarize
from quantmesh_common.topics import Topic

#: The strategy id of orders people and programs place through the api.
MANUAL_STRATEGY = "api"
#: Quantities derived from a notional are cut to this many decimals (risk rounds to the lot).
NOTIONAL_QUANTUM = Decimal("0.00000001")

AccountIdPath = Annotated[
    str, Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:@/+=-]+$")
]
InstrumentPath = Annotated[
    str, Path(pattern=r"^[A-Z0-9]+-[A-Z0-9]+\.[A-Z][A-Z0-9_]*$", max_length=128)
]
PositiveMoney = Annotated[Decimal, Field(gt=0, allow_inf_nan=False, max_digits=38)]

router = APIRouter()


def _problem(code: int, reason: str) -> HTTPException:
    return HTTPException(code, detail=reason)


async def _publish(state: ApiState, topic: str, payload: Any, key: str | None = None) -> None:
    try:
        await state.publish(topic, payload, key=key)
    except PublishError as exc:
        raise _problem(status.HTTP_503_SERVICE_UNAVAILABLE, f"BUS_UNAVAILABLE: {exc}") from None


def _command(
    state: ApiState,
    principal_name: str,
    action: ControlAction,
    target: str,
    reason: str = "",
    **params: str,
) -> ControlCommand:
    return ControlCommand(
        command_id=new_id(),
        action=action,
        target=target,
        params=params,
        issued_by=f"api:{principal_name}",
        reason=reason,
        ts_event=state.clock.now_ns(),
    )


# ------------------------------------------------------------------------------ users --


class UserCreate(BaseModel):
    """A user to create (ADMIN only)."""

    username: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._@-]+$")
    password: str = Field(min_length=8, max_length=256)
    roles: list[Role] = Field(default_factory=lambda: [Role.READ_PORTFOLIO])


class UserPublic(BaseModel):
    """A user as shown (never the password hash)."""

    user_id: str
    username: str
    roles: list[Role]
    active: bool


def _user_public(user: User) -> UserPublic:
    return UserPublic(
        user_id=user.user_id, username=user.username, roles=sorted(user.roles), active=user.active
    )


@router.post(
    "/users",
    response_model=UserPublic,
    status_code=status.HTTP_201_CREATED,
    tags=["users"],
    dependencies=[require(Role.ADMIN)],
)
async def create_user(state: StateDep, body: UserCreate) -> UserPublic:
    """Register a user (ADMIN)."""
    user = User(new_id(), body.username, hash_password(body.password), frozenset(body.roles))
    try:
        await state.store.create_user(user)
    except ConflictError as exc:
        raise _problem(status.HTTP_409_CONFLICT, f"USERNAME_TAKEN: {exc}") from None
    return _user_public(user)


@router.get(
    "/users", response_model=list[UserPublic], tags=["users"], dependencies=[require(Role.ADMIN)]
)
async def list_users(state: StateDep) -> list[UserPublic]:
    """Every user (ADMIN)."""
    return [_user_public(u) for u in await state.store.list_users()]


@router.get("/me", response_model=UserPublic, tags=["users"])
async def me(principal: PrincipalDep) -> UserPublic:
    """The caller, with the roles this token or key carries."""
    return UserPublic(
        user_id=principal.user_id,
        username=principal.username,
        roles=sorted(principal.roles),
        active=True,
    )


# --------------------------------------------------------------------------- api keys --


class ApiKeyCreate(BaseModel):
    """A key for a program, with the roles it may use (a subset of the caller's)."""

    name: str = Field(default="", max_length=128)
    scopes: list[Role] = Field(min_length=1)


class ApiKeyPublic(BaseModel):
    """A key as listed: its id, never its secret."""

    key_id: str
    name: str
    scopes: list[Role]
    revoked: bool


class ApiKeyCreated(ApiKeyPublic):
    """A new key: `api_key` is shown this once and never stored."""

    api_key: str


@router.post(
    "/api-keys", response_model=ApiKeyCreated, status_code=status.HTTP_201_CREATED, tags=["users"]
)
async def create_api_key(
    state: StateDep, principal: PrincipalDep, body: ApiKeyCreate
) -> ApiKeyCreated:
    """Create an API key scoped to roles the caller holds."""
    missing = [r for r in body.scopes if not grants(principal.roles, r)]
    if missing:
        raise _problem(status.HTTP_403_FORBIDDEN, f"SCOPE_NOT_HELD: {', '.join(sorted(missing))}")
    token, key_id, secret = new_opaque_token(API_KEY_PREFIX)
    key = ApiKey(key_id, principal.user_id, body.name, sha256_hex(secret), frozenset(body.scopes))
    await state.store.create_api_key(key)
    return ApiKeyCreated(
        key_id=key_id, name=key.name, scopes=sorted(key.scopes), revoked=False, api_key=token
    )


@router.get("/api-keys", response_model=list[ApiKeyPublic], tags=["users"])
async def list_api_keys(state: StateDep, principal: PrincipalDep) -> list[ApiKeyPublic]:
    """The caller's keys."""
    return [
        ApiKeyPublic(key_id=k.key_id, name=k.name, scopes=sorted(k.scopes), revoked=k.revoked)
        for k in await state.store.list_api_keys(principal.user_id)
    ]


@router.delete("/api-keys/{key_id}", status_code=status.HTTP_204_NO_CONTENT, tags=["users"])
async def revoke_api_key(
    state: StateDep,
    principal: PrincipalDep,
    key_id: Annotated[str, Path(min_length=1, max_length=64)],
) -> None:
    """Revoke one of the caller's keys."""
    if not await state.store.revoke_api_key(principal.user_id, key_id):
        raise _problem(status.HTTP_404_NOT_FOUND, f"API_KEY_NOT_FOUND: key_id={key_id}")


# --------------------------------------------------------------------------- accounts --


class AccountCreate(BaseModel):
    """A paper account: starting capital in one currency, trading on one venue."""

    name: str = Field(default="", max_length=128)
    capital: PositiveMoney
    currency: Currency = "USDT"
    venue: Venue = "SIM"


class AccountPublic(BaseModel):
    """An account of the caller."""

    account_id: str
    name: str
    venue: str
    base_currency: str
    mode: str
    starting_capital: Decimal
    ts_created: int


def _account_public(account: Account) -> AccountPublic:
    return AccountPublic(
        account_id=account.account_id,
        name=account.name,
        venue=account.venue,
        base_currency=account.base_currency,
        mode=account.mode,
        starting_capital=account.starting_capital,
        ts_created=account.ts_created,
    )


async def _owned(state: ApiState, principal_user: str, account_id: str) -> Account:
    account = await state.account(account_id)
    # Someone else's account is "not found": its existence is not the caller's business.
    if account is None or account.user_id != principal_user:
        raise _problem(status.HTTP_404_NOT_FOUND, f"ACCOUNT_NOT_FOUND: account_id={account_id}")
    return account


@router.post(
    "/accounts",
    response_model=AccountPublic,
    status_code=status.HTTP_201_CREATED,
    tags=["accounts"],
)
async def create_account(
    state: StateDep,
    body: AccountCreate,
    principal: Annotated[Principal, require(Role.EXECUTE_TRADES)],
) -> AccountPublic:
    """Open a paper account owned by the caller."""
    account = Account(
        account_id=f"pa-{secrets.token_hex(8)}",
        user_id=principal.user_id,
        name=body.name,
        venue=body.venue,
        base_currency=body.currency,
        mode="PAPER",
        starting_capital=body.capital,
        ts_created=state.clock.now_ns(),
    )
    opened = AccountOpened(
        account_id=account.account_id,
        owner=principal.user_id,
        base_currency=account.base_currency,
        starting_cash={account.base_currency: account.starting_capital},
        venue=account.venue,
        mode=account.mode,
        ts_event=account.ts_created,
    )
    # Published before it is stored: a failed publish leaves no account without its cash (a
    # failed store leaves an opening no one owns, which the portfolio seeds and never trades).
    await _publish(state, Topic.ACCOUNTS, opened, key=account.account_id)
    await state.store.create_account(account)
    return _account_public(account)


@router.get("/accounts", response_model=list[AccountPublic], tags=["accounts"])
async def list_accounts(
    state: StateDep, principal: Annotated[Principal, require(Role.READ_PORTFOLIO)]
) -> list[AccountPublic]:
    """The caller's accounts."""
    return [_account_public(a) for a in await state.store.list_accounts(principal.user_id)]


@router.get("/accounts/{account_id}", response_model=AccountPublic, tags=["accounts"])
async def get_account(
    state: StateDep,
    account_id: AccountIdPath,
    principal: Annotated[Principal, require(Role.READ_PORTFOLIO)],
) -> AccountPublic:
    """One of the caller's accounts."""
    return _account_public(await _owned(state, principal.user_id, account_id))


class PositionPublic(BaseModel):
    """A position as the portfolio stage last published it."""

    instrument_id: str
    side: str
    quantity: Decimal
    avg_entry_price: Decimal
    realized_pnl: Decimal
    unrealized_pnl: Decimal
    fees: Decimal
    last_price: Decimal | None
    ts_event: int


class Balances(BaseModel):
    """Cash per currency and equity from the latest portfolio snapshot (null before one)."""

    account_id: str
    base_currency: str | None
    balances: dict[str, Decimal]
    equity: Decimal | None
    realized_pnl: Decimal | None
    unrealized_pnl: Decimal | None
    fees: Decimal | None
    drawdown: Decimal | None
    ts_event: int | None


#: A ratio with no bound (no losing period or trade) is the string "Infinity" (JSON has none).
Ratio = float | Literal["Infinity", "-Infinity"] | None


class Performance(BaseModel):
    """The account's performance: the portfolio's latest report, else this instance's curve.

    `source` says which: `portfolio` (its PerformanceReport: ratios, trade statistics, MAE/MFE,
    the latest round trips) or `snapshots` (before the portfolio stored a report: the equity
    curve of the snapshots this api instance has seen, no trade statistics).
    """

    account_id: str
    strategy_id: str | None = Field(default=None, description="None: the whole account.")
    source: Literal["portfolio", "snapshots"]
    ts_event: int | None = None
    points: int
    start_equity: Decimal | None
    final_equity: Decimal | None
    total_return: float | None
    cagr: float | None = None
    volatility: float | None = None
    max_drawdown: float
    sharpe: Ratio
    sortino: Ratio
    calmar: Ratio = None
    trades: int | None = None
    wins: int | None = None
    losses: int | None = None
    win_rate: float | None = Field(description="Share of round trips that made money.")
    profit_factor: Ratio = None
    expectancy: Decimal | None = Field(default=None, description="Mean P&L per round trip.")
    average_win: Decimal | None = None
    average_loss: Decimal | None = None
    net_pnl: Decimal | None = None
    mean_mae_fraction: float | None = None
    mean_mfe_fraction: float | None = None
    round_trips: list[RoundTripRecord] = Field(default_factory=list)


def _ratio(value: float | None) -> float | str | None:
    if value is None or math.isfinite(value):
        return value
    return "Infinity" if value > 0 else "-Infinity"


@router.get(
    "/accounts/{account_id}/positions", response_model=list[PositionPublic], tags=["accounts"]
)
async def list_positions(
    state: StateDep,
    account_id: AccountIdPath,
    principal: Annotated[Principal, require(Role.READ_PORTFOLIO)],
) -> list[PositionPublic]:
    """Open positions (flat ones are left out)."""
    await _owned(state, principal.user_id, account_id)
    view = state.projection.view(account_id)
    return [
        PositionPublic(**p.model_dump(exclude={"account_id"}))
        for _, p in sorted(view.positions.items())
        if p.quantity != 0
    ]


@router.get("/accounts/{account_id}/balances", response_model=Balances, tags=["accounts"])
async def get_balances(
    state: StateDep,
    account_id: AccountIdPath,
    principal: Annotated[Principal, require(Role.READ_PORTFOLIO)],
) -> Balances:
    """Balances per asset and equity from the latest portfolio snapshot."""
    await _owned(state, principal.user_id, account_id)
    snap = state.projection.view(account_id).snapshot
    if snap is None:
        return Balances(
            account_id=account_id,
            base_currency=None,
            balances={},
            equity=None,
            realized_pnl=None,
            unrealized_pnl=None,
            fees=None,
            drawdown=None,
            ts_event=None,
        )
    return Balances(
        account_id=account_id,
        base_currency=snap.base_currency,
        balances=dict(snap.balances),
        equity=snap.equity,
        realized_pnl=snap.realized_pnl,
        unrealized_pnl=snap.unrealized_pnl,
        fees=snap.fees,
        drawdown=snap.drawdown,
        ts_event=snap.ts_event,
    )


def _stored_performance(stored: dict[str, Any]) -> Performance:
    report = PerformanceReport.model_validate(stored)
    return Performance.model_validate(
        {
            **report.model_dump(exclude={"sharpe", "sortino", "calmar", "profit_factor"}),
            "source": "portfolio",
            "sharpe": _ratio(report.sharpe),
            "sortino": _ratio(report.sortino),
            "calmar": _ratio(report.calmar),
            "profit_factor": _ratio(report.profit_factor),
        }
    )


StrategyQuery = Annotated[
    str | None,
    Query(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@/+=-]*$"),
]


@router.get("/accounts/{account_id}/performance", response_model=Performance, tags=["accounts"])
async def get_performance(
    state: StateDep,
    account_id: AccountIdPath,
    principal: Annotated[Principal, require(Role.READ_PORTFOLIO)],
    strategy_id: StrategyQuery = None,
) -> Performance:
    """The portfolio's latest performance report of the account (else its snapshot curve);
    with `strategy_id`, of that strategy's trading in the account (404 until one is stored)."""
    await _owned(state, principal.user_id, account_id)
    if strategy_id is not None:
        own = await state.store.latest_performance(account_id, strategy_id)
        if own is None:
            raise _problem(
                404,
                f"PERFORMANCE_NOT_FOUND: account_id={account_id}, strategy_id={strategy_id}",
            )
        return _stored_performance(own)
    stored = await state.store.latest_performance(account_id)
    if stored is not None:
        return _stored_performance(stored)
    view = state.projection.view(account_id)
    summary = summarize(list(view.equity), periods_per_year="infer")
    return Performance(
        account_id=account_id,
        source="snapshots",
        points=summary.points,
        start_equity=summary.start_equity,
        final_equity=summary.final_equity,
        total_return=summary.total_return,
        max_drawdown=summary.max_drawdown,
        sharpe=_ratio(summary.sharpe),
        sortino=_ratio(summary.sortino),
        win_rate=None,
    )


@router.get(
    "/accounts/{account_id}/performance/strategies",
    response_model=list[Performance],
    tags=["accounts"],
)
async def list_strategy_performance(
    state: StateDep,
    account_id: AccountIdPath,
    principal: Annotated[Principal, require(Role.READ_PORTFOLIO)],
) -> list[Performance]:
    """The latest performance report of each strategy that traded in the account."""
    await _owned(state, principal.user_id, account_id)
    return [_stored_performance(r) for r in await state.store.strategy_performances(account_id)]


# ----------------------------------------------------------------------------- orders --


class OrderRequest(BaseModel):
    """An order by quantity (base units) or notional (quote units)."""

    instrument_id: InstrumentIdStr
    side: Side
    order_type: OrderType = OrderType.MARKET
    quantity: PositiveMoney | None = None
    notional: PositiveMoney | None = None
    limit_price: Price | None = None
    stop_price: Price | None = None
    time_in_force: TimeInForce = TimeInForce.GTC
    reduce_only: bool = False
    stop_loss: Price | None = Field(
        default=None,
        description="OCO exit: the OMS attaches a reduce-only STOP here to what the order fills, "
        "canceled when the take-profit fills.",
    )
    take_profit: Price | None = Field(
        default=None,
        description="OCO exit: the OMS attaches a reduce-only LIMIT here to what the order "
        "fills, canceled when the stop-loss fills.",
    )

    @model_validator(mode="after")
    def _one_size(self) -> OrderRequest:
        if (self.quantity is None) == (self.notional is None):
            raise ValueError("give exactly one of quantity and notional")
        if self.time_in_force is TimeInForce.GTD:
            raise ValueError("GTD orders are not offered by the api yet")
        return self


class OrderAccepted(BaseModel):
    """The order intent as sent to risk: its fate arrives on orders and the WebSocket."""

    client_order_id: str
    intent_id: str
    account_id: str
    instrument_id: str
    side: Side
    order_type: OrderType
    quantity: Decimal
    limit_price: Decimal | None
    stop_price: Decimal | None
    stop_loss: Decimal | None = None
    take_profit: Decimal | None = None
    status: Literal["SENT_TO_RISK"] = "SENT_TO_RISK"


class OrderPublic(BaseModel):
    """An order as the OMS recorded it."""

    client_order_id: str
    venue_order_id: str | None
    account_id: str
    strategy_id: str
    instrument_id: str
    side: str
    order_type: str
    quantity: Decimal
    filled_quantity: Decimal
    avg_fill_price: Decimal | None
    limit_price: Decimal | None
    stop_price: Decimal | None
    time_in_force: str
    reduce_only: bool
    status: str
    reason: str | None
    tag: str
    ts_init: int
    ts_last: int


class TradePublic(BaseModel):
    """One fill of the account."""

    client_order_id: str
    instrument_id: str
    side: str
    quantity: Decimal
    price: Decimal
    trade_id: str
    ts_event: int


async def _reference_price(state: ApiState, instrument_id: str) -> Decimal | None:
    rows = await state.kv.latest_prices([instrument_id])
    return Decimal(rows[0]["price"]) if rows and rows[0].get("price") else None


async def _intent_of(
    state: ApiState, account: Account, body: OrderRequest, client_order_id: str, tag: str
) -> OrderIntent:
    venue = InstrumentId.parse(body.instrument_id).venue
    if venue != account.venue:
        raise _problem(
            422,
            f"INSTRUMENT_NOT_ON_ACCOUNT_VENUE: instrument_id={body.instrument_id}, "
            f"account_venue={account.venue}",
        )
    quantity = body.quantity
    if quantity is None:
        assert body.notional is not None
        price = (
            body.limit_price or body.stop_price or await _reference_price(state, body.instrument_id)
        )
        if price is None:
            raise _problem(422, f"NO_REFERENCE_PRICE: instrument_id={body.instrument_id}")
        quantity = (body.notional / price).quantize(NOTIONAL_QUANTUM, rounding=ROUND_DOWN)
        if quantity <= 0:
            raise _problem(422, f"NOTIONAL_TOO_SMALL: notional={body.notional}, price={price}")
    try:
        return OrderIntent(
            intent_id=new_id(),
            account_id=account.account_id,
            strategy_id=MANUAL_STRATEGY,
            instrument_id=body.instrument_id,
            client_order_id=client_order_id,
            side=body.side,
            quantity=quantity,
            order_type=body.order_type,
            limit_price=body.limit_price,
            stop_price=body.stop_price,
            time_in_force=body.time_in_force,
            reduce_only=body.reduce_only,
            tag=tag,
            ts_event=state.clock.now_ns(),
            stop_loss_price=body.stop_loss,
            take_profit_price=body.take_profit,
        )
    except ValidationError as exc:
        reasons = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
        raise _problem(422, f"INVALID_ORDER: {reasons}") from None


def _accepted(intent: OrderIntent) -> OrderAccepted:
    assert intent.side is not None
    assert intent.quantity is not None
    return OrderAccepted(
        client_order_id=intent.client_order_id,
        intent_id=intent.intent_id,
        account_id=intent.account_id,
        instrument_id=intent.instrument_id,
        side=intent.side,
        order_type=intent.order_type,
        quantity=intent.quantity,
        limit_price=intent.limit_price,
        stop_price=intent.stop_price,
        stop_loss=intent.stop_loss_price,
        take_profit=intent.take_profit_price,
    )


async def _send_order(
    state: ApiState,
    user_id: str,
    account: Account,
    body: OrderRequest,
    idempotency_key: str | None,
    response: Response,
    tag: str,
) -> OrderAccepted:
    if idempotency_key is None:
        intent = await _intent_of(state, account, body, f"api-{new_id()}", tag)
        await _publish(state, Topic.ORDERS_INTENTS, intent, key=account.account_id)
        return _accepted(intent)
    scope = f"{user_id}:{account.account_id}:{idempotency_key}"
    # The client order id follows from the key, so even a lost Redis entry cannot make the
    # OMS place a retried order twice.
    client_order_id = "api-" + hashlib.sha256(scope.encode()).hexdigest()[:32]
    fingerprint = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
    redis_key = f"idem:{scope}"
    ttl = state.settings.idempotency_ttl_s
    existing = await state.kv.claim(redis_key, {"fingerprint": fingerprint}, ttl)
    if existing is not None:
        if existing.get("fingerprint") != fingerprint:
            raise _problem(422, "IDEMPOTENCY_KEY_REUSED: the key was used with a different request")
        if "response" not in existing:
            raise _problem(409, "IDEMPOTENCY_KEY_IN_PROGRESS: retry when the first one answered")
        response.headers["Idempotent-Replayed"] = "true"
        return OrderAccepted.model_validate(existing["response"])
    try:
        intent = await _intent_of(state, account, body, client_order_id, tag)
        await _publish(state, Topic.ORDERS_INTENTS, intent, key=account.account_id)
    except BaseException:
        await state.kv.forget(redis_key)
        raise
    accepted = _accepted(intent)
    await state.kv.put(
        redis_key,
        {"fingerprint": fingerprint, "response": json.loads(accepted.model_dump_json())},
        ttl,
    )
    return accepted


@router.post(
    "/accounts/{account_id}/orders",
    response_model=OrderAccepted,
    status_code=status.HTTP_202_ACCEPTED,
    tags=["orders"],
)
async def submit_order(
    state: StateDep,
    account_id: AccountIdPath,
    body: OrderRequest,
    response: Response,
    principal: Annotated[Principal, require(Role.EXECUTE_TRADES)],
    idempotency_key: Annotated[
        str | None, Header(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")
    ] = None,
) -> OrderAccepted:
    """Send an order intent to risk; 202 once Kafka acknowledged it."""
    account = await _owned(state, principal.user_id, account_id)
    return await _send_order(
        state, principal.user_id, account, body, idempotency_key, response, "manual"
    )


@router.get("/accounts/{account_id}/orders", response_model=list[OrderPublic], tags=["orders"])
async def list_orders(
    state: StateDep,
    account_id: AccountIdPath,
    principal: Annotated[Principal, require(Role.READ_PORTFOLIO)],
    open_only: bool = False,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[OrderPublic]:
    """The account's orders as the OMS stored them, newest first."""
    await _owned(state, principal.user_id, account_id)
    rows = await state.store.list_orders(account_id, open_only=open_only, limit=limit)
    return [OrderPublic.model_validate(r) for r in rows]


@router.get(
    "/accounts/{account_id}/orders/{client_order_id}", response_model=OrderPublic, tags=["orders"]
)
async def get_order(
    state: StateDep,
    account_id: AccountIdPath,
    client_order_id: Annotated[str, Path(min_length=1, max_length=128)],
    principal: Annotated[Principal, require(Role.READ_PORTFOLIO)],
) -> OrderPublic:
    """One order of the account."""
    await _owned(state, principal.user_id, account_id)
    row = await state.store.get_order(account_id, client_order_id)
    if row is None:
        raise _problem(404, f"ORDER_NOT_FOUND: client_order_id={client_order_id}")
    return OrderPublic.model_validate(row)


ClientOrderIdPath = Annotated[
    str, Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@/+=-]*$")
]


class OrderAmend(BaseModel):
    """New terms for a working order: at least one of quantity, limit_price, stop_price."""

    quantity: PositiveMoney | None = None
    limit_price: Price | None = None
    stop_price: Price | None = None

    @model_validator(mode="after")
    def _something(self) -> OrderAmend:
        if self.quantity is None and self.limit_price is None and self.stop_price is None:
            raise ValueError("give quantity, limit_price or stop_price")
        return self


class OrderRequestSent(BaseModel):
    """A cancel or replace request on its way to the OMS; the outcome arrives on orders."""

    request_id: str
    action: OrderRequestAction
    account_id: str
    client_order_id: str


def _request_id(user_id: str, account_id: str, idempotency_key: str | None) -> str:
    if idempotency_key is None:
        return f"api-{new_id()}"
    # From the key, so a retried request is applied once by the OMS (it dedupes request ids).
    scope = f"{user_id}:{account_id}:request:{idempotency_key}"
    return "api-" + hashlib.sha256(scope.encode()).hexdigest()[:32]


async def _request(
    state: ApiState,
    principal: Principal,
    account_id: str,
    client_order_id: str,
    idempotency_key: str | None,
    action: OrderRequestAction,
    amend: OrderAmend | None = None,
) -> OrderRequestSent:
    await _owned(state, principal.user_id, account_id)
    order = await state.store.get_order(account_id, client_order_id)
    if order is None:
        raise _problem(404, f"ORDER_NOT_FOUND: client_order_id={client_order_id}")
    if order["status"] not in oco.WORKING:
        raise _problem(
            409, f"ORDER_NOT_WORKING: client_order_id={client_order_id}, status={order['status']}"
        )
    request = OrderRequestEvent(
        request_id=_request_id(principal.user_id, account_id, idempotency_key),
        action=action,
        account_id=account_id,
        client_order_id=client_order_id,
        new_quantity=amend.quantity if amend else None,
        new_limit_price=amend.limit_price if amend else None,
        new_stop_price=amend.stop_price if amend else None,
        requested_by=f"api:{principal.username}",
        ts_event=state.clock.now_ns(),
    )
    await _publish(state, Topic.ORDERS_REQUESTS, request, key=account_id)
    return OrderRequestSent(
        request_id=request.request_id,
        action=action,
        account_id=account_id,
        client_order_id=client_order_id,
    )


IdempotencyKey = Annotated[
    str | None, Header(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")
]


@router.delete(
    "/accounts/{account_id}/orders/{client_order_id}",
    response_model=OrderRequestSent,
    status_code=status.HTTP_202_ACCEPTED,
    tags=["orders"],
)
async def cancel_order(
    state: StateDep,
    account_id: AccountIdPath,
    client_order_id: ClientOrderIdPath,
    principal: Annotated[Principal, require(Role.EXECUTE_TRADES)],
    idempotency_key: IdempotencyKey = None,
) -> OrderRequestSent:
    """Ask the OMS to cancel one working order (orders.requests); 202 once Kafka acked it."""
    return await _request(
        state, principal, account_id, client_order_id, idempotency_key, OrderRequestAction.CANCEL
    )


@router.patch(
    "/accounts/{account_id}/orders/{client_order_id}",
    response_model=OrderRequestSent,
    status_code=status.HTTP_202_ACCEPTED,
    tags=["orders"],
)
async def amend_order(
    state: StateDep,
    account_id: AccountIdPath,
    client_order_id: ClientOrderIdPath,
    body: OrderAmend,
    principal: Annotated[Principal, require(Role.EXECUTE_TRADES)],
    idempotency_key: IdempotencyKey = None,
) -> OrderRequestSent:
    """Ask the OMS to replace a working order's quantity and/or prices; 202 once Kafka acked."""
    return await _request(
        state,
        principal,
        account_id,
        client_order_id,
        idempotency_key,
        OrderRequestAction.REPLACE,
        body,
    )


@router.post(
    "/accounts/{account_id}/orders/cancel-all",
    status_code=status.HTTP_202_ACCEPTED,
    tags=["orders"],
)
async def cancel_all_orders(
    state: StateDep,
    account_id: AccountIdPath,
    principal: Annotated[Principal, require(Role.EXECUTE_TRADES)],
) -> dict[str, str]:
    """Ask the venues to cancel every working order of the account (control CANCEL_ALL_ORDERS)."""
    await _owned(state, principal.user_id, account_id)
    command = _command(state, principal.username, ControlAction.CANCEL_ALL_ORDERS, account_id)
    await _publish(state, state.control_topic, command)
    return {"command_id": command.command_id, "action": command.action}


@router.get("/accounts/{account_id}/trades", response_model=list[TradePublic], tags=["orders"])
async def list_trades(
    state: StateDep,
    account_id: AccountIdPath,
    principal: Annotated[Principal, require(Role.READ_PORTFOLIO)],
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[TradePublic]:
    """The account's fills as the OMS recorded them, newest first."""
    await _owned(state, principal.user_id, account_id)
    rows = await state.store.list_trades(account_id, limit=limit)
    return [
        TradePublic(
            client_order_id=r.client_order_id,
            instrument_id=r.instrument_id,
            side=r.side,
            quantity=r.quantity,
            price=r.price,
            trade_id=r.trade_id,
            ts_event=r.ts_event,
        )
        for r in rows
    ]


class ProtectRequest(BaseModel):
    """Stop-loss and/or take-profit prices for an open position."""

    stop_loss: Price | None = None
    take_profit: Price | None = None

    @model_validator(mode="after")
    def _something(self) -> ProtectRequest:
        if self.stop_loss is None and self.take_profit is None:
            raise ValueError("give stop_loss, take_profit or both")
        return self


async def _open_position(state: ApiState, account_id: str, instrument_id: str) -> Decimal:
    position = state.projection.view(account_id).positions.get(instrument_id)
    if position is None or position.quantity == 0:
        raise _problem(404, f"NO_OPEN_POSITION: instrument_id={instrument_id}")
    return position.quantity


@router.post(
    "/accounts/{account_id}/positions/{instrument_id}/close",
    response_model=OrderAccepted,
    status_code=status.HTTP_202_ACCEPTED,
    tags=["orders"],
)
async def close_position(
    state: StateDep,
    account_id: AccountIdPath,
    instrument_id: InstrumentPath,
    response: Response,
    principal: Annotated[Principal, require(Role.EXECUTE_TRADES)],
) -> OrderAccepted:
    """Send a reduce-only market order for the whole open position."""
    account = await _owned(state, principal.user_id, account_id)
    quantity = await _open_position(state, account_id, instrument_id)
    body = OrderRequest(
        instrument_id=instrument_id,
        side=Side.SELL if quantity > 0 else Side.BUY,
        quantity=abs(quantity),
        reduce_only=True,
    )
    return await _send_order(state, principal.user_id, account, body, None, response, "close")


@router.post(
    "/accounts/{account_id}/positions/{instrument_id}/protect",
    response_model=list[OrderAccepted],
    status_code=status.HTTP_202_ACCEPTED,
    tags=["orders"],
)
async def protect_position(
    state: StateDep,
    account_id: AccountIdPath,
    instrument_id: InstrumentPath,
    body: ProtectRequest,
    principal: Annotated[Principal, require(Role.EXECUTE_TRADES)],
) -> list[OrderAccepted]:
    """Stop-loss (a reduce-only STOP) and take-profit (a reduce-only LIMIT) on a position.

    With both, they are one-cancels-other (`oco.py`): ids `<base>:SL` and `<base>:TP`; when
    one fills, the api resizes or cancels the other through the OMS. To protect a new
    position from its first fill, give `stop_loss` / `take_profit` on the order instead.
    """
    account = await _owned(state, principal.user_id, account_id)
    quantity = await _open_position(state, account_id, instrument_id)
    side = Side.SELL if quantity > 0 else Side.BUY
    stop_price, take_price = body.stop_loss, body.take_profit
    # A long is protected below and takes profit above; a short the other way round.
    if (
        stop_price is not None
        and take_price is not None
        and (
            (quantity > 0 and stop_price >= take_price)
            or (quantity < 0 and stop_price <= take_price)
        )
    ):
        raise _problem(
            422,
            f"EXITS_DO_NOT_FIT_POSITION: stop_loss={stop_price}, take_profit={take_price}, "
            f"position={quantity}",
        )
    sl_id, tp_id = oco.leg_ids(f"api-{new_id()}")
    intents: list[OrderIntent] = []
    if body.stop_loss is not None:
        stop = OrderRequest(
            instrument_id=instrument_id,
            side=side,
            order_type=OrderType.STOP,
            quantity=abs(quantity),
            stop_price=body.stop_loss,
            reduce_only=True,
        )
        intents.append(await _intent_of(state, account, stop, sl_id, oco.PROTECT_SL))
    if body.take_profit is not None:
        take = OrderRequest(
            instrument_id=instrument_id,
            side=side,
            order_type=OrderType.LIMIT,
            quantity=abs(quantity),
            limit_price=body.take_profit,
            reduce_only=True,
        )
        intents.append(await _intent_of(state, account, take, tp_id, oco.PROTECT_TP))
    for intent in intents:
        await _publish(state, Topic.ORDERS_INTENTS, intent, key=account.account_id)
    return [_accepted(i) for i in intents]


# ------------------------------------------------------------------------ market data --


class LatestPrice(BaseModel):
    """The latest trade and 24 h statistics, as the marketdata recorder keeps them."""

    instrument_id: str
    price: Decimal
    ts: int
    open_24h: Decimal | None = None
    change_24h: Decimal | None = None
    change_pct_24h: Decimal | None = None
    high_24h: Decimal | None = None
    low_24h: Decimal | None = None
    volume_24h: Decimal | None = None


class BarPublic(BaseModel):
    """One OHLCV bar, [ts_open, ts_close)."""

    ts_open: int
    ts_close: int
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal
    trades: int | None


class CollectorStatus(BaseModel):
    """The last collector command this api sent, and the params it carried."""

    state: Literal["STARTED", "STOPPED", "UNKNOWN"]
    last_command_id: str | None
    issued_by: str | None
    ts_event: int | None
    params: dict[str, str] = Field(default_factory=dict)


class CollectorOverview(CollectorStatus):
    """The last collector command, and each job's latest status from md.collector."""

    jobs: list[CollectorJob] = Field(default_factory=list)


_PRICE_LIST = TypeAdapter(list[LatestPrice])


@router.get("/market/prices", response_model=list[LatestPrice], tags=["market"])
async def latest_prices(
    state: StateDep,
    _: Annotated[Principal, require(Role.READ_PORTFOLIO)],
    instrument_id: Annotated[list[InstrumentIdStr] | None, Query(max_length=100)] = None,
) -> Any:
    """Latest prices with 24 h change, high, low and volume (all instruments when none given).

    Every instrument's answer is cached for `QM_PRICE_CACHE_S` (it is the hot, polled one).
    """
    if instrument_id:
        rows = await state.kv.latest_prices(list(instrument_id))
        return [LatestPrice.model_validate(r) for r in rows if r.get("price") and r.get("ts")]
    return Response(await all_prices_json(state), media_type="application/json")


async def all_prices_json(state: ApiState) -> bytes:
    """Every instrument's latest price as the JSON answer, from the per-process cache."""

    async def build() -> bytes:
        rows = await state.kv.latest_prices(None)
        prices = [LatestPrice.model_validate(r) for r in rows if r.get("price") and r.get("ts")]
        return _PRICE_LIST.dump_json(prices)

    return await state.prices_json(build)


@router.get("/market/bars", response_model=list[BarPublic], tags=["market"])
async def bars(
    state: StateDep,
    _: Annotated[Principal, require(Role.READ_PORTFOLIO)],
    instrument_id: InstrumentIdStr,
    interval: BarInterval = "1m",
    start_ns: Annotated[int, Query(ge=0, le=2**62)] = 0,
    end_ns: Annotated[int, Query(ge=0, le=2**62)] = 2**62,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> list[BarPublic]:
    """OHLCV bars of one instrument and interval with ts_open in [start_ns, end_ns)."""
    if end_ns <= start_ns:
        raise _problem(422, f"EMPTY_RANGE: start_ns={start_ns}, end_ns={end_ns}")
    rows = await state.store.list_bars(instrument_id, interval, start_ns, end_ns, limit)
    return [BarPublic.model_validate(r) for r in rows]


@router.get("/market/collector", response_model=CollectorOverview, tags=["market"])
async def collector_status(
    state: StateDep, _: Annotated[Principal, require(Role.READ_PORTFOLIO)]
) -> CollectorOverview:
    """What the api last asked the collector to do, and each job's latest reported status."""
    record = await state.kv.get("collector")
    jobs = state.collector.jobs()
    if record is None:
        return CollectorOverview(
            state="UNKNOWN", last_command_id=None, issued_by=None, ts_event=None, jobs=jobs
        )
    return CollectorOverview.model_validate({**record, "jobs": jobs})


async def _collector(
    state: ApiState, username: str, action: ControlAction, params: dict[str, str]
) -> CollectorStatus:
    command = _command(state, username, action, "marketdata", **params)
    await _publish(state, state.control_topic, command)
    result = CollectorStatus(
        state="STARTED" if action is ControlAction.COLLECTOR_START else "STOPPED",
        last_command_id=command.command_id,
        issued_by=command.issued_by,
        ts_event=command.ts_event,
        params=dict(command.params),
    )
    await state.kv.put("collector", result.model_dump(), 365 * 86_400)
    return result


@router.post(
    "/market/collector/start",
    response_model=CollectorStatus,
    status_code=status.HTTP_202_ACCEPTED,
    tags=["market"],
)
async def collector_start(
    state: StateDep,
    principal: Annotated[Principal, require(Role.MANAGE_STRATEGIES)],
    config: CollectorConfig,
) -> CollectorStatus:
    """Start the market-data collection (control COLLECTOR_START with the config as params)."""
    return await _collector(
        state, principal.username, ControlAction.COLLECTOR_START, config.params()
    )


@router.post(
    "/market/collector/stop",
    response_model=CollectorStatus,
    status_code=status.HTTP_202_ACCEPTED,
    tags=["market"],
)
async def collector_stop(
    state: StateDep, principal: Annotated[Principal, require(Role.MANAGE_STRATEGIES)]
) -> CollectorStatus:
    """Stop the market-data collection (control COLLECTOR_STOP)."""
    return await _collector(state, principal.username, ControlAction.COLLECTOR_STOP, {})


# ------------------------------------------------------------------ strategies and risk --


class StrategyPublic(BaseModel):
    """A strategy: as the signals stage announces it (`announced`), else one seen in the
    order history or halted through the api, of which only the id and halt are known."""

    strategy_id: str
    halted: bool
    announced: bool = Field(description="The signals stage announced it on `strategies`.")
    name: str | None = None
    account_id: str | None = None
    instruments: list[str] = Field(default_factory=list)
    params: dict[str, JsonValue] = Field(
        default_factory=dict, description="Effective parameters (Decimal values as strings)."
    )
    param_schema: dict[str, JsonValue] = Field(
        default_factory=dict, description="JSON Schema of the strategy's parameters."
    )
    state: StrategyState | None = None
    killed: bool = False
    fault: str | None = None
    last_error: str | None = Field(
        default=None, description="Why the last configuration was refused, if it was."
    )
    last_command_id: str | None = None
    config_version: int = 0
    instance: str | None = None
    ts_event: int | None = None


def _strategy_public(status: StrategyStatus) -> StrategyPublic:
    return StrategyPublic(
        strategy_id=status.strategy_id,
        halted=status.halted,
        announced=True,
        name=status.name,
        account_id=status.account_id,
        instruments=list(status.instruments),
        params=dict(status.params),
        param_schema=dict(status.param_schema),
        state=status.state,
        killed=status.killed,
        fault=status.fault,
        last_error=status.last_error,
        last_command_id=status.last_command_id,
        config_version=status.config_version,
        instance=status.instance,
        ts_event=status.ts_event,
    )


class CommandSent(BaseModel):
    """A control command on its way to every stage."""

    command_id: str
    action: ControlAction
    target: str


StrategyPath = Annotated[
    str, Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@/+=-]*$")
]


@router.get("/strategies", response_model=list[StrategyPublic], tags=["strategies"])
async def list_strategies(
    state: StateDep, _: Annotated[Principal, require(Role.READ_PORTFOLIO)]
) -> list[StrategyPublic]:
    """The strategies the signals stage runs (their parameters and state), plus strategies
    that placed orders or were halted through the api without being announced."""
    halted = await state.kv.set_members("halted")
    announced = {s.strategy_id: _strategy_public(s) for s in state.strategies.all()}
    others = (set(await state.store.strategy_ids()) | halted) - set(announced)
    unannounced = {
        s: StrategyPublic(strategy_id=s, halted=s in halted, announced=False) for s in others
    }
    merged = {**announced, **unannounced}
    return [merged[s] for s in sorted(merged)]


@router.get("/strategies/{strategy_id}", response_model=StrategyPublic, tags=["strategies"])
async def get_strategy(
    state: StateDep,
    strategy_id: StrategyPath,
    _: Annotated[Principal, require(Role.READ_PORTFOLIO)],
) -> StrategyPublic:
    """One strategy (404 if neither announced, nor in the orders, nor halted here)."""
    status_ = state.strategies.get(strategy_id)
    if status_ is not None:
        return _strategy_public(status_)
    halted = await state.kv.set_members("halted")
    if strategy_id in halted or strategy_id in await state.store.strategy_ids():
        return StrategyPublic(
            strategy_id=strategy_id, halted=strategy_id in halted, announced=False
        )
    raise _problem(404, f"UNKNOWN_STRATEGY: strategy_id={strategy_id}")


#: The largest parameter object sent to the signals stage (JSON characters).
MAX_PARAMS_JSON = 10_000


class StrategyConfig(BaseModel):
    """New parameters of a strategy: PATCH merges them onto the current ones, PUT replaces
    them (a parameter left out goes back to its default)."""

    model_config = ConfigDict(extra="forbid")

    params: dict[str, JsonValue] = Field(description="Parameter names and their JSON values.")
    reason: str = Field(default="", max_length=500)


class StrategyConfigured(BaseModel):
    """The outcome of a configuration: APPLIED (200) with the strategy as it now runs, or
    PENDING (202) when the signals stage did not answer within QM_STRATEGY_CONFIG_WAIT_S
    (then `GET /strategies/{id}` shows it once it does: `last_command_id`, `last_error`)."""

    command_id: str
    outcome: Literal["APPLIED", "PENDING"]
    strategy: StrategyPublic


async def _configure(
    state: ApiState,
    username: str,
    strategy_id: str,
    config: StrategyConfig,
    mode: Literal["merge", "replace"],
    response: Response,
) -> StrategyConfigured:
    current = state.strategies.get(strategy_id)
    if current is None:
        raise _problem(
            404, f"UNKNOWN_STRATEGY: strategy_id={strategy_id} (no signals stage announced it)"
        )
    if mode == "merge" and not config.params:
        raise _problem(422, "NO_PARAMETERS: give at least one parameter to change")
    problem = check_params(config.params, current.param_schema)
    if problem is not None:
        raise _problem(422, problem)
    encoded = json.dumps(config.params, separators=(",", ":"), allow_nan=False)
    if len(encoded) > MAX_PARAMS_JSON:
        raise _problem(422, f"PARAMS_TOO_LARGE: {len(encoded)} > {MAX_PARAMS_JSON} characters")
    command = _command(
        state,
        username,
        ControlAction.CONFIGURE_STRATEGY,
        strategy_id,
        config.reason,
        params=encoded,
        mode=mode,
    )
    answer = state.strategies.expect(command.command_id)
    await _publish(state, state.control_topic, command)
    status_ = await state.strategies.wait(
        command.command_id, answer, state.settings.strategy_config_wait_s
    )
    if status_ is None:
        response.status_code = status.HTTP_202_ACCEPTED
        return StrategyConfigured(
            command_id=command.command_id,
            outcome="PENDING",
            strategy=_strategy_public(state.strategies.get(strategy_id) or current),
        )
    if status_.last_error is not None:
        raise _problem(422, status_.last_error)
    return StrategyConfigured(
        command_id=command.command_id, outcome="APPLIED", strategy=_strategy_public(status_)
    )


_CONFIGURED_RESPONSES: dict[int | str, dict[str, Any]] = {
    202: {"model": StrategyConfigured, "description": "Sent; the stage has not answered yet."}
}


@router.patch(
    "/strategies/{strategy_id}",
    response_model=StrategyConfigured,
    responses=_CONFIGURED_RESPONSES,
    tags=["strategies"],
)
async def patch_strategy(
    state: StateDep,
    strategy_id: StrategyPath,
    config: StrategyConfig,
    response: Response,
    principal: Annotated[Principal, require(Role.MANAGE_STRATEGIES)],
) -> StrategyConfigured:
    """Change some parameters (control CONFIGURE_STRATEGY, merged onto the current ones);
    the strategy's own parameter model in the signals stage validates them: 422 with its
    reason if it refuses them."""
    return await _configure(state, principal.username, strategy_id, config, "merge", response)


@router.put(
    "/strategies/{strategy_id}",
    response_model=StrategyConfigured,
    responses=_CONFIGURED_RESPONSES,
    tags=["strategies"],
)
async def put_strategy(
    state: StateDep,
    strategy_id: StrategyPath,
    config: StrategyConfig,
    response: Response,
    principal: Annotated[Principal, require(Role.MANAGE_STRATEGIES)],
) -> StrategyConfigured:
    """Replace every parameter (those left out take their defaults); as PATCH otherwise."""
    return await _configure(state, principal.username, strategy_id, config, "replace", response)


async def _control(
    state: ApiState, username: str, action: ControlAction, target: str, reason: str = ""
) -> CommandSent:
    command = _command(state, username, action, target, reason)
    await _publish(state, state.control_topic, command)
    return CommandSent(command_id=command.command_id, action=action, target=target)


@router.post(
    "/strategies/{strategy_id}/halt",
    response_model=CommandSent,
    status_code=status.HTTP_202_ACCEPTED,
    tags=["strategies"],
)
async def halt_strategy(
    state: StateDep,
    strategy_id: StrategyPath,
    principal: Annotated[Principal, require(Role.MANAGE_STRATEGIES)],
) -> CommandSent:
    """Halt a strategy (control HALT_STRATEGY)."""
    sent = await _control(state, principal.username, ControlAction.HALT_STRATEGY, strategy_id)
    await state.kv.set_add("halted", strategy_id)
    return sent


@router.post(
    "/strategies/{strategy_id}/resume",
    response_model=CommandSent,
    status_code=status.HTTP_202_ACCEPTED,
    tags=["strategies"],
)
async def resume_strategy(
    state: StateDep,
    strategy_id: StrategyPath,
    principal: Annotated[Principal, require(Role.MANAGE_STRATEGIES)],
) -> CommandSent:
    """Resume a halted strategy (control RESUME_STRATEGY)."""
    sent = await _control(state, principal.username, ControlAction.RESUME_STRATEGY, strategy_id)
    await state.kv.set_remove("halted", strategy_id)
    return sent


class RiskLimitsPublic(BaseModel):
    """The limits risk applies to an account (`*`: the default), its kill switch and breaker.

    Decimal values are strings. `from_default`: the account has no status of its own (risk
    knows nothing particular of it), so the default's limits and kill switch apply."""

    account_id: str
    from_default: bool = False
    configured: bool
    limits: dict[str, JsonValue]
    kill_switch: bool
    kill_switch_targets: list[str]
    breaker_tripped: bool
    breaker_cause: str | None
    breaker_details: dict[str, str]
    breaker_ts_ns: int | None
    opening_equity: str | None
    base_currency: str | None
    ts_event: int


def _risk_public(status_: RiskLimitsStatus, account_id: str | None = None) -> RiskLimitsPublic:
    own = account_id is None or account_id == status_.account_id
    kill = status_.kill_switch or (not own and account_id in status_.kill_switch_targets)
    opening = status_.opening_equity
    return RiskLimitsPublic(
        account_id=status_.account_id if own else str(account_id),
        from_default=not own,
        configured=status_.configured if own else False,
        limits=dict(status_.limits),
        kill_switch=kill,
        kill_switch_targets=list(status_.kill_switch_targets),
        breaker_tripped=status_.breaker_tripped,
        breaker_cause=status_.breaker_cause,
        breaker_details=dict(status_.breaker_details),
        breaker_ts_ns=status_.breaker_ts_ns,
        opening_equity=str(opening) if opening is not None else None,
        base_currency=status_.base_currency,
        ts_event=status_.ts_event,
    )


@router.get("/risk/limits", response_model=list[RiskLimitsPublic], tags=["risk"])
async def list_risk_limits(
    state: StateDep, _: Annotated[Principal, require(Role.ADMIN)]
) -> list[RiskLimitsPublic]:
    """Every account's limits as the risk stage publishes them, the default (`*`) first."""
    return [_risk_public(s) for s in state.risk_limits.all()]


@router.get("/accounts/{account_id}/risk-limits", response_model=RiskLimitsPublic, tags=["risk"])
async def get_account_risk_limits(
    state: StateDep,
    account_id: AccountIdPath,
    principal: Annotated[Principal, require(Role.READ_PORTFOLIO)],
) -> RiskLimitsPublic:
    """The limits, kill switch and circuit breaker risk applies to one of the caller's accounts."""
    await _owned(state, principal.user_id, account_id)
    own = state.risk_limits.get(account_id)
    if own is not None:
        return _risk_public(own)
    default = state.risk_limits.get("*")
    if default is None:
        raise _problem(404, "RISK_LIMITS_UNKNOWN: the risk stage has published no limits")
    return _risk_public(default, account_id)


class KillSwitch(BaseModel):
    """Engage or release the kill switch for everything ('*'), an account or a strategy."""

    engaged: bool
    target: Identifier | Literal["*"] = "*"
    reason: str = Field(default="", max_length=500)


class BreakerReset(BaseModel):
    """The account whose circuit breaker to reset."""

    account_id: Identifier
    reason: str = Field(default="", max_length=500)


@router.post(
    "/risk/kill-switch",
    response_model=CommandSent,
    status_code=status.HTTP_202_ACCEPTED,
    tags=["risk"],
)
async def kill_switch(
    state: StateDep, body: KillSwitch, principal: Annotated[Principal, require(Role.ADMIN)]
) -> CommandSent:
    """Engage (KILL_SWITCH_ON) or release (KILL_SWITCH_OFF) the kill switch (ADMIN)."""
    action = ControlAction.KILL_SWITCH_ON if body.engaged else ControlAction.KILL_SWITCH_OFF
    return await _control(state, principal.username, action, body.target, body.reason)


@router.post(
    "/risk/circuit-breaker/reset",
    response_model=CommandSent,
    status_code=status.HTTP_202_ACCEPTED,
    tags=["risk"],
)
async def reset_circuit_breaker(
    state: StateDep, body: BreakerReset, principal: Annotated[Principal, require(Role.ADMIN)]
) -> CommandSent:
    """Reset an account's circuit breaker (control RESET_CIRCUIT_BREAKER, ADMIN)."""
    return await _control(
        state, principal.username, ControlAction.RESET_CIRCUIT_BREAKER, body.account_id, body.reason
    )

"""Where the api keeps users, keys, refresh tokens and accounts, and reads orders and bars.

`PostgresApiStore` runs on the V0001 and V0010 tables with parameterised SQL only;
`MemoryApiStore` keeps the same contract in dicts (unit tests, and a development run without
QM_DATABASE_URL, where everything is lost on exit).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any, Protocol

from quantmesh_api.security import Role
from quantmesh_common.messages import ExecutionReport, Order


class ConflictError(ValueError):
    """The thing to create exists already (a username, an account id)."""


@dataclass(frozen=True, slots=True)
class User:
    """A person or program that logs in."""

    user_id: str
    username: str
    password_hash: str
    roles: frozenset[Role]
    active: bool = True


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A key for programs: scoped to a subset of its owner's roles."""

    key_id: str
    user_id: str
    name: str
    secret_sha256: str
    scopes: frozenset[Role]
    revoked: bool = False


@dataclass(frozen=True, slots=True)
class RefreshToken:
    """One refresh token of a rotation family."""

    token_id: str
    family_id: str
    user_id: str
    secret_sha256: str
    ts_expires: int
    replaced_by: str | None = None
    revoked: bool = False


@dataclass(frozen=True, slots=True)
class Account:
    """A trading account owned by one user."""

    account_id: str
    user_id: str
    name: str
    venue: str
    base_currency: str
    mode: str
    starting_capital: Decimal
    ts_created: int


@dataclass(frozen=True, slots=True)
class TradeRow:
    """One fill as the OMS recorded it."""

    client_order_id: str
    instrument_id: str
    side: str
    quantity: Decimal
    price: Decimal
    trade_id: str
    ts_event: int


class ApiStore(Protocol):
    """The api's persistence; every method is safe to call concurrently."""

    async def create_user(self, user: User) -> None: ...
    async def get_user(self, user_id: str) -> User | None: ...
    async def get_user_by_name(self, username: str) -> User | None: ...
    async def list_users(self) -> list[User]: ...
    async def create_api_key(self, key: ApiKey) -> None: ...
    async def get_api_key(self, key_id: str) -> ApiKey | None: ...
    async def list_api_keys(self, user_id: str) -> list[ApiKey]: ...
    async def revoke_api_key(self, user_id: str, key_id: str) -> bool: ...
    async def add_refresh_token(self, token: RefreshToken) -> None: ...
    async def get_refresh_token(self, token_id: str) -> RefreshToken | None: ...
    async def rotate_refresh_token(self, old_id: str, new: RefreshToken) -> bool: ...
    async def revoke_refresh_family(self, family_id: str) -> None: ...
    async def create_account(self, account: Account) -> None: ...
    async def get_account(self, account_id: str) -> Account | None: ...
    async def list_accounts(self, user_id: str) -> list[Account]: ...
    async def list_orders(
        self, account_id: str, *, open_only: bool, limit: int
    ) -> list[dict[str, Any]]: ...
    async def get_order(self, account_id: str, client_order_id: str) -> dict[str, Any] | None: ...
    async def list_trades(self, account_id: str, *, limit: int) -> list[TradeRow]: ...
    async def list_bars(
        self, instrument_id: str, interval: str, start_ns: int, end_ns: int, limit: int
    ) -> list[dict[str, Any]]: ...
    async def strategy_ids(self) -> list[str]: ...
    async def latest_performance(
        self, account_id: str, strategy_id: str = ""
    ) -> dict[str, Any] | None: ...
    async def strategy_performances(self, account_id: str) -> list[dict[str, Any]]: ...


OPEN_STATUSES = ["INITIALIZED", "SUBMITTED", "ACCEPTED", "PARTIALLY_FILLED", "CANCEL_PENDING"]

_ORDER_COLUMNS = (
    "client_order_id, venue_order_id, account_id, strategy_id, instrument_id, side, order_type, "
    "quantity, filled_quantity, avg_fill_price, limit_price, stop_price, time_in_force, "
    "reduce_only, status, reason, tag, ts_init, ts_last"
)


def _user(row: Any) -> User:
    return User(
        row["user_id"],
        row["username"],
        row["password_hash"],
        frozenset(Role(r) for r in row["roles"]),
        row["active"],
    )


def _key(row: Any) -> ApiKey:
    return ApiKey(
        row["key_id"],
        row["user_id"],
        row["name"],
        row["secret_sha256"],
        frozenset(Role(r) for r in row["scopes"]),
        row["revoked"],
    )


def _refresh(row: Any) -> RefreshToken:
    return RefreshToken(
        row["token_id"],
        row["family_id"],
        row["user_id"],
        row["secret_sha256"],
        row["ts_expires"],
        row["replaced_by"],
        row["revoked"],
    )


def _account(row: Any) -> Account:
    return Account(
        row["account_id"],
        row["user_id"],
        row["name"],
        row["venue"] or "",
        row["base_currency"],
        row["mode"],
        row["starting_capital"],
        row["ts_created"],
    )


_ACCOUNT_SELECT = (
    "SELECT a.account_id, o.user_id, a.name, a.venue, a.base_currency, a.mode, "
    "o.starting_capital, o.ts_created FROM accounts a "
    "JOIN api_account_owners o ON o.account_id = a.account_id"
)


class PostgresApiStore:
    """ApiStore on an asyncpg pool."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def create_user(self, user: User) -> None:
        import asyncpg

        try:
            await self.pool.execute(
                "INSERT INTO api_users (user_id, username, password_hash, roles, active) "
                "VALUES ($1, $2, $3, $4, $5)",
                user.user_id,
                user.username,
                user.password_hash,
                sorted(user.roles),
                user.active,
            )
        except asyncpg.UniqueViolationError:
            raise ConflictError(f"username {user.username!r} is taken") from None

    async def get_user(self, user_id: str) -> User | None:
        row = await self.pool.fetchrow("SELECT * FROM api_users WHERE user_id = $1", user_id)
        return _user(row) if row else None

    async def get_user_by_name(self, username: str) -> User | None:
        row = await self.pool.fetchrow("SELECT * FROM api_users WHERE username = $1", username)
        return _user(row) if row else None

    async def list_users(self) -> list[User]:
        rows = await self.pool.fetch("SELECT * FROM api_users ORDER BY username")
        return [_user(r) for r in rows]

    async def create_api_key(self, key: ApiKey) -> None:
        await self.pool.execute(
            "INSERT INTO api_keys (key_id, user_id, name, secret_sha256, scopes) "
            "VALUES ($1, $2, $3, $4, $5)",
            key.key_id,
            key.user_id,
            key.name,
            key.secret_sha256,
            sorted(key.scopes),
        )

    async def get_api_key(self, key_id: str) -> ApiKey | None:
        row = await self.pool.fetchrow("SELECT * FROM api_keys WHERE key_id = $1", key_id)
        return _key(row) if row else None

    async def list_api_keys(self, user_id: str) -> list[ApiKey]:
        rows = await self.pool.fetch(
            "SELECT * FROM api_keys WHERE user_id = $1 ORDER BY ts_created", user_id
        )
        return [_key(r) for r in rows]

    async def revoke_api_key(self, user_id: str, key_id: str) -> bool:
        status = await self.pool.execute(
            "UPDATE api_keys SET revoked = true WHERE key_id = $1 AND user_id = $2",
            key_id,
            user_id,
        )
        return str(status).endswith(" 1")

    async def add_refresh_token(self, token: RefreshToken) -> None:
        await self.pool.execute(
            "INSERT INTO api_refresh_tokens (token_id, family_id, user_id, secret_sha256, "
            "ts_expires) VALUES ($1, $2, $3, $4, $5)",
            token.token_id,
            token.family_id,
            token.user_id,
            token.secret_sha256,
            token.ts_expires,
        )

    async def get_refresh_token(self, token_id: str) -> RefreshToken | None:
        row = await self.pool.fetchrow(
            "SELECT * FROM api_refresh_tokens WHERE token_id = $1", token_id
        )
        return _refresh(row) if row else None

    async def rotate_refresh_token(self, old_id: str, new: RefreshToken) -> bool:
        async with self.pool.acquire() as conn, conn.transaction():
            # The conditional update is the lock: of two concurrent uses, one rotates.
            status = await conn.execute(
                "UPDATE api_refresh_tokens SET replaced_by = $2 "
                "WHERE token_id = $1 AND replaced_by IS NULL AND NOT revoked",
                old_id,
                new.token_id,
            )
            if not str(status).endswith(" 1"):
                return False
            await conn.execute(
                "INSERT INTO api_refresh_tokens (token_id, family_id, user_id, secret_sha256, "
                "ts_expires) VALUES ($1, $2, $3, $4, $5)",
                new.token_id,
                new.family_id,
                new.user_id,
                new.secret_sha256,
                new.ts_expires,
            )
            return True

    async def revoke_refresh_family(self, family_id: str) -> None:
        await self.pool.execute(
            "UPDATE api_refresh_tokens SET revoked = true WHERE family_id = $1", family_id
        )

    async def create_account(self, account: Account) -> None:
        import asyncpg

        try:
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "INSERT INTO accounts (account_id, name, venue, base_currency, mode) "
                    "VALUES ($1, $2, $3, $4, $5)",
                    account.account_id,
                    account.name,
                    account.venue,
                    account.base_currency,
                    account.mode,
                )
                await conn.execute(
                    "INSERT INTO api_account_owners (account_id, user_id, starting_capital, "
                    "ts_created) VALUES ($1, $2, $3, $4)",
                    account.account_id,
                    account.user_id,
                    account.starting_capital,
                    account.ts_created,
                )
        except asyncpg.UniqueViolationError:
            raise ConflictError(f"account {account.account_id!r} exists") from None

    async def get_account(self, account_id: str) -> Account | None:
        row = await self.pool.fetchrow(_ACCOUNT_SELECT + " WHERE a.account_id = $1", account_id)
        return _account(row) if row else None

    async def list_accounts(self, user_id: str) -> list[Account]:
        rows = await self.pool.fetch(
            _ACCOUNT_SELECT + " WHERE o.user_id = $1 ORDER BY o.ts_created", user_id
        )
        return [_account(r) for r in rows]

    async def list_orders(
        self, account_id: str, *, open_only: bool, limit: int
    ) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            f"SELECT {_ORDER_COLUMNS} FROM orders WHERE account_id = $1 "
            "AND (NOT $2 OR status = ANY($3::text[])) ORDER BY ts_init DESC LIMIT $4",
            account_id,
            open_only,
            OPEN_STATUSES,
            limit,
        )
        return [dict(r) for r in rows]

    async def get_order(self, account_id: str, client_order_id: str) -> dict[str, Any] | None:
        row = await self.pool.fetchrow(
            f"SELECT {_ORDER_COLUMNS} FROM orders WHERE account_id = $1 AND client_order_id = $2",
            account_id,
            client_order_id,
        )
        return dict(row) if row else None

    async def list_trades(self, account_id: str, *, limit: int) -> list[TradeRow]:
        rows = await self.pool.fetch(
            "SELECT e.client_order_id, o.instrument_id, o.side, e.payload, e.ts_event "
            "FROM order_events e JOIN orders o ON o.client_order_id = e.client_order_id "
            "WHERE e.account_id = $1 AND e.payload ? 'trade_id' "
            "ORDER BY e.ts_event DESC LIMIT $2",
            account_id,
            limit,
        )
        return [
            TradeRow(
                r["client_order_id"],
                r["instrument_id"],
                r["side"],
                Decimal(r["payload"]["last_qty"]),
                Decimal(r["payload"]["last_price"]),
                r["payload"]["trade_id"],
                r["ts_event"],
            )
            for r in rows
        ]

    async def list_bars(
        self, instrument_id: str, interval: str, start_ns: int, end_ns: int, limit: int
    ) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            "SELECT ts_open, ts_close, open, high, low, close, volume, trades FROM bars "
            "WHERE instrument_id = $1 AND interval = $2 AND ts_open >= $3 AND ts_open < $4 "
            "ORDER BY ts_open LIMIT $5",
            instrument_id,
            interval,
            start_ns,
            end_ns,
            limit,
        )
        return [dict(r) for r in rows]

    async def strategy_ids(self) -> list[str]:
        rows = await self.pool.fetch("SELECT DISTINCT strategy_id FROM orders ORDER BY 1")
        return [r["strategy_id"] for r in rows]

    async def latest_performance(
        self, account_id: str, strategy_id: str = ""
    ) -> dict[str, Any] | None:
        """The latest PerformanceReport (V0017 `portfolio_performance`) of the account, or of
        one strategy's trading in it, as JSON."""
        report = await self.pool.fetchval(
            "SELECT report FROM portfolio_performance WHERE account_id = $1 AND strategy_id = $2"
            " ORDER BY ts_event DESC LIMIT 1",
            account_id,
            strategy_id,
        )
        if report is None:
            return None
        return _json_object(report)

    async def strategy_performances(self, account_id: str) -> list[dict[str, Any]]:
        """The latest report of each strategy that traded in the account, by strategy id."""
        rows = await self.pool.fetch(
            "SELECT DISTINCT ON (strategy_id) report FROM portfolio_performance"
            " WHERE account_id = $1 AND strategy_id <> ''"
            " ORDER BY strategy_id, ts_event DESC",
            account_id,
        )
        return [_json_object(r["report"]) for r in rows]


@dataclass
class MemoryApiStore:
    """ApiStore in dicts; `orders`, `trades` and `bars` are filled by tests, and `orders` and
    `trades` by `record_order` / `record_fill` where no OMS stores them (the embedded run)."""

    users: dict[str, User] = field(default_factory=dict)
    keys: dict[str, ApiKey] = field(default_factory=dict)
    refresh: dict[str, RefreshToken] = field(default_factory=dict)
    accounts: dict[str, Account] = field(default_factory=dict)
    orders: list[dict[str, Any]] = field(default_factory=list)
    trades: dict[str, list[TradeRow]] = field(default_factory=dict)
    bars: list[dict[str, Any]] = field(default_factory=list)
    #: The latest PerformanceReport JSON per account.
    performance: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: (account id, strategy id) -> the strategy's latest report in that account.
    strategy_performance: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    #: client_order_id -> its row in `orders`, for the rows `record_order` keeps.
    _order_rows: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    #: (account_id, trade_id) of every fill `record_fill` kept.
    _trade_keys: set[tuple[str, str]] = field(default_factory=set, repr=False)

    def record_order(self, order: Order) -> None:
        """Keep an order state as the OMS's `orders` row would (the newest by ts_last wins)."""
        row = self._order_rows.get(order.client_order_id)
        if row is not None and row["ts_last"] > order.ts_last:
            return
        fields = {
            "client_order_id": order.client_order_id,
            "venue_order_id": order.venue_order_id,
            "account_id": order.account_id,
            "strategy_id": order.strategy_id,
            "instrument_id": order.instrument_id,
            "side": order.side.value,
            "order_type": order.order_type.value,
            "quantity": order.quantity,
            "filled_quantity": order.filled_quantity,
            "avg_fill_price": order.avg_fill_price,
            "limit_price": order.limit_price,
            "stop_price": order.stop_price,
            "time_in_force": order.time_in_force.value,
            "reduce_only": order.reduce_only,
            "status": order.status.value,
            "reason": order.reason,
            "tag": order.tag,
            "ts_init": order.ts_init,
            "ts_last": order.ts_last,
        }
        if row is None:
            self._order_rows[order.client_order_id] = fields
            self.orders.append(fields)
        else:
            row.update(fields)

    def record_fill(self, report: ExecutionReport) -> None:
        """Keep a fill as the OMS's `order_events` row would give it; other reports are ignored.

        A redelivered fill (the same account and trade id) is kept once.
        """
        if not report.exec_type.is_fill or report.last_price is None or report.trade_id is None:
            return
        key = (report.account_id, report.trade_id)
        if key in self._trade_keys:
            return
        self._trade_keys.add(key)
        self.trades.setdefault(report.account_id, []).append(
            TradeRow(
                report.client_order_id,
                report.instrument_id,
                report.side.value,
                report.last_qty,
                report.last_price,
                report.trade_id,
                report.ts_event,
            )
        )

    async def create_user(self, user: User) -> None:
        if any(u.username == user.username for u in self.users.values()):
            raise ConflictError(f"username {user.username!r} is taken")
        self.users[user.user_id] = user

    async def get_user(self, user_id: str) -> User | None:
        return self.users.get(user_id)

    async def get_user_by_name(self, username: str) -> User | None:
        return next((u for u in self.users.values() if u.username == username), None)

    async def list_users(self) -> list[User]:
        return sorted(self.users.values(), key=lambda u: u.username)

    async def create_api_key(self, key: ApiKey) -> None:
        self.keys[key.key_id] = key

    async def get_api_key(self, key_id: str) -> ApiKey | None:
        return self.keys.get(key_id)

    async def list_api_keys(self, user_id: str) -> list[ApiKey]:
        return [k for k in self.keys.values() if k.user_id == user_id]

    async def revoke_api_key(self, user_id: str, key_id: str) -> bool:
        key = self.keys.get(key_id)
        if key is None or key.user_id != user_id:
            return False
        self.keys[key_id] = replace(key, revoked=True)
        return True

    async def add_refresh_token(self, token: RefreshToken) -> None:
        self.refresh[token.token_id] = token

    async def get_refresh_token(self, token_id: str) -> RefreshToken | None:
        return self.refresh.get(token_id)

    async def rotate_refresh_token(self, old_id: str, new: RefreshToken) -> bool:
        old = self.refresh.get(old_id)
        if old is None or old.replaced_by is not None or old.revoked:
            return False
        self.refresh[old_id] = replace(old, replaced_by=new.token_id)
        self.refresh[new.token_id] = new
        return True

    async def revoke_refresh_family(self, family_id: str) -> None:
        for token_id, token in list(self.refresh.items()):
            if token.family_id == family_id:
                self.refresh[token_id] = replace(token, revoked=True)

    async def create_account(self, account: Account) -> None:
        if account.account_id in self.accounts:
            raise ConflictError(f"account {account.account_id!r} exists")
        self.accounts[account.account_id] = account

    async def get_account(self, account_id: str) -> Account | None:
        return self.accounts.get(account_id)

    async def list_accounts(self, user_id: str) -> list[Account]:
        return [a for a in self.accounts.values() if a.user_id == user_id]

    async def list_orders(
        self, account_id: str, *, open_only: bool, limit: int
    ) -> list[dict[str, Any]]:
        rows = [
            o
            for o in self.orders
            if o["account_id"] == account_id and (not open_only or o["status"] in OPEN_STATUSES)
        ]
        return sorted(rows, key=lambda o: -int(o["ts_init"]))[:limit]

    async def get_order(self, account_id: str, client_order_id: str) -> dict[str, Any] | None:
        return next(
            (
                o
                for o in self.orders
                if o["account_id"] == account_id and o["client_order_id"] == client_order_id
            ),
            None,
        )

    async def list_trades(self, account_id: str, *, limit: int) -> list[TradeRow]:
        return sorted(self.trades.get(account_id, []), key=lambda t: -t.ts_event)[:limit]

    async def list_bars(
        self, instrument_id: str, interval: str, start_ns: int, end_ns: int, limit: int
    ) -> list[dict[str, Any]]:
        rows = [
            b
            for b in self.bars
            if b["instrument_id"] == instrument_id
            and b["interval"] == interval
            and start_ns <= b["ts_open"] < end_ns
        ]
        return sorted(rows, key=lambda b: int(b["ts_open"]))[:limit]

    async def strategy_ids(self) -> list[str]:
        return sorted({str(o["strategy_id"]) for o in self.orders})

    async def latest_performance(
        self, account_id: str, strategy_id: str = ""
    ) -> dict[str, Any] | None:
        if strategy_id:
            return self.strategy_performance.get((account_id, strategy_id))
        return self.performance.get(account_id)

    async def strategy_performances(self, account_id: str) -> list[dict[str, Any]]:
        return [r for (a, _), r in sorted(self.strategy_performance.items()) if a == account_id]


def _json_object(value: Any) -> dict[str, Any]:
    # Without a jsonb codec on the pool, asyncpg hands the JSON over as text.
    return dict(json.loads(value) if isinstance(value, str) else value)

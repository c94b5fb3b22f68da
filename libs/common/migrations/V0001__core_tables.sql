-- Core tables of quantmesh: reference data, market data, orders, fills, positions, equity.
--
-- Conventions (they hold for every table here and should for every later migration):
--
-- * Time is bigint UTC nanoseconds since the Unix epoch, in columns named ts_*. That is the
--   wire format (every event carries ts_event / ts_init as ns ints), so a row round-trips
--   without loss; timestamptz keeps only microseconds, and venue timestamps and dedup keys
--   (ticks, fills) must compare bit-exactly. TimescaleDB partitions integer time columns just
--   as well (V0002). Read them as dates with qm_ns_to_timestamptz(ts).
-- * Money, prices, quantities and fees are NUMERIC without precision: exact decimals of any
--   scale, matching the Decimals on the wire; never float.
-- * Enumerations are upper-case text with CHECK constraints mirroring quantmesh_common.messages
--   (adding a value there means a migration widening the CHECK here).
-- * Time-series tables (ticks, bars, fills, equity_snapshots) have no key without their time
--   column, because TimescaleDB requires the partitioning column in every unique index.
-- * No foreign keys from the high-volume tables: ingestion must not depend on the order in
--   which different stages write reference data.

CREATE OR REPLACE FUNCTION qm_ns_to_timestamptz(ns bigint) RETURNS timestamptz
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    -- Whole seconds through to_timestamp, the rest as an exact interval: no float rounding.
    AS $$ SELECT to_timestamp(ns / 1000000000) + (ns % 1000000000 / 1000) * interval '1 microsecond' $$;

CREATE OR REPLACE FUNCTION qm_timestamptz_to_ns(ts timestamptz) RETURNS bigint
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT (extract(epoch FROM ts) * 1000000000)::bigint $$;

-- The "now" of integer-time hypertables (TimescaleDB's set_integer_now_func, in V0002).
CREATE OR REPLACE FUNCTION qm_now_ns() RETURNS bigint
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT (extract(epoch FROM now()) * 1000000000)::bigint $$;

-- ------------------------------------------------------------------ reference data --

CREATE TABLE accounts (
    account_id      text        PRIMARY KEY,
    name            text        NOT NULL DEFAULT '',
    venue           text,
    base_currency   text        NOT NULL,
    mode            text        NOT NULL DEFAULT 'PAPER'
                                CHECK (mode IN ('PAPER', 'LIVE', 'BACKTEST')),
    status          text        NOT NULL DEFAULT 'ACTIVE'
                                CHECK (status IN ('ACTIVE', 'DISABLED')),
    ts_created      bigint      NOT NULL DEFAULT qm_now_ns(),
    ts_updated      bigint      NOT NULL DEFAULT qm_now_ns()
);

CREATE TABLE instruments (
    instrument_id   text        PRIMARY KEY,          -- <BASE>-<QUOTE>.<VENUE>
    venue           text        NOT NULL,
    symbol          text        NOT NULL,             -- the venue's own symbol
    base            text        NOT NULL,
    quote           text        NOT NULL,
    tick_size       numeric     NOT NULL CHECK (tick_size > 0),
    lot_size        numeric     NOT NULL CHECK (lot_size > 0),
    min_notional    numeric     NOT NULL DEFAULT 0 CHECK (min_notional >= 0),
    min_quantity    numeric     CHECK (min_quantity > 0),
    max_quantity    numeric     CHECK (max_quantity > 0),
    maker_fee       numeric,
    taker_fee       numeric,
    active          boolean     NOT NULL DEFAULT true,
    ts_updated      bigint      NOT NULL DEFAULT qm_now_ns(),
    UNIQUE (venue, symbol)
);

-- --------------------------------------------------------------------- market data --

CREATE TABLE ticks (
    venue           text        NOT NULL,
    instrument_id   text        NOT NULL,
    ts_event        bigint      NOT NULL,             -- venue time
    ts_init         bigint      NOT NULL,             -- when quantmesh received it
    kind            text        NOT NULL DEFAULT 'TRADE' CHECK (kind IN ('TRADE', 'QUOTE')),
    price           numeric     NOT NULL CHECK (price > 0),
    size            numeric     NOT NULL CHECK (size >= 0),
    aggressor_side  text        NOT NULL DEFAULT 'NO_AGGRESSOR'
                                CHECK (aggressor_side IN ('BUYER', 'SELLER', 'NO_AGGRESSOR')),
    trade_id        text,                             -- NULL for quotes
    bid             numeric     CHECK (bid > 0),
    ask             numeric     CHECK (ask > 0),
    bid_size        numeric     CHECK (bid_size >= 0),
    ask_size        numeric     CHECK (ask_size >= 0),
    -- A replayed or re-collected trade is stored once. Quotes (trade_id NULL) are not
    -- deduplicated: NULLs are distinct.
    CONSTRAINT ticks_dedup UNIQUE (venue, instrument_id, ts_event, trade_id)
);
CREATE INDEX ticks_instrument_ts ON ticks (instrument_id, ts_event DESC);

CREATE TABLE bars (
    instrument_id   text        NOT NULL,
    interval        text        NOT NULL,             -- '1m', '5m', '1h', '1d'
    ts_open         bigint      NOT NULL,             -- inclusive
    ts_close        bigint      NOT NULL,             -- exclusive
    open            numeric     NOT NULL CHECK (open > 0),
    high            numeric     NOT NULL CHECK (high > 0),
    low             numeric     NOT NULL CHECK (low > 0),
    close           numeric     NOT NULL CHECK (close > 0),
    volume          numeric     NOT NULL CHECK (volume >= 0),
    trades          integer     CHECK (trades >= 0),
    PRIMARY KEY (instrument_id, interval, ts_open),
    CHECK (ts_close > ts_open),
    CHECK (low <= high AND low <= open AND low <= close AND high >= open AND high >= close)
);

-- -------------------------------------------------------------------------- orders --

CREATE TABLE orders (
    client_order_id text        PRIMARY KEY,          -- at most one venue order per id
    venue_order_id  text,
    account_id      text        NOT NULL,
    strategy_id     text        NOT NULL,
    instrument_id   text        NOT NULL,
    venue           text        NOT NULL,
    intent_id       text,
    parent_order_id text,                             -- the TWAP/VWAP parent of a child order
    side            text        NOT NULL CHECK (side IN ('BUY', 'SELL')),
    order_type      text        NOT NULL
                                CHECK (order_type IN ('MARKET', 'LIMIT', 'STOP', 'STOP_LIMIT')),
    quantity        numeric     NOT NULL CHECK (quantity > 0),
    filled_quantity numeric     NOT NULL DEFAULT 0 CHECK (filled_quantity >= 0),
    avg_fill_price  numeric     CHECK (avg_fill_price > 0),
    limit_price     numeric     CHECK (limit_price > 0),
    stop_price      numeric     CHECK (stop_price > 0),
    time_in_force   text        NOT NULL DEFAULT 'GTC'
                                CHECK (time_in_force IN ('GTC', 'IOC', 'FOK', 'GTD')),
    expire_time_ns  bigint,
    post_only       boolean     NOT NULL DEFAULT false,
    reduce_only     boolean     NOT NULL DEFAULT false,
    status          text        NOT NULL CHECK (status IN (
                        'INITIALIZED', 'DENIED', 'SUBMITTED', 'ACCEPTED', 'PARTIALLY_FILLED',
                        'FILLED', 'CANCEL_PENDING', 'CANCELED', 'REJECTED', 'EXPIRED')),
    reason          text,
    tag             text        NOT NULL DEFAULT '',
    correlation_id  text,
    ts_init         bigint      NOT NULL,
    ts_last         bigint      NOT NULL,
    CHECK (filled_quantity <= quantity),
    CHECK (ts_last >= ts_init)
);
CREATE UNIQUE INDEX orders_venue_order_id ON orders (venue, venue_order_id)
    WHERE venue_order_id IS NOT NULL;
CREATE INDEX orders_account_open ON orders (account_id, instrument_id)
    WHERE status IN ('INITIALIZED', 'SUBMITTED', 'ACCEPTED', 'PARTIALLY_FILLED', 'CANCEL_PENDING');
CREATE INDEX orders_parent ON orders (parent_order_id) WHERE parent_order_id IS NOT NULL;

-- Every state change of an order, in the order the OMS applied them (its audit trail).
CREATE TABLE order_events (
    event_id        text        PRIMARY KEY,          -- the envelope's event id: idempotent
    client_order_id text        NOT NULL,
    account_id      text        NOT NULL,
    event_type      text        NOT NULL,             -- e.g. SUBMITTED, ACCEPTED, FILL
    status          text        NOT NULL,             -- the order's status after the event
    correlation_id  text,
    causation_id    text,
    payload         jsonb       NOT NULL DEFAULT '{}', -- decimals as strings, as on the wire
    ts_event        bigint      NOT NULL,
    ts_init         bigint      NOT NULL
);
CREATE INDEX order_events_order ON order_events (client_order_id, ts_event);

-- --------------------------------------------------------------------------- fills --

CREATE TABLE fills (
    report_id       text        NOT NULL,             -- the execution report's id
    account_id      text        NOT NULL,
    venue           text        NOT NULL,
    trade_id        text        NOT NULL,             -- the venue's trade id
    client_order_id text        NOT NULL,
    venue_order_id  text,
    strategy_id     text,
    instrument_id   text        NOT NULL,
    side            text        NOT NULL CHECK (side IN ('BUY', 'SELL')),
    quantity        numeric     NOT NULL CHECK (quantity > 0),
    price           numeric     NOT NULL CHECK (price > 0),
    fee             numeric     NOT NULL DEFAULT 0,   -- negative is a rebate
    fee_currency    text,
    liquidity_side  text        NOT NULL DEFAULT 'NONE'
                                CHECK (liquidity_side IN ('MAKER', 'TAKER', 'NONE')),
    ts_event        bigint      NOT NULL,             -- venue time of the fill
    ts_init         bigint      NOT NULL,
    -- A fill is stored once per account and venue trade. ts_event is in the key because
    -- TimescaleDB demands the time column in unique indexes; a redelivered report carries the
    -- same venue timestamp, so duplicates still collide.
    CONSTRAINT fills_dedup UNIQUE (account_id, venue, trade_id, ts_event)
);
CREATE INDEX fills_order ON fills (client_order_id);
CREATE INDEX fills_account_ts ON fills (account_id, ts_event DESC);

-- ---------------------------------------------------------------------- portfolio --

CREATE TABLE positions (
    account_id      text        NOT NULL,
    instrument_id   text        NOT NULL,
    side            text        NOT NULL CHECK (side IN ('LONG', 'SHORT', 'FLAT')),
    quantity        numeric     NOT NULL DEFAULT 0,   -- signed: > 0 long, < 0 short
    avg_entry_price numeric     NOT NULL DEFAULT 0 CHECK (avg_entry_price >= 0),
    realized_pnl    numeric     NOT NULL DEFAULT 0,
    unrealized_pnl  numeric     NOT NULL DEFAULT 0,
    fees            numeric     NOT NULL DEFAULT 0,
    last_price      numeric     CHECK (last_price > 0),
    version         bigint      NOT NULL DEFAULT 0,   -- bumped on every update (optimistic lock)
    ts_event        bigint      NOT NULL,             -- the fill or mark that last changed it
    ts_updated      bigint      NOT NULL DEFAULT qm_now_ns(),
    PRIMARY KEY (account_id, instrument_id),
    CHECK ((side = 'FLAT') = (quantity = 0)),
    CHECK ((side = 'LONG') = (quantity > 0))
);

CREATE TABLE equity_snapshots (
    account_id      text        NOT NULL,
    ts_event        bigint      NOT NULL,
    base_currency   text        NOT NULL,
    equity          numeric     NOT NULL,
    realized_pnl    numeric     NOT NULL DEFAULT 0,
    unrealized_pnl  numeric     NOT NULL DEFAULT 0,
    fees            numeric     NOT NULL DEFAULT 0,
    peak_equity     numeric,
    drawdown        numeric     NOT NULL DEFAULT 0 CHECK (drawdown >= 0 AND drawdown <= 1),
    balances        jsonb       NOT NULL DEFAULT '{}', -- currency -> amount as a string
    PRIMARY KEY (account_id, ts_event)
);

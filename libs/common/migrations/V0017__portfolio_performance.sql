-- Performance of the portfolio stage per account and per strategy: round trips with their
-- excursions, the open trips' lots, the strategies' equity curves and the published reports.
-- strategy_id '' is the whole account (a strategy id is never empty).

-- The position each applied fill left, so a fill redelivered after a restart (a crash between
-- the database and Kafka commits) publishes exactly that position again.
ALTER TABLE portfolio_applied_fills ADD COLUMN position jsonb;

-- The cash an account opened with in its base currency: the base of its strategies' curves.
ALTER TABLE portfolio_accounts ADD COLUMN capital numeric;

-- Each scope's FIFO lots in an instrument with the price range each lot saw, its open trip
-- and its realised P&L (JSON, decimals as strings), replaced with every fill and snapshot.
CREATE TABLE portfolio_trip_books (
    account_id      text        NOT NULL,
    strategy_id     text        NOT NULL DEFAULT '',
    instrument_id   text        NOT NULL,
    state           jsonb       NOT NULL,
    ts_event        bigint      NOT NULL,
    PRIMARY KEY (account_id, strategy_id, instrument_id)
);

-- Closed round trips; the fill that closed one identifies it within its scope.
CREATE TABLE portfolio_round_trips (
    account_id      text        NOT NULL,
    strategy_id     text        NOT NULL DEFAULT '',
    instrument_id   text        NOT NULL,
    close_fill_id   text        NOT NULL,
    side            text        NOT NULL CHECK (side IN ('LONG', 'SHORT')),
    quantity        numeric     NOT NULL CHECK (quantity > 0),
    entry_price     numeric     NOT NULL CHECK (entry_price > 0),
    exit_price      numeric     NOT NULL CHECK (exit_price > 0),
    entry_ts        bigint      NOT NULL,
    exit_ts         bigint      NOT NULL,
    fees            numeric     NOT NULL DEFAULT 0,
    pnl             numeric     NOT NULL,             -- net of fees, quote currency
    mae             numeric     NOT NULL CHECK (mae >= 0),  -- per unit, quote currency
    mfe             numeric     NOT NULL CHECK (mfe >= 0),
    PRIMARY KEY (account_id, strategy_id, instrument_id, close_fill_id)
);
CREATE INDEX portfolio_round_trips_exit ON portfolio_round_trips (account_id, strategy_id, exit_ts);

-- A strategy's equity curve: the account's capital plus the strategy's P&L at each snapshot.
CREATE TABLE portfolio_strategy_equity (
    account_id      text        NOT NULL,
    strategy_id     text        NOT NULL,
    ts_event        bigint      NOT NULL,
    equity          numeric     NOT NULL,
    PRIMARY KEY (account_id, strategy_id, ts_event)
);

-- Every PerformanceReport published (the event as JSON in `report`), with headline figures
-- as columns for queries. Ratios are double precision: +/-Infinity when unbounded.
CREATE TABLE portfolio_performance (
    account_id      text        NOT NULL,
    strategy_id     text        NOT NULL DEFAULT '',
    ts_event        bigint      NOT NULL,
    report_id       text        NOT NULL,
    total_return    double precision,
    sharpe          double precision,
    max_drawdown    double precision NOT NULL DEFAULT 0,
    trades          integer     NOT NULL DEFAULT 0,
    net_pnl         numeric     NOT NULL DEFAULT 0,
    report          jsonb       NOT NULL,
    PRIMARY KEY (account_id, strategy_id, ts_event)
);

-- State of the portfolio stage (positions and snapshots use V0001's tables) and of risk's
-- circuit breakers, so both rebuild their memory after a restart.

-- Cash per account and currency, written with every applied fill.
CREATE TABLE portfolio_balances (
    account_id      text        NOT NULL,
    currency        text        NOT NULL,
    amount          numeric     NOT NULL,             -- signed: a short holds a negative base
    ts_event        bigint      NOT NULL,
    PRIMARY KEY (account_id, currency)
);

-- An account's base currency and equity peak (the drawdown of its snapshots).
CREATE TABLE portfolio_accounts (
    account_id      text        PRIMARY KEY,
    base_currency   text        NOT NULL,
    peak_equity     numeric,
    ts_event        bigint      NOT NULL
);

-- The open FIFO lots of a position, oldest first (seq), replaced with every applied fill.
CREATE TABLE portfolio_lots (
    account_id      text        NOT NULL,
    instrument_id   text        NOT NULL,
    seq             integer     NOT NULL,
    quantity        numeric     NOT NULL CHECK (quantity > 0),
    price           numeric     NOT NULL CHECK (price > 0),
    direction       smallint    NOT NULL CHECK (direction IN (-1, 1)),
    ts_event        bigint      NOT NULL,
    PRIMARY KEY (account_id, instrument_id, seq)
);

-- Every fill the portfolio applied, stored in the same transaction as its effects: a fill
-- redelivered after a restart finds its key here and is not applied twice.
CREATE TABLE portfolio_applied_fills (
    account_id      text        NOT NULL,
    instrument_id   text        NOT NULL,
    fill_id         text        NOT NULL,             -- the venue trade id, else the report id
    ts_event        bigint      NOT NULL,
    PRIMARY KEY (account_id, instrument_id, fill_id)
);

-- Risk: a tripped circuit breaker per account, and the loss references it is measured from.
CREATE TABLE risk_account_state (
    account_id      text        PRIMARY KEY,
    breaker_cause   text,                             -- NULL: not tripped
    breaker_details jsonb       NOT NULL DEFAULT '{}',
    ts_tripped      bigint,
    day             integer,                          -- UTC days since 1970-01-01
    day_open_equity numeric,
    peak_equity     numeric,
    ts_updated      bigint      NOT NULL
);

-- Risk: breaker resets already applied, so replaying `control` at start does not reset a
-- breaker tripped after them.
CREATE TABLE risk_applied_resets (
    command_id      text        PRIMARY KEY,
    target          text        NOT NULL,
    ts_applied      bigint      NOT NULL
);

-- The open lots of each performance trip book (V0017's portfolio_trip_books), one row each,
-- instead of inside the book's JSON `state`: a batch of fills rewrote every open lot of each
-- book it moved (bench_orderflow's account holds ~1,600), where now it writes the lots that
-- changed: the front lot, those whose price range widened (always the newest ones), new ones,
-- and a delete of those closed below the front. A book's `state` stored before this holds its
-- lots in `state.trip.lots`: the portfolio reads them there, and moves them here when it
-- writes the book next.
CREATE TABLE portfolio_trip_lots (
    account_id      text        NOT NULL,
    strategy_id     text        NOT NULL DEFAULT '',  -- '' is the whole account, as V0017
    instrument_id   text        NOT NULL,
    seq             bigint      NOT NULL,             -- rising in FIFO order within the book
    quantity        numeric     NOT NULL CHECK (quantity > 0),
    price           numeric     NOT NULL CHECK (price > 0),
    low             numeric     NOT NULL CHECK (low <= price),   -- lowest price seen open
    high            numeric     NOT NULL CHECK (high >= price),  -- highest price seen open
    PRIMARY KEY (account_id, strategy_id, instrument_id, seq)
);

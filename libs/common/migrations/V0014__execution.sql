-- execution: the sent-log. A row is written BEFORE a SUBMIT goes to the venue, so that after a
-- crash (venue called, Kafka offsets not committed) the redelivered SUBMIT is answered from the
-- venue's own record of the order and never sent again: at most once per client order id.
CREATE TABLE IF NOT EXISTS execution_sent_orders (
    venue           text        NOT NULL,  -- the venue id the command names (QM_VENUE)
    client_order_id text        NOT NULL,
    account_id      text        NOT NULL,
    instrument_id   text        NOT NULL,
    command_id      text        NOT NULL,
    route           text        NOT NULL,  -- the adapter it went to (a ccxt exchange id, or the venue)
    ts_command      bigint      NOT NULL,  -- the command's ts_event, UTC ns
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (venue, client_order_id)
);

-- execution: the reports each input made, in idempotent order-flow delivery
-- (QM_ORDER_FLOW_DELIVERY=idempotent). Written by the batch hook, after the batch's sent-log
-- claims and before its output is published. An input redelivered after a crash or a
-- rebalance (a command by its command id, market data or a control command by its envelope's
-- event id) finds its reports here and gets them published again with the same report ids and
-- trade ids instead of reaching the venue twice; a command also gets its order's stored
-- history when the restarted simulated venue no longer knows the order.
CREATE TABLE IF NOT EXISTS execution_outputs (
    id              bigserial   PRIMARY KEY,           -- the order the reports were made in
    venue           text        NOT NULL,              -- the venue id (QM_VENUE)
    cause           text        NOT NULL,              -- 'command:<command id>' | 'event:<event id>'
    ts_cause        bigint      NOT NULL,              -- the input's ts_event, UTC ns
    client_order_id text        NOT NULL,
    report_id       text        NOT NULL,
    report          jsonb       NOT NULL,              -- the ExecutionReport as published
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (venue, cause, report_id)                   -- a batch stored twice adds nothing
);

-- A command's order history, in the order it was made.
CREATE INDEX IF NOT EXISTS execution_outputs_order_idx
    ON execution_outputs (venue, client_order_id, id);

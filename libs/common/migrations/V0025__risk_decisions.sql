-- Risk: every decision on an intent in idempotent order-flow delivery (QM_ORDER_FLOW_DELIVERY),
-- stored by the batch hook before the batch's output is published. An intent redelivered
-- after a crash or a rebalance finds its decision here and gets it again (same decision id,
-- same client order id), never a new one. Intents are keyed by account, like
-- their topic. The intent itself is not kept: the redelivered
-- message carries it. Rows older than a day are pruned: a redelivery reaches back only to
-- the last committed offset.
CREATE TABLE IF NOT EXISTS risk_decisions (
    account_id        text        NOT NULL,
    intent_id         text        NOT NULL,
    client_order_id   text        NOT NULL,
    decision_id       text        NOT NULL,
    approved          boolean     NOT NULL,
    reason            text,                           -- a denial's UPPER_SNAKE reason
    details           jsonb       NOT NULL DEFAULT '{}'::jsonb,
    adjusted_quantity numeric,
    side              text,                           -- derived for a target-position intent
    ts_event          bigint      NOT NULL,           -- when risk decided (the stage's clock)
    ts_stored         bigint      NOT NULL DEFAULT qm_now_ns(),
    PRIMARY KEY (account_id, intent_id)
);

-- The newest are loaded at start and on partition assignment; the oldest are pruned.
CREATE INDEX IF NOT EXISTS risk_decisions_ts_stored ON risk_decisions (ts_stored);

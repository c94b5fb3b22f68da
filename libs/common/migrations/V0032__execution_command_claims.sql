-- execution: a claim per CANCEL and REPLACE, written BEFORE the command goes to a live venue,
-- as the sent-log (`execution_sent_orders`) is for a SUBMIT. A command redelivered after a
-- crash between the venue call and the batch hook (or the Kafka commit) finds its claim here
-- and is not sent again: it is answered from what the venue says of the order. Keyed by the
-- command id, which the oms keeps when it sends a pending cancel or replace again. Pruned a
-- day after it was recorded, as `execution_outputs` is.
CREATE TABLE IF NOT EXISTS execution_command_claims (
    venue           text        NOT NULL,              -- the venue id (QM_VENUE)
    command_id      text        NOT NULL,
    command_type    text        NOT NULL,              -- CANCEL | REPLACE
    client_order_id text        NOT NULL,
    account_id      text        NOT NULL,
    ts_command      bigint      NOT NULL,              -- the command's ts_event, UTC ns
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (venue, command_id)
);

-- What the background prune reads.
CREATE INDEX IF NOT EXISTS execution_command_claims_recorded_at
    ON execution_command_claims (recorded_at);

-- alerts: every notification the alerts stage sent, with what each channel made of it.
-- Plain PostgreSQL (no TimescaleDB needed). The notification id is the key, so a redelivered
-- event, evaluated again after a restart, is neither stored nor sent a second time.
CREATE TABLE IF NOT EXISTS alert_notifications (
    notification_id text        PRIMARY KEY,  -- "<event id>:<rule>" (or a flush/check id)
    rule            text        NOT NULL,
    kind            text        NOT NULL,     -- the rule kind: order_denied, dlq, ...
    severity        text        NOT NULL,     -- INFO, WARNING, CRITICAL
    code            text        NOT NULL,
    message         text        NOT NULL,
    dedupe_key      text        NOT NULL,
    channels        text[]      NOT NULL,
    outcome         jsonb       NOT NULL,     -- {"<channel>": "sent" | "<error>" | "not configured"}
    suppressed      integer     NOT NULL DEFAULT 0,
    event_id        text,
    account_id      text,
    instrument_id   text,
    details         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    ts_ns           bigint      NOT NULL,     -- when it was raised, UTC ns
    stored_at       timestamptz NOT NULL DEFAULT now()
);

-- The newest first, overall and per rule (an operator's "what fired lately").
CREATE INDEX IF NOT EXISTS alert_notifications_ts_idx ON alert_notifications (ts_ns DESC);
CREATE INDEX IF NOT EXISTS alert_notifications_rule_ts_idx
    ON alert_notifications (rule, ts_ns DESC);

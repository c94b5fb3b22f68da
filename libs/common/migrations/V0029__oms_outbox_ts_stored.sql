-- oms: when each outbox row was stored, by the database's clock, so that a row is deleted once
-- its input can no longer be redelivered (a day after; the oms's background prune). `ts_init`
-- cannot say: it is the oms's clock, which a replay simulates. Rows stored before this
-- migration get its time, so they go a day after it.
ALTER TABLE oms_outbox ADD COLUMN IF NOT EXISTS ts_stored bigint NOT NULL DEFAULT qm_now_ns();

-- What the prune reads. The index on ts_init has no reader (the outbox is read by input id
-- only): dropped, so each stored batch still updates one index besides the key.
CREATE INDEX IF NOT EXISTS oms_outbox_ts_stored ON oms_outbox (ts_stored);
DROP INDEX IF EXISTS oms_outbox_ts;

-- execution: what its background prune of `execution_outputs` reads. A row is deleted a day
-- after it was recorded (`recorded_at`, the database's clock): its input can no longer be
-- redelivered by then. The sent-log (`execution_sent_orders`) is not pruned: it alone keeps a
-- SUBMIT from reaching the venue twice.
CREATE INDEX IF NOT EXISTS execution_outputs_recorded_at ON execution_outputs (recorded_at);

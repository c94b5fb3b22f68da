-- What a restarted portfolio in idempotent order-flow delivery publishes again, exactly:
-- * the PortfolioSnapshot event as published (its positions included), instead of a snapshot
--   computed anew from a later state;
-- * the event id of the message that applied a fill, so only that message redelivered
--   republishes its position (a copy of the fill under another envelope is dropped).
-- NULL for rows stored before.
ALTER TABLE equity_snapshots ADD COLUMN snapshot jsonb;
ALTER TABLE portfolio_applied_fills ADD COLUMN event_id text;

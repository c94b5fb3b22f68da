-- The oms's outbox: what each consumed message made the oms publish, keyed by that message.
--
-- The oms stores an input's order changes and its outputs in one PostgreSQL transaction, then
-- hands the outputs to the Kafka transaction that also commits the input's offset. A crash
-- between the two commits leaves the changes stored but the outputs unpublished; the input is
-- redelivered, the changes are recognised as applied, and the outputs are published again
-- from here, byte for byte the same payloads (command ids are derived, so they match too).

CREATE TABLE oms_outbox (
    input_id        text        PRIMARY KEY,          -- event id of the consumed envelope
    input_schema    text        NOT NULL,             -- schema name of the consumed message
    emits           jsonb       NOT NULL,             -- [{topic, key, ts_event, schema, payload}]
    ts_init         bigint      NOT NULL              -- oms clock when stored, UTC ns
);
CREATE INDEX oms_outbox_ts ON oms_outbox (ts_init);

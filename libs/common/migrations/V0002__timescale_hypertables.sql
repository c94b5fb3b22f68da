-- Turn the time-series tables into TimescaleDB hypertables where TimescaleDB is installed.
--
-- On plain PostgreSQL (the local stack, CI) this does nothing and the schema works as is.
-- Where the extension is installed, or available and creatable, ticks, bars, fills and
-- equity_snapshots are partitioned on their bigint nanosecond time column and existing rows
-- are moved into chunks. Chunk intervals are in nanoseconds.

DO $$
DECLARE
    ts text;  -- the schema TimescaleDB's functions live in, quoted for EXECUTE
    spec record;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        IF NOT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') THEN
            RAISE NOTICE 'timescaledb is not available: keeping plain tables';
            RETURN;
        END IF;
        BEGIN
            CREATE EXTENSION IF NOT EXISTS timescaledb;
        EXCEPTION WHEN OTHERS THEN
            -- Not in shared_preload_libraries, or not allowed to create it: the plain schema
            -- is fully functional, so say why and carry on.
            RAISE WARNING 'timescaledb is available but was not created (%): keeping plain tables',
                SQLERRM;
            RETURN;
        END;
    END IF;
    -- Qualified calls: the extension may live in a schema that is not on the search_path
    -- (installed in public while the tables live in the service's own schema).
    SELECT extnamespace::regnamespace::text INTO ts FROM pg_extension WHERE extname = 'timescaledb';

    FOR spec IN
        SELECT * FROM (VALUES
            ('ticks',            'ts_event', 86400000000000::bigint),      -- 1 day
            ('bars',             'ts_open',  604800000000000::bigint),     -- 7 days
            ('fills',            'ts_event', 2592000000000000::bigint),    -- 30 days
            ('equity_snapshots', 'ts_event', 2592000000000000::bigint)     -- 30 days
        ) AS t (table_name, time_column, chunk_ns)
    LOOP
        EXECUTE format(
            'SELECT %s.create_hypertable(%L::regclass, %L, chunk_time_interval => %s::bigint, '
            'if_not_exists => true, migrate_data => true)',
            ts, spec.table_name, spec.time_column, spec.chunk_ns);
        -- Integer-time hypertables need to know "now" for retention and compression policies.
        EXECUTE format(
            'SELECT %s.set_integer_now_func(%L::regclass, %L::regproc, replace_if_exists => true)',
            ts, spec.table_name, 'qm_now_ns');
    END LOOP;
END
$$;

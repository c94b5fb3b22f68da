-- When an account's cash was seeded from its AccountOpened event (the api's paper accounts);
-- NULL: it opened with the portfolio's default starting cash. Set once, so a redelivered
-- opening is not applied again after a restart.
ALTER TABLE portfolio_accounts ADD COLUMN opened_ts bigint;

-- The api gateway: users, API keys, refresh tokens and paper accounts owned by users.
--
-- Same conventions as V0001 (ts_* bigint UTC ns, money NUMERIC, enumerations as CHECKed text).
-- Secrets are never stored: passwords as argon2 hashes, API keys and refresh tokens as the
-- SHA-256 of their random secret part (they carry 256 bits of entropy, so a slow hash adds
-- nothing and would cost every request).

CREATE TABLE api_users (
    user_id         text        PRIMARY KEY,
    username        text        NOT NULL UNIQUE,
    password_hash   text        NOT NULL,             -- argon2id, PHC string
    roles           text[]      NOT NULL DEFAULT '{}',
    active          boolean     NOT NULL DEFAULT true,
    ts_created      bigint      NOT NULL DEFAULT qm_now_ns(),
    CHECK (roles <@ ARRAY['READ_PORTFOLIO', 'EXECUTE_TRADES', 'MANAGE_STRATEGIES', 'ADMIN']::text[])
);

CREATE TABLE api_keys (
    key_id          text        PRIMARY KEY,          -- the public part of the key
    user_id         text        NOT NULL REFERENCES api_users (user_id) ON DELETE CASCADE,
    name            text        NOT NULL DEFAULT '',
    secret_sha256   char(64)    NOT NULL,
    scopes          text[]      NOT NULL DEFAULT '{}', -- a subset of the owner's roles
    revoked         boolean     NOT NULL DEFAULT false,
    ts_created      bigint      NOT NULL DEFAULT qm_now_ns(),
    CHECK (scopes <@ ARRAY['READ_PORTFOLIO', 'EXECUTE_TRADES', 'MANAGE_STRATEGIES', 'ADMIN']::text[])
);
CREATE INDEX api_keys_user ON api_keys (user_id);

-- Rotating refresh tokens: each use replaces the token by a new one of the same family; a
-- token presented after it was replaced means it leaked, and revokes the whole family.
CREATE TABLE api_refresh_tokens (
    token_id        text        PRIMARY KEY,
    family_id       text        NOT NULL,
    user_id         text        NOT NULL REFERENCES api_users (user_id) ON DELETE CASCADE,
    secret_sha256   char(64)    NOT NULL,
    ts_expires      bigint      NOT NULL,
    replaced_by     text,                             -- set once rotated
    revoked         boolean     NOT NULL DEFAULT false,
    ts_created      bigint      NOT NULL DEFAULT qm_now_ns()
);
CREATE INDEX api_refresh_tokens_family ON api_refresh_tokens (family_id);

-- Which user owns which account (accounts itself is V0001's), and a paper account's capital.
CREATE TABLE api_account_owners (
    account_id      text        PRIMARY KEY REFERENCES accounts (account_id) ON DELETE CASCADE,
    user_id         text        NOT NULL REFERENCES api_users (user_id) ON DELETE CASCADE,
    starting_capital numeric    NOT NULL CHECK (starting_capital > 0),
    ts_created      bigint      NOT NULL DEFAULT qm_now_ns()
);
CREATE INDEX api_account_owners_user ON api_account_owners (user_id);

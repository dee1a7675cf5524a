-- neon_auth.users_sync exactly as Neon creates it. usersync creates it only when it is
-- absent; an existing table is used as it is (its shape is checked, never altered).
CREATE SCHEMA IF NOT EXISTS neon_auth;

CREATE TABLE IF NOT EXISTS neon_auth.users_sync (
  raw_json   jsonb NOT NULL,
  id         text GENERATED ALWAYS AS (raw_json ->> 'id') STORED NOT NULL PRIMARY KEY,
  name       text GENERATED ALWAYS AS (raw_json ->> 'display_name') STORED,
  email      text GENERATED ALWAYS AS (raw_json ->> 'primary_email') STORED,
  created_at timestamptz GENERATED ALWAYS AS
             (to_timestamp(trunc((raw_json ->> 'signed_up_at_millis')::bigint)::double precision / 1000)) STORED,
  updated_at timestamptz,
  deleted_at timestamptz
);

CREATE INDEX IF NOT EXISTS users_sync_deleted_at_idx ON neon_auth.users_sync (deleted_at);

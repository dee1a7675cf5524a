-- usersync's own schema on the target: one checkpoint row per replication slot, written in
-- the same transaction as the changes it covers, so the target alone knows exactly which
-- source transactions it holds.
CREATE SCHEMA IF NOT EXISTS usersync;

CREATE TABLE IF NOT EXISTS usersync.state (
  slot_name         text PRIMARY KEY,
  system_identifier text NOT NULL,
  -- LSN of the commit record of the last applied source transaction.
  commit_lsn        pg_lsn NOT NULL,
  -- LSN just past that commit record: what the slot may be confirmed up to.
  end_lsn           pg_lsn NOT NULL,
  commit_time       timestamptz,
  updated_at        timestamptz NOT NULL DEFAULT now()
);

-- usersync's own schema on the target: one checkpoint row per replication slot, written in
-- the same transaction as the changes it covers, so the target alone knows exactly which
-- source transactions it holds.
--
-- Not `CREATE SCHEMA IF NOT EXISTS`: PostgreSQL checks the CREATE privilege on the database
-- before it checks whether the schema exists, so that statement fails for a least-privilege
-- role that owns an existing schema usersync but may not create schemas (sql/target_role.sql).
DO $$
BEGIN
  IF to_regnamespace('usersync') IS NULL THEN
    CREATE SCHEMA usersync;
  END IF;
END
$$;

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

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
  updated_at        timestamptz NOT NULL DEFAULT now(),
  -- Equal to updated_at while the slot has never been confirmed past end_lsn: usersync
  -- writes a position here, durably, before it confirms the slot up to it, idle positions
  -- included, and sets both columns to now() in every write. A slot confirmed further then
  -- means the target lost what it had applied (a backup restored, a Neon branch reset), and
  -- run refuses it. An older usersync, which confirmed idle positions without writing them
  -- here, sets only updated_at: its checkpoint reads as not bounded, and run takes it over.
  bounded_at        timestamptz
);

-- What setup or resync is doing for a slot until its final commit, which writes the
-- checkpoint and deletes this row in one transaction. Written once the slot exists (resync:
-- before it deletes the checkpoint), so that a later setup can tell a slot it created itself
-- and nobody consumed from (confirmed_flush_lsn still at consistent_point) from one that
-- feeds another target, and an interrupted resync from an interrupted setup.
CREATE TABLE IF NOT EXISTS usersync.setup_progress (
  slot_name         text PRIMARY KEY,
  system_identifier text NOT NULL,
  -- The slot's consistent point; NULL while a resync has not created its slot yet.
  consistent_point  pg_lsn,
  mode              text NOT NULL CHECK (mode IN ('setup', 'resync')),
  -- neon_auth.users_sync held no row when the first attempt began: every row on it since
  -- came from usersync's copy, so a rerun may soft-delete those the source no longer has.
  target_was_empty  boolean NOT NULL,
  started_at        timestamptz NOT NULL DEFAULT now()
);

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
  bounded_at        timestamptz,
  -- Set while a route of a fan-out is copied online (added while run streams, or resync
  -- --online): the target holds the stream since the route joined, not yet every user from
  -- before. run copies it (again, from the start) until it is done, then sets it NULL.
  copy_started_at   timestamptz,
  -- The online copy is a resync (resync --online): it also soft-deletes the live users the
  -- source no longer has, and may resume behind the slot (it rebuilds what was missed).
  copy_reconciles   boolean
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

-- Stack Auth (--profile stack-auth): for each user, the id of the "ContactChannel" whose
-- email the user's email keys in neon_auth.users_sync hold (primary_email,
-- primary_email_verified, primary_email_auth_enabled). Without REPLICA IDENTITY FULL on that
-- table, a deleted channel, or one updated so that it is no longer the primary email, arrives
-- with its key (or its new row) only, which cannot say whether it *was* the primary email;
-- this table can. usersync writes it in the same transaction as the email keys it describes:
-- a row here changes when, and only when, those keys do. No row: the user shows no email
-- (or the user is not a Stack Auth user). channel_id NULL: the channel is unknown, for a user
-- copied by a usersync older than this table (see below).
--
-- Keyed by user id alone, as neon_auth.users_sync is: a target holds one user per id, whatever
-- the slot or tenancy that feeds it. Other profiles leave it empty.
--
-- Created by sql/usersync_state_upgrade.sql, which runs after this file on every target, new
-- or copied by an older usersync, so that the table has one definition: created once, with
-- the users already on the target, where a live Stack Auth user showing an email gets a row
-- with channel_id NULL (unknown), so that a change without the old row that would need to
-- know it fails loudly instead of guessing (REPLICA IDENTITY FULL, or usersync resync, which
-- records every user's channel, resolves it). On a new target that is no row at all.

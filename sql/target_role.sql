-- A least-privilege role for usersync on the TARGET (the Neon database).
--
-- What usersync does there, and what each step needs:
--   * reads the shape of neon_auth.users_sync from the catalog: USAGE on schema neon_auth;
--   * upserts users (INSERT ... ON CONFLICT (id) DO UPDATE) and soft-deletes them (UPDATE):
--     SELECT, INSERT, UPDATE on neon_auth.users_sync (ON CONFLICT DO UPDATE reads the row);
--   * usersync purge (hard delete of users soft-deleted long ago): DELETE on it, granted only
--     with -v purge=on (see below). purge --scrub needs no more than UPDATE;
--   * keeps its checkpoint (usersync.state), the record of a setup under way
--     (usersync.setup_progress) and, for Stack Auth, each user's primary email channel
--     (usersync.primary_email_channel) in its own schema usersync, which setup creates if missing:
--     the role owns schema usersync, so it can create and write the tables there (setup
--     creates a table a newer usersync needs when it runs again).
--
-- Connections: usersync run (and replay) without --routes holds two target connections, the
-- first with the slot's lock, the second to write backlogs and make batches durable beside
-- the first (a standby holds one while it waits), so an active and a standby use three; setup
-- holds two more while it copies, status one. With a CONNECTION LIMIT below that, run writes
-- with one connection (and says so; its batches then wait for each durability flush), and a
-- standby or status is refused while it does.
--
-- It cannot create schema neon_auth or the users_sync table (that needs CREATE on the
-- database). On Neon, Neon Auth creates them; elsewhere this script creates them from
-- usersync's own DDL (sql/users_sync.sql) when they are missing, as whoever runs it. usersync
-- setup then finds the table and only checks its shape.
--
-- Run it as the owner of neon_auth.users_sync (on Neon: the database owner, e.g.
-- neondb_owner) or a superuser, in the target database, from this directory or with a path
-- (\ir resolves users_sync.sql next to this file):
--
--   psql "$ADMIN_URL" -v ON_ERROR_STOP=1 \
--        -v role=usersync_target -v password="$TARGET_PASSWORD" \
--        -f sql/target_role.sql
--
-- Variables: role (default usersync_target), password (required), purge (default off).
-- Running it again updates the password and re-applies the grants. The password reaches the
-- server in the statement text (see sql/source_role.sql for how to keep it out of the server
-- log).
--
-- Hard deletes are opt-in. Only usersync purge removes rows (run, setup, resync and status
-- soft-delete with UPDATE), and a role that may DELETE users also removes, through the
-- apps' ON DELETE CASCADE foreign keys, the app rows that point at them. To let this role purge, run the script with -v purge=on, which grants
-- DELETE on neon_auth.users_sync, or run that GRANT yourself:
--
--   psql "$ADMIN_URL" -v ON_ERROR_STOP=1 \
--        -v role=usersync_target -v password="$TARGET_PASSWORD" -v purge=on \
--        -f sql/target_role.sql
--
-- The script says what the role may do, so a later run without purge=on revokes DELETE
-- again (and says so). One script rather than a second one for purge: the same variables,
-- one place to read, and a rerun (say, to rotate the password) cannot leave a forgotten
-- grant behind.

\set ON_ERROR_STOP 1

\if :{?role}
\else
  \set role usersync_target
\endif
\if :{?password}
\else
  \echo 'target_role.sql: set the role password with -v password=...'
  DO $$ BEGIN RAISE EXCEPTION 'missing psql variable: password'; END $$;
\endif
\if :{?purge}
\else
  \set purge off
\endif

SELECT current_database() AS dbname,
       EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'role') AS role_exists,
       to_regclass('neon_auth.users_sync') IS NULL AS users_sync_missing
\gset

-- LOGIN only. An existing role keeps its other attributes, and is reported if it has more.
\if :role_exists
  ALTER ROLE :"role" WITH LOGIN PASSWORD :'password';
\else
  CREATE ROLE :"role" WITH LOGIN PASSWORD :'password';
\endif
SELECT rolsuper OR rolcreatedb OR rolcreaterole OR rolbypassrls OR rolreplication
         AS role_has_more
  FROM pg_roles WHERE rolname = :'role'
\gset
\if :role_has_more
  \echo 'warning: role' :"role" 'has SUPERUSER, CREATEDB, CREATEROLE, BYPASSRLS or REPLICATION, which usersync does not need on the target'
\endif

GRANT CONNECT ON DATABASE :"dbname" TO :"role";

-- neon_auth.users_sync: Neon's table, created here only if it is missing (an existing one is
-- left exactly as it is: apps have foreign keys to it).
\if :users_sync_missing
  \ir users_sync.sql
\endif
GRANT USAGE ON SCHEMA neon_auth TO :"role";
GRANT SELECT, INSERT, UPDATE ON TABLE neon_auth.users_sync TO :"role";
-- Only for usersync purge, and only when asked for (-v purge=on).
\if :purge
  GRANT DELETE ON TABLE neon_auth.users_sync TO :"role";
\else
  SELECT has_table_privilege(:'role', 'neon_auth.users_sync', 'DELETE') AS role_could_delete
  \gset
  REVOKE DELETE ON TABLE neon_auth.users_sync FROM :"role";
  SELECT has_table_privilege(:'role', 'neon_auth.users_sync', 'DELETE') AS role_may_delete
  \gset
  \if :role_may_delete
    \echo 'warning: role' :"role" 'may still DELETE on neon_auth.users_sync, through PUBLIC, another role it is a member of, or SUPERUSER'
  \elif :role_could_delete
    \echo 'revoked DELETE on neon_auth.users_sync from' :"role" '(usersync purge needs it: run again with -v purge=on)'
  \endif
\endif

-- usersync's own schema, owned by the role. An existing one (say, from a setup run as the
-- admin) is handed over with its tables, so the checkpoint carries on.
CREATE SCHEMA IF NOT EXISTS usersync AUTHORIZATION :"role";
ALTER SCHEMA usersync OWNER TO :"role";
ALTER TABLE IF EXISTS usersync.state OWNER TO :"role";
ALTER TABLE IF EXISTS usersync.setup_progress OWNER TO :"role";
ALTER TABLE IF EXISTS usersync.primary_email_channel OWNER TO :"role";

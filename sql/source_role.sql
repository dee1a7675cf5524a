-- A least-privilege role for usersync on the SOURCE (the identity store's database).
--
-- What usersync does there, and what each step needs:
--   * reads the catalog (wal_level, the table's columns, key and replica identity, slots):
--     nothing beyond being able to connect;
--   * opens a logical replication connection and creates, reads and drops its slot:
--     the REPLICATION attribute (no pg_hba.conf "replication" line is needed for logical
--     replication: it matches the database like an ordinary connection);
--   * reads the users table (setup checks it; an initial copy reads it): SELECT on it;
--   * would write a heartbeat with pg_logical_emit_message(): EXECUTE on it, which PUBLIC has
--     by default, so nothing to grant (tests/it/security.rs checks this for the role below);
--   * uses the publication: nothing, once it exists. Creating one FOR TABLE needs ownership of
--     the table, so this script creates it as the table owner (choice A below).
--
-- Run it as the owner of the users table (or a superuser), in the identity store's database:
--
--   psql "$ADMIN_URL" -v ON_ERROR_STOP=1 \
--        -v role=usersync_source -v password="$SOURCE_PASSWORD" \
--        -v schema=public -v table=users -v publication=usersync \
--        -f sql/source_role.sql
--
--   psql "$ADMIN_URL" -v ON_ERROR_STOP=1 \
--        -v role=usersync_source -v password="$SOURCE_PASSWORD" -v profile=keycloak \
--        -f sql/source_role.sql
--
-- Variables: role (default usersync_source), password (required), profile (default generic;
-- pass the same --profile to usersync), schema and table (default: the profile's users table,
-- public.users for generic), publication (default usersync; pass the same --publication to
-- usersync). Running it again updates the password and re-applies the grants.
--
-- A profile that reads more than the users table gets SELECT on those tables too:
--   keycloak    realm (same schema), where usersync looks up the realm --realm names; without
--               it usersync refuses a realm name;
--   stack-auth  "ContactChannel" (same schema), which holds the users' primary emails.
-- A table that must be published too (Stack Auth's "ContactChannel") is then added by its
-- owner with the ALTER PUBLICATION statement, row filter included, that usersync setup prints
-- when it may not add the table itself. (Running the script with -v table=... for another
-- table also just grants SELECT on it, once the publication exists.)
--
-- The password reaches the server inside the statement text: with log_statement = 'ddl' or
-- 'all' it is written to the server log. To avoid that, run the script with password set to
-- a throwaway value, then set the real one with psql's \password usersync_source, which
-- sends only a SCRAM verifier.
--
-- What REPLICATION allows beyond usersync's publication (docs/deployment.md, "What REPLICATION allows"):
-- PostgreSQL calls it a very highly privileged attribute. With LOGIN, in every database the
-- role may connect to, it can create logical slots with any output plugin the server has and
-- read them (test_decoding and wal2json ignore publications and decode every table); with
-- pgoutput it names any publication it likes (there are no privileges on publications, and
-- SELECT is checked only for the initial copy, not for streamed changes); it can advance and
-- drop any slot, other subscribers' included; and where a pg_hba.conf "replication" line
-- admits it, it can stream physical replication (pg_basebackup: the whole cluster, password
-- hashes included) and create physical slots that hold WAL. Treat its password as near read
-- access to the whole cluster, and limit it:
--   * a dedicated role used by usersync alone; a long random password, rotated;
--   * pg_hba.conf: no "replication" line for it (the default "host replication all ..." lines
--     admit every REPLICATION role: put "host replication usersync_source all reject" above
--     them); usersync's logical connection (replication=database) matches the lines for its
--     database, so admit it only there and only from the usersync host, e.g.
--       hostssl auth usersync_source 10.0.3.7/32 scram-sha-256
--       host    all  usersync_source all         reject
--   * max_replication_slots and max_slot_wal_keep_size bound the slots and the WAL they hold.
--
-- Creating a role with REPLICATION needs a superuser on PostgreSQL 15 and older (16: a role
-- with CREATEROLE that has REPLICATION itself). Managed services have their own way, for
-- example Amazon RDS: GRANT rds_replication TO usersync_source; on Neon, enable logical
-- replication in the project settings, and roles created in the console have REPLICATION.
--
-- The publication, two choices:
--   A (this script): the table owner creates it, usersync setup finds it and only checks that
--     it publishes the table. The usersync role owns nothing on the source. usersync teardown
--     then cannot drop the publication (it is not the owner); drop it as the owner with
--     DROP PUBLICATION usersync. This script publishes every column; on PostgreSQL 15+
--     usersync setup then prints the ALTER PUBLICATION statements that narrow the publication
--     to the columns the mapping uses (no password hash or token on the wire): run them as
--     the owner, and again whenever setup prints new ones.
--   B: let usersync setup create it. The role then needs CREATE on the database and ownership
--     of the table, e.g. GRANT CREATE ON DATABASE ... TO usersync_source and membership in the
--     owning role (GRANT <table owner> TO usersync_source), which also lets it alter and drop
--     the table: more than replication needs, which is why A is the default here.

\set ON_ERROR_STOP 1

\if :{?role}
\else
  \set role usersync_source
\endif
\if :{?profile}
\else
  \set profile generic
\endif
-- The profile's users table (usersync's default --table) and what else it reads.
SELECT :'profile' IN ('generic', 'supabase', 'keycloak', 'better-auth', 'stack-auth')
           AS known_profile,
       CASE :'profile' WHEN 'supabase' THEN 'auth' ELSE 'public' END AS profile_schema,
       CASE :'profile' WHEN 'supabase' THEN 'users' WHEN 'keycloak' THEN 'user_entity'
                       WHEN 'better-auth' THEN 'user' WHEN 'stack-auth' THEN 'ProjectUser'
                       ELSE 'users' END AS profile_table,
       :'profile' = 'keycloak' AS reads_realm,
       :'profile' = 'stack-auth' AS reads_contact_channel
\gset
\if :known_profile
\else
  \echo 'source_role.sql: unknown profile' :'profile' '(generic, supabase, keycloak, better-auth, stack-auth)'
  DO $$ BEGIN RAISE EXCEPTION 'unknown profile'; END $$;
\endif
\if :{?schema}
\else
  \set schema :profile_schema
\endif
\if :{?table}
\else
  \set table :profile_table
\endif
\if :{?publication}
\else
  \set publication usersync
\endif
\if :{?password}
\else
  \echo 'source_role.sql: set the role password with -v password=...'
  DO $$ BEGIN RAISE EXCEPTION 'missing psql variable: password'; END $$;
\endif

SELECT current_database() AS dbname,
       EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'role') AS role_exists,
       EXISTS (SELECT 1 FROM pg_publication WHERE pubname = :'publication') AS publication_exists
\gset

-- LOGIN and REPLICATION only. An existing role keeps its other attributes (this script never
-- takes SUPERUSER away from a role named by mistake), and is reported if it has more.
\if :role_exists
  ALTER ROLE :"role" WITH LOGIN REPLICATION PASSWORD :'password';
\else
  CREATE ROLE :"role" WITH LOGIN REPLICATION PASSWORD :'password';
\endif
SELECT rolsuper OR rolcreatedb OR rolcreaterole OR rolbypassrls AS role_has_more
  FROM pg_roles WHERE rolname = :'role'
\gset
\if :role_has_more
  \echo 'warning: role' :"role" 'has SUPERUSER, CREATEDB, CREATEROLE or BYPASSRLS, which usersync does not need'
\endif

GRANT CONNECT ON DATABASE :"dbname" TO :"role";
GRANT USAGE ON SCHEMA :"schema" TO :"role";
GRANT SELECT ON TABLE :"schema".:"table" TO :"role";
\if :reads_realm
  GRANT SELECT ON TABLE :"schema".realm TO :"role";
\endif
\if :reads_contact_channel
  GRANT SELECT ON TABLE :"schema"."ContactChannel" TO :"role";
\endif

-- Choice A: the publication, created by the table owner (whoever runs this script).
\if :publication_exists
  \echo 'publication' :"publication" 'exists; usersync setup checks that it publishes' :"schema".:"table"
\else
  CREATE PUBLICATION :"publication" FOR TABLE :"schema".:"table";
\endif

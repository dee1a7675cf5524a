-- Brings a usersync.state created by an older usersync up to date (sql/usersync_state.sql
-- creates new ones whole). setup runs it after that file, and run before it reads the
-- checkpoint, so that a new binary needs no manual step.
--
-- Each change is a DO block that looks in the catalog first, so that the ALTER (and its
-- exclusive lock, which would wait for a running replicator's transaction) runs only once.
DO $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_attribute
                  WHERE attrelid = 'usersync.state'::regclass AND attname = 'bounded_at'
                    AND NOT attisdropped) THEN
    -- IF NOT EXISTS: another session may add it between the check and the lock.
    ALTER TABLE usersync.state ADD COLUMN IF NOT EXISTS bounded_at timestamptz;
  END IF;
END
$$;

DO $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_attribute
                  WHERE attrelid = 'usersync.state'::regclass AND attname = 'copy_started_at'
                    AND NOT attisdropped) THEN
    ALTER TABLE usersync.state ADD COLUMN IF NOT EXISTS copy_started_at timestamptz;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_attribute
                  WHERE attrelid = 'usersync.state'::regclass AND attname = 'copy_reconciles'
                    AND NOT attisdropped) THEN
    ALTER TABLE usersync.state ADD COLUMN IF NOT EXISTS copy_reconciles boolean;
  END IF;
END
$$;

-- usersync.primary_email_channel (what it holds: sql/usersync_state.sql), on every target:
-- live users showing an email on a target copied by an older usersync get channel_id NULL
-- (unknown); a new target has none. Created by whoever first runs this version (the target
-- role owns schema usersync); no lock on an existing table is taken.
DO $$
BEGIN
  -- One session at a time (a setup, another slot's run), until this transaction ends: two
  -- concurrent CREATE TABLE IF NOT EXISTS can both pass the check and one then fails on
  -- pg_type's unique index. After the lock, to_regclass sees a table another session
  -- committed meanwhile.
  PERFORM pg_advisory_xact_lock(hashtextextended('usersync:primary_email_channel', 0));
  IF to_regclass('usersync.primary_email_channel') IS NULL THEN
    -- IF NOT EXISTS, ON CONFLICT: harmless where the lock already excludes the race.
    CREATE TABLE IF NOT EXISTS usersync.primary_email_channel (
      user_id    text PRIMARY KEY,
      channel_id text
    );
    -- A users_sync usersync cannot write (setup refuses it after this) holds no user of its.
    IF (SELECT count(*) = 3 FROM pg_attribute
         WHERE attrelid = to_regclass('neon_auth.users_sync')
           AND attname IN ('id', 'raw_json', 'deleted_at') AND NOT attisdropped) THEN
      INSERT INTO usersync.primary_email_channel (user_id, channel_id)
      SELECT id, NULL FROM neon_auth.users_sync
       WHERE deleted_at IS NULL AND raw_json ->> 'primary_email' IS NOT NULL
         -- Only the stack-auth profile writes this key.
         AND raw_json ? 'primary_email_auth_enabled'
      ON CONFLICT (user_id) DO NOTHING;
    END IF;
  END IF;
END
$$;

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

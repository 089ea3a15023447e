-- When an instance's machine is destroyed whether or not its client gives it back: the
-- request's ttl_seconds, else the broker's default lifetime. NULL: never.
ALTER TABLE instances ADD COLUMN expires_at timestamptz;

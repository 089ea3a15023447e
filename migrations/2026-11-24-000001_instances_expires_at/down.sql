ALTER TABLE instances DROP COLUMN expires_at;

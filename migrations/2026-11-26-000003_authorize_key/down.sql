DELETE FROM jobs WHERE kind = 'authorize_key';
ALTER TABLE jobs DROP CONSTRAINT jobs_kind_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_kind_check CHECK (kind IN ('create', 'remove'));
ALTER TABLE instances DROP COLUMN key_pending_since;

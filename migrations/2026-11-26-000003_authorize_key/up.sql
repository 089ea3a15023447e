-- A request with a key may take a warm machine from a provider that can put the key on a
-- running machine: the instance is `starting` until the key is there, since when it waits
-- is `key_pending_since`, and an `authorize_key` job puts it there.
ALTER TABLE instances ADD COLUMN key_pending_since TIMESTAMPTZ;
ALTER TABLE jobs DROP CONSTRAINT jobs_kind_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_kind_check CHECK (kind IN ('create', 'remove', 'authorize_key'));

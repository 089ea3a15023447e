ALTER TABLE instances DROP COLUMN asked;
ALTER TABLE providers DROP COLUMN fallbacks;
ALTER TABLE providers DROP COLUMN max_lifetime_secs;

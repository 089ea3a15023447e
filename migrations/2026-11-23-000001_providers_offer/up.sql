-- What a provider config offers (instance types, default type, call limits), readable
-- without the encryption key, so answering a request never opens the sealed config. Rows
-- registered before this column are filled in the first time the broker opens them.
ALTER TABLE providers ADD COLUMN offer JSONB;
